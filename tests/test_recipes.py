"""Recipes: the authors' values, overrides, resolution against the data, the fast recipe as it
was, and VL2V's stages run as the authors' trainer runs them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import dgkit, error_line
from safetensors.torch import load_file

from dgkit.errors import DgkitError
from dgkit.recipes import settings, train_config
from dgkit.train_config import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures"
BASE = {"data": "d", "targets": ["sketch"]}


def paper(method: str, **given) -> TrainConfig:
    return train_config("paper", {**BASE, "method": method, **given})


def values(config: TrainConfig, *names: str) -> tuple:
    return tuple(getattr(config, n) for n in names)


def test_paper_recipes_are_the_authors_values():
    """The values the authors' code sets, as the issue and the review list them."""
    run = ("optimizer", "lr", "weight_decay", "batch_per_domain", "steps", "schedule",
           "warmup_steps", "augment")
    domainbed = ("adam", 5e-5, 0.0, 32, 5001, "constant", 0, "domainbed")
    assert values(paper("erm"), *run, "average", "teacher") == (*domainbed, "none", None)
    assert values(paper("kd"), *run, "teacher_mode") == (*domainbed, "online")
    assert values(paper("psd"), *run) == domainbed
    assert values(paper("scmd"), *run, "average", "sma_start", "teacher", "teacher_mode") == (
        *domainbed, "sma", 300, "ViT-B-32:openai", "online")
    assert values(paper("vl2v"), *run, "average", "teacher", "teacher_mode") == (
        *domainbed, "swad", "ViT-B-16:openai", "online")
    rise = paper("rise")
    assert values(rise, "optimizer", "momentum", "weight_decay", "lr", "schedule", "lr_drops",
                  "warmup_steps", "epochs", "batch_size", "batch_per_domain", "augment",
                  "teacher", "teacher_mode") == (
        "sgd", 0.9, 5e-4, 1e-3, "step", [0.8], 0, 20, 128, None, "rise", "ViT-B-16:openai",
        "online")
    assert rise.augmentation.scale == (0.8, 1.0) and rise.augmentation.hue == 0.4
    for method in ("erm", "kd", "psd", "scmd", "rise", "vl2v"):
        config = paper(method)
        assert config.recipe == "paper" and config.overrides == []
        for name, setting in settings("paper", method).items():
            assert getattr(config, name) == setting.value
            assert setting.source  # every value says where it comes from


def test_fast_recipe_is_the_defaults_of_before():
    for method in ("erm", "kd", "scmd", "rise", "vl2v", "psd"):
        fast = train_config("fast", {**BASE, "method": method})
        assert fast == TrainConfig(**BASE, method=method, teacher=fast.teacher)
        assert values(fast, "optimizer", "lr", "batch_size", "steps", "schedule") == (
            "adamw", 3e-4, 96, 3000, "cosine")


def test_explicit_options_override_the_recipe_and_are_recorded():
    scmd = paper("scmd", lr=1e-4, average="none", teacher_mode="cached")
    assert values(scmd, "lr", "average", "teacher_mode", "optimizer") == (
        1e-4, "none", "cached", "adam")
    assert scmd.overrides == ["average", "lr", "teacher_mode"]
    rise = paper("rise", steps=40, batch_size=16)
    assert values(rise, "steps", "epochs", "batch_size") == (40, None, 16)
    assert rise.overrides == ["batch_size", "steps"]
    erm = paper("erm", batch_size=10)
    assert erm.batch_per_domain is None and erm.for_data(3, 100).batch_size == 10
    with pytest.raises(DgkitError, match="--recipe 'slow' is not one of: paper, fast"):
        train_config("slow", {**BASE})


def test_batch_and_epochs_resolve_against_the_data():
    erm = paper("erm").for_data(sources=3, train_images=1000)
    assert (erm.batch_size, erm.steps) == (96, 5001)
    rise = paper("rise").for_data(sources=3, train_images=6400)
    assert (rise.batch_size, rise.steps) == (128, 1000)  # 20 epochs of 6400 at 128
    odd = paper("rise").for_data(sources=3, train_images=6401)
    assert odd.steps == math.ceil(20 * 6401 / 128)


def test_step_schedule_drops_at_the_recipe_fractions():
    from dgkit.distill.trainer import lr_factor

    config = TrainConfig(**BASE, schedule="step", lr_drops=[0.8], warmup_steps=0, steps=100)
    assert [lr_factor(config, s) for s in (0, 79)] == [1.0, 1.0]
    assert lr_factor(config, 80) == pytest.approx(0.1) == lr_factor(config, 99)
    # a stage restarts the schedule: steps 100-199 of a 200-step run with stages at 0 and 100
    config = TrainConfig(**BASE, schedule="cosine", warmup_steps=0, steps=200)
    assert lr_factor(config, 100, 100, 200) == 1.0 == lr_factor(config, 0, 0, 100)


