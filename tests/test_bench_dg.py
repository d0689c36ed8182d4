"""`dgkit bench dg`: leave-one-domain-out for 2 methods x 2 seeds on the tiny domains, the
DomainBed table it writes, and a second invocation that reuses the finished runs."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from typer.testing import CliRunner

from dgkit.distill.bench_dg import markdown, table_row
from dgkit.errors import DgkitError


@pytest.mark.slow
def test_bench_dg_writes_the_table_and_reuses_runs(domains_copy, tiny_teacher, tmp_path,
                                                   monkeypatch):
    from dgkit.cli import app
    from dgkit.distill.trainer import Trainer

    shutil.rmtree(domains_copy / "photo")  # two domains: cartoon, sketch
    out = tmp_path / "bench"
    args = ["bench", "dg", "--data", str(domains_copy), "--methods", "erm,kd", "--seeds", "2",
            "--teacher", tiny_teacher, "--student", "timm:test_resnet", "--student-weights",
            "none", "--image-size", "32", "--batch-size", "6", "--steps", "2", "--out", str(out),
            "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    table = json.loads((out / "dg_table.json").read_text())
    assert table["domains"] == ["cartoon", "sketch"]
    assert table["methods"] == ["erm", "kd"] and table["seeds"] == [0, 1]
    for method in ("erm", "kd"):
        row = table["results"][method]
        per_seed = {}
        for seed in (0, 1):
            for domain in ("cartoon", "sketch"):
                run = out / "runs" / f"{method}-seed{seed}-{domain}"
                assert table["runs"][method][str(seed)][domain] == str(run)
                summary = json.loads((run / "summary.json").read_text())
                assert summary["finished"] is True
                config = json.loads((run / "run.json").read_text())["train"]
                assert (config["method"], config["seed"], config["targets"]) == (
                    method, seed, [domain])
                per_seed.setdefault(seed, {})[domain] = summary["target_accuracy"][domain]
        for domain in ("cartoon", "sketch"):
            values = [per_seed[s][domain] for s in (0, 1)]
            cell = row["target_accuracy"][domain]
            assert cell["per_seed"] == values
            assert cell["mean"] == pytest.approx(statistics.fmean(values))
            assert cell["std"] == pytest.approx(statistics.stdev(values))
        averages = [statistics.fmean(per_seed[s].values()) for s in (0, 1)]
        assert row["average"]["mean"] == pytest.approx(statistics.fmean(averages))
    markdown = (out / "dg_table.md").read_text()
    assert "| Method | cartoon | sketch | Avg |" in markdown
    kd = table["results"]["kd"]
    assert (f"| kd | {kd['target_accuracy']['cartoon']['mean']:.1f} ± "
            f"{kd['target_accuracy']['cartoon']['std']:.1f} |") in markdown
    assert "Plumbing check" in markdown  # the tiny teacher has no published weights

    # Again: every finished run is reused; one whose summary says unfinished is trained again.
    summary_path = out / "runs" / "erm-seed1-sketch" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps(dict(summary, finished=False)))
    trained = []
    original = Trainer.train

    def counting_train(self, resume=False):
        trained.append((self.config.method, self.config.seed, self.config.targets))
        return original(self, resume)

    monkeypatch.setattr(Trainer, "train", counting_train)
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert trained == [("erm", 1, ["sketch"])]
    assert json.loads(summary_path.read_text())["finished"] is True
    again = json.loads((out / "dg_table.json").read_text())
    assert again["results"]["kd"] == table["results"]["kd"]

    # Another --data-store trains the same weights: the finished runs are reused.
    result = CliRunner().invoke(app, [*args, "--data-store", "disk"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert trained == [("erm", 1, ["sketch"])]

    # A run directory made with other settings is refused, not reused.
    longer = list(args)
    longer[args.index("--steps") + 1] = "3"
    with pytest.raises(DgkitError, match="other settings"):
        CliRunner().invoke(app, longer, catch_exceptions=False)
    assert trained == [("erm", 1, ["sketch"])]


def test_method_options_reach_only_their_method():
    from dgkit.distill.bench_dg import _options_by_method
    from dgkit.errors import DgkitError

    got = _options_by_method("kd,vl2v", ["--vl2v-align-steps", "50", "--kd-temperature=4"])
    assert got == {"kd": {"temperature": "4"}, "vl2v": {"align_steps": "50"}}
    with pytest.raises(DgkitError, match="--rise-anchors names none of --methods"):
        _options_by_method("kd", ["--rise-anchors", "quality"])


def test_where_the_images_live_does_not_make_a_run_differ(tmp_path) -> None:
    import dataclasses
    from types import SimpleNamespace

    from dgkit.distill.bench_dg import _check_same
    from dgkit.train_config import TrainConfig

    @dataclasses.dataclass
    class NoHparams:
        pass

    def check(wanted: TrainConfig, stored: TrainConfig) -> None:
        trainer = SimpleNamespace(run_config=lambda: SimpleNamespace(train=wanted),
                                  hparams=NoHparams())
        _check_same(trainer, SimpleNamespace(config=lambda: SimpleNamespace(train=stored),
                                             path=tmp_path))

    stored = TrainConfig(data="d", targets=["sketch"])  # --data-store memory
    check(TrainConfig(data="d", targets=["sketch"], data_store="disk"), stored)
    check(TrainConfig(data="d", targets=["sketch"], data_store="auto", memory_budget=2.0), stored)
    with pytest.raises(DgkitError, match=r"other settings \(steps\)"):
        check(TrainConfig(data="d", targets=["sketch"], data_store="disk", steps=5), stored)


def test_data_store_options_reach_every_run(domains_copy, tmp_path, monkeypatch) -> None:
    from dgkit.cli import app
    from dgkit.distill import bench_dg

    seen = []

    def fake_run_one(config, path, root, quiet):
        seen.append((config["data_store"], config["memory_budget"]))
        raise DgkitError("stop here")

    monkeypatch.setattr(bench_dg, "run_one", fake_run_one)
    result = CliRunner().invoke(app, [
        "bench", "dg", "--data", str(domains_copy), "--methods", "erm", "--seeds", "1",
        "--data-store", "auto", "--memory-budget", "0.5", "--out", str(tmp_path / "b")])
    assert isinstance(result.exception, DgkitError), result.output
    assert seen == [("auto", 0.5)]


def test_one_seed_shows_no_spread() -> None:
    row = table_row({0: {"cartoon": 70.0, "sketch": 60.0}}, ["cartoon", "sketch"])
    assert row["average"] == {"mean": 65.0, "std": None, "per_seed": [65.0]}
    result = {"domains": ["cartoon", "sketch"], "methods": ["erm"], "seeds": [0],
              "results": {"erm": row}, "plumbing_check": False, "data": "d",
              "settings": {"student": "s", "student_weights": "none", "teacher": None,
                           "steps": 1, "batch_size": 1, "image_size": 32}}
    assert "| erm | 70.0 | 60.0 | 65.0 |" in markdown(result)


def test_rise_grids_are_the_authors_per_dataset():
    from pathlib import Path

    from dgkit.distill.bench_dg import grid_points

    def combos(points):
        return {(p["distill_weight"], p["ce_weight"], p["distance_weight"]) for p in points}

    pacs_like = {(kd, ce, d) for kd, ce in ((0.9, 0.1), (0.8, 0.2)) for d in (0.5, 1.0, 2.0)}
    for folder, grid, expected in (
            ("PACS", "PACS", pacs_like), ("vlcs", "VLCS", pacs_like),
            ("office_home", "OfficeHome",
             {(kd, ce, d) for kd, ce in ((0.2, 0.8), (0.1, 0.9)) for d in (0.5, 1.0, 2.0)}),
            ("TerraIncognita", "TerraIncognita",
             {(kd, ce, d) for kd, ce in ((0.2, 0.8), (0.3, 0.7)) for d in (0.5, 1.0, 2.0)}),
            ("mydomains", "other datasets", pacs_like)):
        name, points = grid_points("rise", Path("/data") / folder)
        assert name == grid and len(points) == 6 and combos(points) == expected
    assert grid_points("erm", Path("/data/PACS")) == ("other datasets", ({},))


@pytest.mark.slow
def test_bench_dg_grid_keeps_the_best_source_validation_point(domains_copy, tiny_teacher,
                                                               tmp_path, monkeypatch):
    from dgkit.cli import app
    from dgkit.distill.methods import get_method

    shutil.rmtree(domains_copy / "photo")  # two domains: cartoon, sketch
    points = ({"distill_weight": 0.9, "ce_weight": 0.1, "distance_weight": 1.0},
              {"distill_weight": 0.0, "ce_weight": 1.0, "distance_weight": 0.0})
    monkeypatch.setattr(get_method("rise"), "grids", {"": points})
    out = tmp_path / "bench"
    args = ["bench", "dg", "--data", str(domains_copy), "--methods", "rise", "--seeds", "1",
            "--grid", "--teacher", tiny_teacher, "--student", "timm:test_resnet",
            "--student-weights", "none", "--image-size", "32", "--batch-size", "6", "--steps",
            "3", "--lr", "1e-2", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "dg_table.json").read_text())
    assert table["grids"]["rise"]["grid"] == "other datasets"
    for domain in ("cartoon", "sketch"):
        summaries = [json.loads((out / "runs" / f"rise-grid{k}-seed0-{domain}" / "summary.json")
                                .read_text()) for k in (0, 1)]
        hparams = [json.loads((out / "runs" / f"rise-grid{k}-seed0-{domain}" / "run.json")
                              .read_text())["train"]["hparams"] for k in (0, 1)]
        assert [h["ce_weight"] for h in hparams] == [0.1, 1.0]
        vals = [s["source_val_accuracy_mean"] for s in summaries]
        best = 0 if vals[0] >= vals[1] else 1  # ties keep the first point, as a stable sort
        assert table["grids"]["rise"]["chosen"]["0"][domain] == best
        cell = table["results"]["rise"]["target_accuracy"][domain]
        assert cell["per_seed"] == [summaries[best]["target_accuracy"][domain]]
    assert "the authors' grid for other datasets (2 points)" in (out / "dg_table.md").read_text()
