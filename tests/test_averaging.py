"""SMA and SWAD (`--average sma|swad`): each checked against a computation by hand, the SWAD
window on hand-made validation losses, the BatchNorm refresh, and an exact resume mid-SWAD."""

from __future__ import annotations

import inspect
import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from dgkit.distill.averaging import SMA, SWAD, LossValley, refresh_batchnorm
from dgkit.errors import DgkitError
from dgkit.train_config import TrainConfig, train_default

# ---------------------------------------------------------------------- the window, by hand
# (losses, n_converge, n_tolerance, ratio) -> (segments averaged, valley dead, evaluations seen)
VALLEYS = {
    # c = 4 (1.0 <= 1.1, 1.2: known at evaluation 6), T = 1.3 * 1.1 = 1.43; no look-back (the
    # loss 2 at evaluation 3, where segment 4 begins, is above T); 1.4 <= T is the last one in,
    # the 1.5, 1.6 after it are still open when training ends, so left out.
    "valley": ([5, 4, 3, 2, 1, 1.1, 1.2, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6], 3, 6, 0.3,
               list(range(4, 12)), False, 14),
    # the same valley, then six losses of 2 > 1.43 in a row: dead at evaluation 14
    "dead": ([5, 4, 3, 2, 1, 1.1, 1.2, 1.0, 1.1, 2, 2, 2, 2, 2, 2, 2, 2], 3, 6, 0.3,
             list(range(4, 9)), True, 15),
    # c = 10 (2.0), T = 1.3 * 2.1 = 2.73; look-back up to n_tolerance - n_converge = 3 segments,
    # the first of which is never taken (its beginning lies outside): segments 8 and 9 (losses
    # 2.3, 2.2, 2.1 at their ends and beginnings <= T); the end: 2.7 at evaluation 17.
    "look-back": ([3.0 - 0.1 * i for i in range(11)] + [2.0 + 0.1 * i for i in range(1, 12)],
                  3, 6, 0.3, list(range(8, 18)), False, 22),
    # c = 0 at once, T = 1.3 * 2 = 2.6; 3 > T at evaluation 2 waits for 0.5 at 3, which takes it
    # in; then six losses of 3: dead. Each segment once (the authors' queues add segment 0 three
    # times here).
    "early": ([1, 2, 3, 0.5] + [3] * 8, 3, 6, 0.3, [0, 1, 2, 3], True, 10),
    # n_tolerance < n_converge: c = 2, T = 1.5 * 1.1 = 1.65; 2 > T twice ends it
    "short tolerance": ([3, 2, 1, 1.2, 2, 1.4, 2, 2, 2, 2], 2, 2, 0.5, [2, 3, 4, 5], True, 8),
    # never a minimum followed by n_converge - 1 higher losses: nothing chosen
    "no convergence": ([5, 4, 3, 2, 1, 0.5], 3, 6, 0.3, [], False, 6),
}


@pytest.mark.parametrize("name", list(VALLEYS))
def test_loss_valley_window_on_hand_made_losses(name):
    losses, n_conv, n_tol, ratio, window, dead, seen = VALLEYS[name]
    valley = LossValley(n_conv, n_tol, ratio)
    joined = []
    for loss in losses:
        joined += valley.observe(loss)
        if valley.dead:
            break
        # what must be kept: the pending run, or the segments a later convergence may reach
        assert len(valley.losses) - valley.first_needed() <= max(n_tol, n_conv)
    assert joined == window
    assert valley.dead is dead and len(valley.losses) == seen
    if window:
        assert (valley.start, valley.end) == (window[0], window[-1])
    else:
        assert valley.threshold is None


def test_loss_valley_threshold_and_convergence_step():
    valley = LossValley(3, 6, 0.3)
    for loss in [5, 4, 3, 2, 1, 1.1]:
        assert valley.observe(loss) == []
    valley.observe(1.2)
    assert valley.converged == 4
    assert valley.threshold == pytest.approx(1.3 * (1 + 1.1 + 1.2) / 3)