def test_cli_paper_recipe_is_recorded_in_run_json(tiny_domains, tmp_path):
    out = tmp_path / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--student",
          "timm:test_resnet", "--image-size", "32", "--student-weights", "none", "--quiet",
          "--steps", "2", "--eval-every", "1", "--batch-per-domain", "4", "--lr", "1e-4",
          "--out", out, check=True)
    train = json.loads((out / "run.json").read_text())["train"]
    assert train["recipe"] == "paper"
    assert train["overrides"] == ["batch_per_domain", "eval_every", "lr", "steps"]
    assert (train["optimizer"], train["lr"], train["weight_decay"], train["augment"]) == (
        "adam", 1e-4, 0.0, "domainbed")
    assert (train["batch_size"], train["steps"]) == (8, 2)  # 4 from each of 2 source domains


def test_cli_epochs_set_the_steps(tiny_domains, tmp_path):
    out = tmp_path / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--student",
          "timm:test_resnet", "--image-size", "32", "--student-weights", "none", "--quiet",
          "--recipe", "fast", "--epochs", "1.5", "--batch-size", "5", "--out", out, check=True)
    train = json.loads((out / "run.json").read_text())["train"]
    # 2 source domains x 3 classes x 8 images, 80 % of each domain for training: 2 x 19
    assert train["steps"] == math.ceil(1.5 * 38 / 5) and train["epochs"] == 1.5


def test_fast_recipe_trains_exactly_as_before_recipes(tiny_domains, tmp_path):
    """The metrics of dgkit before recipes existed, on the same data and options."""
    reference = json.loads((FIXTURES / "fast_recipe_metrics.json").read_text())["metrics"]
    for method, rows in reference.items():
        out = tmp_path / method
        dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--method", method,
              "--recipe", "fast", "--student", "timm:test_resnet", "--steps", "6",
              "--eval-every", "3", "--image-size", "32", "--student-weights", "none",
              "--batch-size", "12", "--quiet", "--out", out, check=True)
        got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == [r["step"] for r in rows]
        for new, old in zip(got, rows, strict=True):
            assert new["source_val_loss_mean"] == pytest.approx(old["source_val_loss_mean"],
                                                                rel=1e-4)
            assert new["losses"] == pytest.approx(old["losses"], rel=1e-4)
            assert new["lr"] == pytest.approx(old["lr"])
            assert new["target_mean"] == old["target_mean"]


def test_methods_command_prints_the_recipe_with_sources():
    proc = dgkit("methods", "scmd", check=True)
    out = " ".join(proc.stdout.split())
    for text in ("--average", "sma", "SeanLeng1/SCMD", "5e-05", "ViT-B-32:openai",
                 "--logit-scale-lr", "0.0001"):
        assert text in out, text
    fast = " ".join(dgkit("methods", "rise", "--recipe", "fast", check=True).stdout.split())
    assert "dgkit's fast recipe" in fast and "adamw" in fast
    assert "unknown method 'nope'" in error_line(dgkit("methods", "nope"))


def test_vl2v_refuses_steps(tiny_domains, tmp_path, tiny_teacher):
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--method", "vl2v",
                 "--teacher", tiny_teacher, "--steps", "5", "--out", tmp_path / "r")
    assert "--steps does not apply to --method vl2v" in error_line(proc)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- VL2V's two stages
def vl2v_config(data, teacher, **kw) -> TrainConfig:
    base = dict(data=str(data), targets=["sketch"], method="vl2v", teacher=teacher,
                hparams={"align_steps": 4, "distill_steps": 6}, student="timm:test_resnet",
                student_weights="none", steps=10, batch_size=12, image_size=32, eval_every=2,
                lr=1e-3, teacher_mode="online")
    return TrainConfig(**{**base, **kw})


def scripted_accuracy(monkeypatch, accuracy: list[float]) -> None:
    """The source-validation accuracy model selection sees at each evaluation, in turn."""
    from dgkit.distill.trainer import Trainer

    original, scores = Trainer._measure, iter(accuracy)

    def measure(self, prep, model):
        return {**original(self, prep, model), "source_val_mean": next(scores)}

    monkeypatch.setattr(Trainer, "_measure", measure)


