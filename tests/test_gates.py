"""The validation gate on models whose predictions are set image by image: the paired interval
and the Wilson interval against numbers worked out by hand, each check's decision, the notes for
sets too small to resolve a limit, runs without a held-out domain or a reference, the
terminal table at 80 columns, the figures and old reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dgkit.errors import DgkitError
from dgkit.export.commands import Gate
from dgkit.export.formats import TORCH_KEY
from dgkit.export.images import SOURCE_VAL, EvalSet
from dgkit.export.validate import (
    AGREEMENT,
    DROP,
    SOURCE_DROP,
    Candidate,
    build_report,
    confusion_pick,
    evaluate,
    markdown,
    notes,
    paired_drop_interval,
    print_table,
    terminal_width,
    wilson_interval,
    write_report,
)
from dgkit.records import ValidationReport

CLASSES = ["circle", "square", "triangle"]
FIXTURES = Path(__file__).parent / "fixtures" / "run_format1"
HELD_OUT, SOURCE = 70, 200


def test_paired_interval_matches_the_hand_computation():
    """Agresti-Min: Wald on the paired table with 1/2 added to each cell. b = 1, c = 0, n = 70:
    b' = 1.5, c' = 0.5, n' = 72, centre 1/72 = 0.013889, se = sqrt(2 - 1/72) / 72 = 0.019574,
    1.959964 se = 0.038364: -2.45 to 5.23 points. b = 10: centre 10/72 = 0.138889,
    se = sqrt(11 - 100/72) / 72 = 0.043058: 5.45 to 22.33. No flip (b = c = 0) still has a
    width: 1.959964 / 72 = 2.72 points either side (plain Wald would give none)."""
    for (b, c, n), expected in (((1, 0, 70), (-2.45, 5.23)), ((10, 0, 70), (5.45, 22.33)),
                                ((5, 5, 70), (-9.03, 9.03)), ((16, 1, 200), (3.44, 11.41)),
                                ((0, 0, 70), (-2.72, 2.72))):
        assert paired_drop_interval(b, c, n) == pytest.approx(expected, abs=0.005), (b, c, n)
    low, high = paired_drop_interval(40, 0, 40)  # all flipped: bounded by 100 points
    assert high <= 100 and low > 50


def test_wilson_interval_matches_the_hand_computation():
    """69 of 70: p = 0.985714, z^2/n = 0.054878, centre (p + 0.027439) / 1.054878 = 0.960444,
    half 1.959964 sqrt(p (1 - p) / 70 + z^2 / 19600) / 1.054878 = 0.037028."""
    assert wilson_interval(69, 70) == pytest.approx((92.34, 99.75), abs=0.005)
    assert wilson_interval(60, 70) == pytest.approx((75.66, 92.05), abs=0.005)
    assert wilson_interval(70, 70) == pytest.approx((94.80, 100.0), abs=0.005)


def _model(predictions: np.ndarray) -> Candidate:
    """A model that predicts `predictions[i]` for the image coded i (see `_sets`)."""

    def run(batch: np.ndarray) -> np.ndarray:
        index = np.rint(batch[:, 0, 0, 0] * 255) + 256 * np.rint(batch[:, 1, 0, 0] * 255)
        return np.eye(len(CLASSES), dtype=np.float32)[predictions[index.astype(int)]]

    return Candidate("", "", "", "fake", 2**20, run)


def _sets(held_out: bool = True) -> list[EvalSet]:
    """70 held-out images and 200 source-validation ones; image i carries i in its pixels."""
    sizes = [("sketch", True, HELD_OUT)] if held_out else []
    sizes.append((SOURCE_VAL, False, SOURCE))
    sets, start = [], 0
    for name, is_target, n in sizes:
        index = np.arange(start, start + n)
        pixels = np.zeros((n, 2, 2, 3), np.uint8)
        pixels[:, 0, 0, 0], pixels[:, 0, 0, 1] = index % 256, index // 256
        sets.append(EvalSet(name, is_target, pixels, index % len(CLASSES)))
        start += n
    return sets


def _flip(pred: np.ndarray, rows: range | list[int], labels: np.ndarray) -> np.ndarray:
    """`pred` with `rows` made wrong (right ones) or right (wrong ones)."""
    pred = pred.copy()
    for i in rows:
        pred[i] = (labels[i] + 1) % 3 if pred[i] == labels[i] else labels[i]
    return pred


def _artifacts(held_out: bool = True) -> tuple[list[Candidate], list[EvalSet]]:
    """torch FP32, wrong on the first 10 images of each set, and artifacts that differ from it
    on known images: (fp32 right and artifact wrong, the reverse) = b, c per set."""
    sets = _sets(held_out)
    labels = np.concatenate([s.labels for s in sets])
    h = HELD_OUT if held_out else 0
    reference = _flip(labels, sorted({*range(10), *range(h, h + 10)}), labels)
    made = {TORCH_KEY: reference,
            "same": reference,
            "one-flip": _flip(reference, [10], labels),  # held-out b = 1
            "ten-flips": _flip(reference, range(10, 20), labels),  # held-out b = 10
            # held-out b = c = 5: no drop, yet 10 images predicted otherwise
            "cancelling": _flip(reference, [*range(5), *range(10, 15)], labels),
            # source b = 16, c = 1: 7.5 points
            "source-drop": _flip(reference, [h, *range(h + 10, h + 26)], labels)}
    candidates = []
    for key, pred in made.items():
        c = _model(pred)
        c.key, c.file = key, "" if key == TORCH_KEY else f"model.{key}.onnx"
        candidates.append(c)
    return candidates, sets


def _report(held_out: bool = True, gate: Gate = Gate()) -> ValidationReport:
    candidates, sets = _artifacts(held_out)
    results = evaluate(candidates, sets, gate, latency_runs=0, num_classes=len(CLASSES))
    return build_report("run", results, sets, gate, CLASSES)


def _checks(report: ValidationReport) -> dict[tuple[str, str], tuple]:
    return {(r.key, c.name): (c.images, c.value, c.low, c.high, c.passed, c.fp32_only,
                              c.artifact_only, c.differ)
            for r in report.artifacts for c in r.checks}


def test_each_check_decides_on_its_interval():
    report = _report()
    checks = _checks(report)
    by_key = {r.key: r for r in report.artifacts}
    assert not by_key[TORCH_KEY].checks  # the reference is not checked against itself
    # (images, value, low, high, passed, fp32_only, artifact_only, differ), by hand:
    assert checks["same", DROP] == (70, 0.0, -2.72, 2.72, True, 0, 0, 0)
    assert checks["same", SOURCE_DROP] == (200, 0.0, -0.97, 0.97, True, 0, 0, 0)
    assert checks["same", AGREEMENT] == (70, 100.0, 94.8, 100.0, True, 0, 0, 0)
    # One flipped image of 70 is 1.43 points, above the 1-point limit, but its interval
    # (-2.45 to 5.23) reaches below the limit: it passes, and a note says why.
    assert checks["one-flip", DROP] == (70, 1.43, -2.45, 5.23, True, 1, 0, 0)
    assert checks["one-flip", AGREEMENT] == (70, 98.57, 92.34, 99.75, True, 0, 0, 1)
    assert not by_key["one-flip"].failures
    # Ten: the whole interval (5.45 to 22.33) is above it; agreement 60 of 70 (Wilson 75.66 to
    # 92.05) is wholly below 95 %.
    assert checks["ten-flips", DROP] == (70, 14.29, 5.45, 22.33, False, 10, 0, 0)
    assert checks["ten-flips", AGREEMENT] == (70, 85.71, 75.66, 92.05, False, 0, 0, 10)
    drop_failure, agreement_failure = by_key["ten-flips"].failures
    assert drop_failure == ("accuracy drop on sketch: 14.29 points (95 % interval 5.45 to "
                            "22.33), wholly above the 1-point limit (--max-drop): 50 of 70 "
                            "images right, against 60 in torch FP32")
    assert agreement_failure.startswith("top-1 agreement on sketch: 85.71 %")
    assert agreement_failure.endswith("below the 95 % limit (--min-agreement): 10 of 70 images "
                                      "predicted otherwise")
    # Flips that cancel: no drop, but agreement fails.
    assert checks["cancelling", DROP] == (70, 0.0, -9.03, 9.03, True, 5, 5, 0)
    assert not checks["cancelling", AGREEMENT][4]
    # The source-validation check: 16 broken, 1 mended of 200 is 7.5 points (3.44 to 11.41).
    assert checks["source-drop", SOURCE_DROP] == (200, 7.5, 3.44, 11.41, False, 16, 1, 0)
    assert checks["source-drop", DROP][4] and checks["source-drop", AGREEMENT][4]
    assert [r.status for r in report.artifacts] == ["ok", "ok", "ok", "FAIL", "FAIL", "FAIL"]
    assert not report.passed
    # Looser limits: ten-flips still fails its drop (5.45 > 5), the others pass.
    loose = _report(gate=Gate(max_drop=5, max_source_drop=4, min_agreement=90))
    assert [r.key for r in loose.artifacts if r.failures] == ["ten-flips"]


def test_notes_say_when_a_set_cannot_resolve_a_limit():
    lines = dict((line, level) for level, line in notes(_report()))
    # Every held-out drop interval is wider than the 1-point limit (the widest: +-9.03).
    assert lines[("70 sketch images cannot resolve the 1-point limit (--max-drop): 95 % "
                  "intervals up to ±9.0 points wide, so an artifact fails only when its whole "
                  "interval is above the limit")] == "info"
    assert not any("source_val images cannot resolve" in line for line in lines)  # +-0.97
    assert lines[("model.one-flip.onnx: accuracy drop on sketch: 1.43 points, beyond the "
                  "1-point limit (--max-drop) but not clearly: its 95 % interval (-2.45 to 5.23) "
                  "reaches the limit, so it passes")] == "warn"
    assert sum(level == "fail" for level in lines.values()) == 3
    big = _report(gate=Gate(max_drop=10))  # +-9.03 at most: resolved
    assert not any("cannot resolve" in line for _, line in notes(big))


def test_a_run_without_a_held_out_domain_is_gated_on_its_source_split():
    report = _report(held_out=False)
    checks = _checks(report)
    assert {name for _, name in checks} == {SOURCE_DROP, AGREEMENT}
    assert checks["source-drop", SOURCE_DROP][:5] == (200, 7.5, 3.44, 11.41, False)
    # agreement on the source split: 183 of 200 the same (17 flipped)
    assert checks["source-drop", AGREEMENT][1] == 91.5 and report.confusion_on == SOURCE_VAL
    assert any("trained on every domain" in line for _, line in notes(report))


def test_a_model_without_reference_is_not_gated():
    candidates, sets = _artifacts()
    results = evaluate(candidates[1:2], sets, Gate(), latency_runs=0, num_classes=3)
    report = build_report("model.same.onnx", results, sets, Gate(), CLASSES)
    assert report.passed and not results[0].checks and results[0].agreement is None
    assert any("nothing gated" in line for _, line in notes(report))


def test_confusion_matrices_count_true_against_predicted():
    report = _report()
    candidates, sets = _artifacts()
    labels = sets[0].labels
    for r, c in zip(report.artifacts, candidates, strict=True):
        pred = c.run(np.concatenate([s.pixels for s in sets]).transpose(0, 3, 1, 2) / 255.0)
        pred = pred.argmax(1)[:HELD_OUT]
        expected = [[sum(1 for t, p in zip(labels, pred, strict=True) if t == i and p == j)
                     for j in range(3)] for i in range(3)]
        assert r.confusion == expected, r.key
    # The figure shows torch FP32 and the artifact with the largest held-out drop.
    assert [r.key for r in confusion_pick(report)] == [TORCH_KEY, "ten-flips"]


def test_terminal_table_fits_80_columns_with_every_name_whole(capsys, monkeypatch):
    report = _report()
    report.model = "/data/runs/pacs-sketch-rise-efficientnet_lite0"
    report.artifacts[-1].file = "model.int8-trt.onnx"
    report.artifacts[-2].skipped = "not runnable here: no CUDA GPU"
    names = [r.name for r in report.artifacts]
    print_table(report, width=80)
    out = capsys.readouterr().out.splitlines()
    assert max(map(len, out)) <= 80
    table = [line.split()[0] for line in out if line.split() and line.split()[0] in names]
    assert table == names  # one row each, the name whole
    assert any(line.startswith("not shown at 80 columns:") for line in out)
    monkeypatch.setenv("COLUMNS", "80")
    assert terminal_width() == 80
    monkeypatch.delenv("COLUMNS")
    print_table(report)  # not a terminal (a log): every column, nothing cut
    wide = capsys.readouterr().out
    assert "img/s" in wide and "runtime" in wide and "not shown" not in wide
    assert "[5.45, 22.33]" in wide  # the held-out drop's interval of ten-flips


def test_markdown_names_the_gate_the_interval_and_the_figures(tmp_path):
    report = _report()
    metrics = [json.loads(line) for line in
               (FIXTURES / "rise" / "metrics.jsonl").read_text().splitlines()]
    paths = write_report(report, tmp_path, "report", metrics, best_step=2)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png",
                                       "report-confusion.png", "training.png"]
    for p in paths[2:]:
        assert p.read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    for fact in ("--max-drop", "--max-source-drop", "--min-agreement", "Agresti-Min",
                 "Wilson", "![Gate checks and latency](report.png)",
                 "(report-confusion.png)", "(training.png)", "**Pass: no.**"):
        assert fact in text, fact
    row = next(line for line in text.splitlines() if line.startswith("| model.ten-flips.onnx"))
    assert "| 14.29 | [5.45, 22.33] |" in row
    assert ValidationReport.read(paths[0]) == report
    assert markdown(report) == markdown(ValidationReport.read(paths[0]))


def test_gate_limits_out_of_range_are_refused_naming_the_option():
    for kwargs, option in (({"max_drop": -1}, "--max-drop"),
                           ({"max_source_drop": float("nan")}, "--max-source-drop"),
                           ({"min_agreement": 101}, "--min-agreement")):
        with pytest.raises(DgkitError, match=f"^{option} must be between 0 and 100"):
            Gate(**kwargs)


def test_reports_of_earlier_formats_still_load(tmp_path):
    """Format 1 (the fixture run's, from dgkit 0.1.0) and format 2 (an FP16 failure of the
    hidden 99.5 % bar): their accuracies and failures load; the gate fields are absent."""
    old = ValidationReport.read(FIXTURES / "erm" / "export" / "report.json")
    assert old.min_agreement is None and old.max_images is None
    assert old.artifacts[1].accuracy == {"sketch": 33.33, "source_val": 12.5}
    assert not old.artifacts[1].checks
    v2 = json.loads((FIXTURES / "erm" / "export" / "report.json").read_text())
    v2["format"] = 2
    v2["provenance"] = {"dgkit": "0.1.0"}
    v2["artifacts"][1]["failures"] = ["top-1 agrees with ONNX FP32 on 98.00 % (needs 99.5 %)"]
    (tmp_path / "report.json").write_text(json.dumps(v2))
    report = ValidationReport.read(tmp_path / "report.json")
    assert report.artifacts[1].status == "FAIL" and report.provenance == {"dgkit": "0.1.0"}
    assert report.max_source_drop is None and report.confusion_on == ""
