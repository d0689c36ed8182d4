"""A teacher whose zero-shot accuracy is at chance is named so: the verdict against an exact
binomial test worked out here, in distill's output and in the demo's teacher column."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from cli_helpers import TINY, dgkit
from data_helpers import write_dataset

from dgkit.data import at_chance, discover
from dgkit.rundir import RunDir


def exact_at_chance(accuracy: dict[str, float], root: Path) -> bool:
    """No domain's hits are significant (P < 1 %) against always answering its commonest
    class: the exact binomial tail, summed here."""
    data = discover(root)
    counts = data.counts()
    for domain, acc in accuracy.items():
        row = counts[data.domains.index(domain)]
        n, p = int(row.sum()), row.max() / row.sum()
        hits = round(acc * n / 100)
        tail = sum(math.comb(n, k) * p**k * (1 - p)**(n - k) for k in range(hits, n + 1))
        if tail < 0.01:
            return False
    return True


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> Path:
    """100 images a domain: 'even' has 4 classes of 25, 'skewed' 60, 20, 10 and 10."""
    sizes = {"even": (25, 25, 25, 25), "skewed": (60, 20, 10, 10)}
    return write_dataset(tmp_path_factory.mktemp("chance") / "data", {
        domain: {f"c{k}": n for k, n in enumerate(per)} for domain, per in sizes.items()})


@pytest.mark.parametrize("accuracy, chance", [
    ({"even": 25.0, "skewed": 60.0}, True),  # a constant guess of the commonest class
    ({"even": 30.0, "skewed": 65.0}, True),  # a little above it, as a random teacher may be
    ({"even": 45.0, "skewed": 60.0}, False),  # one domain clearly above: it learnt something
    ({"even": 25.0, "skewed": 80.0}, False),
    ({"even": 90.0, "skewed": 95.0}, False),
])
def test_verdict_matches_the_exact_binomial_test(counted, accuracy, chance):
    assert exact_at_chance(accuracy, counted) == chance
    assert at_chance(accuracy, counted) == chance


def test_no_verdict_without_accuracy_or_data(counted, tmp_path):
    assert at_chance({"even": 25.0, "skewed": 60.0}, counted)
    assert not at_chance(None, counted) and not at_chance({}, counted)
    assert not at_chance({"elsewhere": 25.0}, counted)  # a domain the data no longer has
    assert not at_chance({"even": 25.0}, tmp_path / "gone")


@pytest.fixture(scope="module")
def random_teacher_run(tiny_domains, tiny_teacher, tmp_path_factory):
    """A KD run with the random tiny CLIP teacher, and what dgkit distill printed."""
    out = tmp_path_factory.mktemp("chance_run") / "kd"
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--method", "kd",
                 "--teacher", tiny_teacher, "--steps", "2", "--eval-every", "2", "--out", out,
                 *TINY, check=True)
    return out, proc


def test_distill_names_a_teacher_at_chance(random_teacher_run, tiny_domains, capsys):
    from dgkit.distill.commands import _print_summary

    out, proc = random_teacher_run
    zero_shot = json.loads((out / "summary.json").read_text())["teacher_zero_shot_accuracy"]
    assert exact_at_chance(zero_shot, tiny_domains)  # random weights: at chance
    shown = ", ".join(f"{d} {a:.1f}" for d, a in zero_shot.items())
    assert (f"teacher zero-shot: {shown} at chance: no better than always answering one class"
            in " ".join(proc.stderr.split()))
    # the same run, had its teacher known the classes: no such words
    summary = RunDir(out).summary()
    knowing = dataclasses.replace(summary, teacher_zero_shot_accuracy={
        d: 95.0 for d in zero_shot})
    assert not exact_at_chance(knowing.teacher_zero_shot_accuracy, tiny_domains)
    _print_summary(knowing, out)
    said = " ".join(capsys.readouterr().err.split())
    assert "teacher zero-shot: cartoon 95.0, photo 95.0, sketch 95.0" in said
    assert "at chance" not in said


def test_demo_teacher_column_says_at_chance(random_teacher_run, tiny_domains, tmp_path):
    pytest.importorskip("gradio", reason="needs the 'demo' extra")
    from dgkit.demo.app import build_app, teacher_notes
    from dgkit.demo.models import run_info

    out, _ = random_teacher_run
    page = json.dumps(build_app(out).get_config_file(), default=str)  # the model card
    assert "**Teacher** (CLIP, at chance, plumbing check)" in page
    run = RunDir(out)
    config, summary = run.config(), run.summary()
    assert teacher_notes(run_info(run, config, summary)) == ["at chance", "plumbing check"]
    knowing = dataclasses.replace(summary, teacher_zero_shot_accuracy={
        d: 95.0 for d in summary.teacher_zero_shot_accuracy})
    assert teacher_notes(run_info(run, config, knowing)) == ["plumbing check"]
    # the data gone (a demo on another machine): no verdict rather than a guess
    moved = dataclasses.replace(config, data_root=str(tmp_path / "elsewhere"))
    assert teacher_notes(run_info(run, moved, summary)) == ["plumbing check"]
    shutil.copytree(tiny_domains, tmp_path / "elsewhere")
    assert teacher_notes(run_info(run, moved, summary)) == ["at chance", "plumbing check"]