# ---------------------------------------------------------------------- accumulators, by hand
def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def set_random_state(model: nn.Module, gen: torch.Generator, step: int) -> dict:
    """Give the model new weights and BatchNorm statistics, as a step would; return a copy."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen))
            else:
                t.fill_(step)
    return {k: v.clone() for k, v in model.state_dict().items()}


def mean_of(states: list[dict]) -> dict:
    return {k: torch.stack([s[k].double() for s in states]).mean(0).float()
            for k in states[0] if states[0][k].is_floating_point()}


def assert_state(got: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert_close(got[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("start", [4, 1])
def test_sma_averages_every_step_from_the_step_before_start(start):
    """MovingAvg from start_iter: w_{start-1}, ..., w_t uniformly (w_0, the initial copy, when
    start <= 1); before start, the current weights."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_net()
    weights = [{k: v.clone() for k, v in model.state_dict().items()}]  # w_0
    sma = SMA(model, start)
    for t in range(1, 11):
        weights.append(set_random_state(model, gen, t))
        sma.update(model, t - 1)
        first = max(start - 1, 0) if t >= start else t
        assert_state(sma.module.state_dict(), mean_of(weights[first:t + 1]))
        assert sma.module.state_dict()["1.num_batches_tracked"].item() == t


def moving_avg_as_scmd_writes_it(weights: list[dict], start_iter: int) -> dict:
    """SCMD's MovingAvg.update_sma, restated on dicts of tensors."""
    sma, sma_count = dict(weights[0]), 0
    for global_iter, w in enumerate(weights[1:], start=1):
        if global_iter >= start_iter:
            sma_count += 1
            sma = {k: (sma[k] * sma_count + w[k]) / (1.0 + sma_count) for k in sma}
        else:
            sma = dict(w)
    return sma


def test_sma_matches_scmd_recurrence():
    gen = torch.Generator().manual_seed(1)
    model = tiny_net()
    weights = [{k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}]
    sma = SMA(model, 300)
    for t in range(1, 320):
        weights.append({k: v for k, v in set_random_state(model, gen, t).items()
                        if v.is_floating_point()})
        sma.update(model, t - 1)
    assert_state(sma.module.state_dict(), moving_avg_as_scmd_writes_it(weights, 300))