def test_vl2v_stage_two_starts_from_stage_one_best_with_fresh_optimiser(
        tiny_domains, tiny_teacher, tmp_path, monkeypatch):
    from test_averaging import new_run, record_steps

    from dgkit.distill.trainer import Trainer

    weights = record_steps(monkeypatch)
    # stage 1 is best at step 2; stage 2's steps score lower than stage 1's best
    scripted_accuracy(monkeypatch, [90.0, 50.0, 20.0, 30.0, 10.0])  # steps 2, 4, ..., 10
    seen = {}
    original = Trainer._begin_stage

    def begin_stage(self, s, state, step):
        original(self, s, state, step)
        seen["weights"] = {k: v.detach().clone() for k, v in s.student.state_dict().items()}
        seen["optimizer_state"] = len(s.optimizer.state)
        seen["best"] = state["best"]

    monkeypatch.setattr(Trainer, "_begin_stage", begin_stage)
    run = new_run(tmp_path, "vl2v")
    Trainer(vl2v_config(tiny_domains, tiny_teacher), run, quiet=True).train()
    start = seen["weights"]
    for key, value in weights[2].items():  # stage 1's best, not its last step (4)
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(start[key], value), key
    assert any(not torch.equal(weights[4][k], weights[2][k]) for k in weights[2])
    assert seen["optimizer_state"] == 0 and seen["best"] is None
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["best_step"] == 8  # the best of stage 2 alone, though step 2 scored higher
    exported = load_file(str(run.student))
    assert all(torch.equal(exported[k], weights[8][k].float()) for k in exported)


def test_vl2v_swad_exports_a_stage_two_average(tiny_domains, tiny_teacher, tmp_path,
                                               monkeypatch):
    from test_averaging import assert_state, mean_of, new_run, record_steps

    from dgkit.distill.trainer import Trainer

    weights = record_steps(monkeypatch)
    run = new_run(tmp_path, "swad")
    cfg = vl2v_config(tiny_domains, tiny_teacher, average="swad", eval_every=1,
                      swad_n_converge=1, swad_n_tolerance=20, swad_bn_batches=0)
    Trainer(cfg, run, quiet=True).train()
    summary = json.loads((run.path / "summary.json").read_text())
    first, last = (int(s) for s in summary["selection"].split("steps ")[1].split(",")[0]
                   .split("-"))
    assert first > 4 and last == 10  # a window inside stage 2 (steps 5-10)
    assert_state(load_file(str(run.student)), mean_of([weights[t] for t in range(first, 11)]))


@pytest.mark.parametrize("killed_at", [5, 7])  # last checkpoint: the stage boundary; stage 2
def test_vl2v_resumes_across_stages_exactly(tiny_domains, tiny_teacher, tmp_path, monkeypatch,
                                            killed_at):
    from test_averaging import kill_at, new_run

    from dgkit.distill.trainer import Trainer

    cfg = lambda: vl2v_config(tiny_domains, tiny_teacher, checkpoint_every=2,  # noqa: E731
                              average="swad", swad_bn_batches=1)
    Trainer(cfg(), whole := new_run(tmp_path, "whole"), quiet=True).train()
    revive = kill_at(monkeypatch, "vl2v", killed_at)
    run = new_run(tmp_path, "killed")
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg(), run, quiet=True).train()
    assert torch.load(run.checkpoint, weights_only=True)["step"] == killed_at - 1
    revive()
    Trainer(cfg(), run, quiet=True).train(resume=True)
    assert run.student.read_bytes() == whole.student.read_bytes()
    assert (run.path / "summary.json").read_text() == (whole.path / "summary.json").read_text()


def test_scmd_logit_scale_has_its_own_learning_rate(tiny_domains, tiny_teacher, tmp_path):
    from test_averaging import new_run

    from dgkit.distill.trainer import Trainer

    cfg = TrainConfig(data=str(tiny_domains), targets=["sketch"], method="scmd",
                      teacher=tiny_teacher, student="timm:test_resnet", student_weights="none",
                      steps=2, batch_size=6, image_size=32, lr=5e-5, weight_decay=0.1)
    trainer = Trainer(cfg, new_run(tmp_path, "scmd"), quiet=True)
    s = trainer.setup(trainer.prepare())
    main, own = s.optimizer.param_groups
    assert own["params"] == [s.method.logit_scale] and own["base_lr"] == 1e-4
    assert own["weight_decay"] == 0.0 and main["weight_decay"] == 0.1
    assert main["base_lr"] == 5e-5
    assert all(p is not s.method.logit_scale for p in main["params"])
    assert len(main["params"]) + 1 == len(s.params)


@pytest.mark.parametrize("method", ["kd", "rise", "scmd", "psd"])
def test_swad_works_for_every_method(method, tiny_domains, tiny_teacher, tmp_path):
    from test_averaging import new_run

    from dgkit.distill.trainer import Trainer

    cfg = TrainConfig(data=str(tiny_domains), targets=["sketch"], method=method,
                      teacher=tiny_teacher, student="timm:test_resnet", student_weights="none",
                      steps=4, batch_size=6, image_size=32, eval_every=1, average="swad",
                      swad_n_converge=1, swad_bn_batches=1)
    summary = Trainer(cfg, new_run(tmp_path, method), quiet=True).train()
    assert summary.finished and summary.selection.startswith("SWAD")