def run_swad(losses, lengths, n_conv=3, n_tol=6, ratio=0.3, restart_after=None):
    """Feed random step weights in segments of `lengths` steps, each closed by its loss; with
    `restart_after`, carry the state through torch.save/load into a new SWAD at that point."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_net()
    swad = SWAD(LossValley(n_conv, n_tol, ratio))
    weights, steps = {}, 0
    for loss, n in zip(losses, lengths, strict=True):
        for _ in range(n):
            steps += 1
            weights[steps] = set_random_state(model, gen, steps)
            swad.update(model, steps - 1)
            if restart_after == steps:
                saved = io.BytesIO()
                torch.save(swad.state_dict(), saved)
                saved.seek(0)
                swad = SWAD(LossValley(n_conv, n_tol, ratio))
                swad.load_state_dict(torch.load(saved, weights_only=True))
        swad.evaluated(loss)
        assert len(swad.closed) <= max(n_tol - 1, n_conv) + 1
        if swad.dead:
            break
    return swad, weights


def segment_steps(lengths, segments):
    ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
    return [s for j in segments for s in range(ends[j] - lengths[j] + 1, ends[j] + 1)]


@pytest.mark.parametrize("name", ["valley", "dead", "look-back", "early"])
def test_swad_average_is_the_mean_of_every_step_in_the_window(name):
    losses, n_conv, n_tol, ratio, window, _, _ = VALLEYS[name]
    lengths = [2 + (i % 3) for i in range(len(losses))]  # segments of 2, 3 and 4 steps
    swad, weights = run_swad(losses, lengths, n_conv, n_tol, ratio)
    steps = segment_steps(lengths, window)
    mean = swad.result()
    assert (mean.first, mean.last, mean.count) == (steps[0], steps[-1], len(steps))
    assert_state(mean.state, mean_of([weights[s] for s in steps]))
    assert mean.state["1.num_batches_tracked"].item() == steps[-1]


def test_swad_without_convergence_keeps_the_last_segment():
    lengths = [3] * 6
    swad, weights = run_swad(VALLEYS["no convergence"][0], lengths)
    steps = segment_steps(lengths, [5])
    assert_state(swad.result().state, mean_of([weights[s] for s in steps]))


def test_swad_state_survives_a_checkpoint_mid_segment():
    losses = VALLEYS["look-back"][0]
    lengths = [3] * len(losses)
    whole, _ = run_swad(losses, lengths)
    for at in (7, 35, 40, 56):  # before convergence, with a pending run, inside the valley
        resumed, _ = run_swad(losses, lengths, restart_after=at)
        a, b = whole.result(), resumed.result()
        assert (a.first, a.last, a.count) == (b.first, b.last, b.count)
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


# ---------------------------------------------------------------------- BatchNorm refresh
def test_refresh_batchnorm_recomputes_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    frozen = {k: v.clone() for k, v in model[4].state_dict().items()}
    model.eval()
    batches = [torch.randn(5, 3, 6, 6) for _ in range(4)]
    refresh_batchnorm(model, iter(batches), names={"1"})  # layer "4" frozen by the method
    with torch.no_grad():
        z = [model[0](x) for x in batches]
    means = torch.stack([t.mean((0, 2, 3)) for t in z])
    variances = torch.stack([t.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for t in z])
    bn = model[1]
    assert_close(bn.running_mean, means.mean(0))  # momentum None: the plain average
    assert_close(bn.running_var, variances.mean(0))
    assert bn.num_batches_tracked.item() == 4 and bn.momentum == 0.3
    assert all(torch.equal(frozen[k], v) for k, v in model[4].state_dict().items())
    assert not model.training


# ---------------------------------------------------------------------- the trainer
def config(data, **kw) -> TrainConfig:
    base = dict(data=str(data), targets=["sketch"], student="timm:test_resnet",
                student_weights="none", steps=8, batch_size=24, image_size=32, eval_every=4,
                lr=1e-3)
    return TrainConfig(**{**base, **kw})


def new_run(tmp_path, name):
    from dgkit.rundir import RunDir

    (tmp_path / name).mkdir()
    return RunDir(tmp_path / name)


def record_steps(monkeypatch) -> dict[int, dict]:
    """Weights after each optimiser step (1-based), as the trainer makes them."""
    from dgkit.distill.trainer import Trainer

    weights: dict[int, dict] = {}
    original = Trainer.step

    def step(self, s, index):
        terms = original(self, s, index)
        weights[index + 1] = {k: v.detach().clone() for k, v in s.student.state_dict().items()}
        return terms

    monkeypatch.setattr(Trainer, "step", step)
    return weights


def test_trainer_sma_exports_the_average_at_the_selected_step(tiny_domains, tmp_path,
                                                              monkeypatch):
    from dgkit.distill.trainer import Trainer

    weights = record_steps(monkeypatch)
    run = new_run(tmp_path, "sma")
    Trainer(config(tiny_domains, average="sma", sma_start=3), run, quiet=True).train()
    summary = json.loads((run.path / "summary.json").read_text())
    best = summary["best_step"]
    exported = load_file(str(run.student))
    assert_state(exported, mean_of([weights[t] for t in range(2, best + 1)]))
    assert "SWAD" not in summary["selection"]


def kill_at(monkeypatch, method: str, step: int):
    """Make training die as step `step` begins, as a killed process would; returns the undo."""
    from dgkit.distill.methods import get_method

    cls = get_method(method)
    original = cls.set_trainable

    def killed(self, student, index):
        if index == step:
            raise RuntimeError("killed")
        return original(self, student, index)

    monkeypatch.setattr(cls, "set_trainable", killed)
    return lambda: monkeypatch.setattr(cls, "set_trainable", original)


def scripted_losses(monkeypatch, losses: dict[int, float]) -> None:
    """The validation loss SWAD sees at each evaluation step, whatever the network's."""
    from dgkit.distill.trainer import Trainer

    original = Trainer._evaluate

    def evaluate(self, prep, model, step, *args):
        row = original(self, prep, model, step, *args)
        return {**row, "source_val_loss_mean": losses[step]}

    monkeypatch.setattr(Trainer, "_evaluate", evaluate)


# Evaluations every 2 steps; n_converge 2, n_tolerance 3, ratio 0.5. Losses by evaluation:
# c = 2 (1 <= 1.2), T = 1.5 * 1.1 = 1.65, no look-back (n_tolerance - n_converge = 1); 2 at
# evaluation 4 is taken in by 1.4 at 5; three 2s after it end the valley at evaluation 8 (step
# 18). Segments 2..5 are steps 5..12.
SWAD_LOSSES = dict(zip(range(2, 22, 2), [3, 2, 1, 1.2, 2, 1.4, 2, 2, 2, 2], strict=True))
SWAD_OPTIONS = dict(average="swad", steps=20, eval_every=2, swad_n_converge=2,
                    swad_n_tolerance=3, swad_tolerance_ratio=0.5, swad_bn_batches=3)


def test_trainer_swad_exports_the_window_average_with_fresh_batchnorm(tiny_domains, tmp_path,
                                                                       monkeypatch):
    from dgkit import api
    from dgkit.distill.trainer import Trainer

    weights = record_steps(monkeypatch)
    scripted_losses(monkeypatch, SWAD_LOSSES)
    run = new_run(tmp_path, "swad")
    cfg = config(tiny_domains, **SWAD_OPTIONS)
    Trainer(cfg, run, quiet=True).train()
    assert max(weights) == 18  # the valley died at step 18: training stopped there
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 20, 2))
    assert all(r["source_val_loss_mean"] > 0 for r in rows)
    exported = load_file(str(run.student))
    expected = mean_of([weights[t] for t in range(5, 13)])
    assert_state(exported, {k: v for k, v in expected.items() if "running_" not in k})
    batchnorm = [k for k in exported if k.endswith("num_batches_tracked")]
    assert batchnorm and all(exported[k].item() == 3 for k in batchnorm)  # refreshed on 3
    with safe_open(str(run.student), "pt") as f:
        assert f.metadata() == {"step": "12"}
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["finished"] and summary["best_step"] == 12
    assert summary["selection"].startswith("SWAD") and "steps 5-12" in summary["selection"]
    # the reported target accuracy is the exported average's, measured here independently
    prep = Trainer(cfg, run, quiet=True).prepare()
    student = api.load_student(run.path)
    rows = torch.from_numpy(prep.target_rows["sketch"])
    with torch.no_grad():
        hits = student(prep.pixels[rows].float() / 255.0).argmax(-1) == prep.labels[rows]
    assert summary["target_accuracy"]["sketch"] == pytest.approx(100.0 * hits.float().mean())


def test_resume_mid_swad_matches_an_uninterrupted_run(tiny_domains, tmp_path, monkeypatch):
    """Killed at step 11 (segment 5 half done, segment 4 pending above the threshold), resumed
    from the checkpoint of step 9: the same bytes as a run never stopped."""
    from dgkit.distill.trainer import Trainer

    scripted_losses(monkeypatch, SWAD_LOSSES)
    cfg = lambda: config(tiny_domains, checkpoint_every=3, **SWAD_OPTIONS)  # noqa: E731
    Trainer(cfg(), whole := new_run(tmp_path, "whole"), quiet=True).train()

    revive = kill_at(monkeypatch, "erm", 11)
    run = new_run(tmp_path, "killed")
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg(), run, quiet=True).train()
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 9
    revive()
    Trainer(cfg(), run, quiet=True).train(resume=True)
    assert run.student.read_bytes() == whole.student.read_bytes()
    assert (run.path / "summary.json").read_text() == (whole.path / "summary.json").read_text()
    # every logged number but the speed, the training-loss means too: the checkpoint (step 9)
    # kept the loss sums since the evaluation at step 8
    strip = lambda p: [{k: v for k, v in json.loads(x).items()  # noqa: E731
                        if k != "images_per_s"} for x in p.read_text().splitlines()]
    assert strip(run.metrics) == strip(whole.metrics)


def test_options_are_checked():
    with pytest.raises(DgkitError, match="--average 'swadd' is not one of: .*sma, swad"):
        TrainConfig(data="x", targets=["a"], average="swadd")
    with pytest.raises(DgkitError, match="--swad-n-tolerance must be at least 1"):
        TrainConfig(data="x", targets=["a"], swad_n_tolerance=0)
    with pytest.raises(DgkitError, match="--swad-tolerance-ratio"):
        TrainConfig(data="x", targets=["a"], swad_tolerance_ratio=float("nan"))
    assert TrainConfig(data="x", targets=["a"], average="swad").eval_interval == 60
    assert TrainConfig(data="x", targets=["a"], average="sma").eval_interval == 300


def test_cli_options_reach_the_run(tiny_domains, tmp_path):
    from cli_helpers import TINY, dgkit

    from dgkit.distill.bench_dg import bench_dg

    out = tmp_path / "swad"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--student", "timm:test_resnet",
          "--steps", "4", "--eval-every", "1", "--average", "swad", "--swad-n-converge", "2",
          "--swad-n-tolerance", "2", "--swad-tolerance-ratio", "0.1", "--swad-bn-batches", "2",
          "--sma-start", "7", "--out", out, *TINY, check=True)
    train = json.loads((out / "run.json").read_text())["train"]
    assert {k: train[k] for k in ("average", "sma_start", "swad_n_converge", "swad_n_tolerance",
                                  "swad_tolerance_ratio", "swad_bn_batches")} == {
        "average": "swad", "sma_start": 7, "swad_n_converge": 2, "swad_n_tolerance": 2,
        "swad_tolerance_ratio": 0.1, "swad_bn_batches": 2}
    assert json.loads((out / "summary.json").read_text())["selection"].startswith("SWAD")
    bench = inspect.signature(bench_dg).parameters
    for name in ("swad_n_converge", "swad_n_tolerance", "swad_tolerance_ratio",
                 "swad_bn_batches"):
        assert bench[name].default == train_default(name)
    assert bench["sma_start"].default is None  # the recipe's
