"""The run directory's typed records: round trips, runs written by dgkit 0.1.0 (run format 1,
kept under tests/fixtures/run_format1) load, export and demo, and a newer format is refused in
one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import dgkit, error_line

from dgkit.errors import DgkitError
from dgkit.records import ArtifactResult, RunConfig, Summary, ValidationReport
from dgkit.rundir import RunDir

FIXTURES = Path(__file__).parent / "fixtures" / "run_format1"
METHODS = ("erm", "kd", "psd", "rise", "scmd", "vl2v")
# The head each method's student was trained with (dgkit 0.1.0 named none of them in run.json).
HEADS = {"erm": "linear", "kd": "linear", "psd": "linear", "rise": "projected", "scmd": "linear",
         "vl2v": "text"}


def old_run(method: str, tmp_path: Path) -> RunDir:
    return RunDir(shutil.copytree(FIXTURES / method, tmp_path / method))


def test_records_round_trip(tmp_path):
    config = RunDir(FIXTURES / "rise").config()
    config.write(tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text())["format"] == RunConfig.FORMAT
    again = RunConfig.read(tmp_path / "run.json")
    assert again == config and again.train.hparams["temperature"] == 3.0
    summary = Summary(finished=True, target_domains=["sketch"], best_step=3,
                      target_accuracy={"sketch": 40.0}, target_accuracy_mean=40.0)
    summary.write(tmp_path / "summary.json")
    assert Summary.read(tmp_path / "summary.json") == summary
    report = ValidationReport("run", "cpu", ["sketch"], ["sketch", "source_val"],
                              {"sketch": 3, "source_val": 2}, 1.0, True,
                              [ArtifactResult("onnx-fp32", "model.onnx", "fp32", "ort-cpu", 0.5,
                                              {"sketch": 33.33, "source_val": 50.0})])
    report.write(tmp_path / "report.json")
    assert ValidationReport.read(tmp_path / "report.json") == report


@pytest.mark.parametrize("method", METHODS)
def test_a_format1_run_rebuilds_the_student_it_was_trained_as(method, tmp_path):
    """student.json is absent: the spec comes from run.json and the weights, and the rebuilt
    student computes the logits dgkit 0.1.0's own rebuild computed (stored with the fixture)."""
    from dgkit.distill.students import load_student
    from dgkit.export.onnx_export import torch_logits

    run = old_run(method, tmp_path)
    assert not run.student_json.exists()
    raw = json.loads(run.run_json.read_text())
    spec = run.student_spec()
    assert spec.head == HEADS[method] and spec.backbone == raw["config"]["student"]
    assert spec.input_size == raw["image_size"] and spec.num_classes == len(raw["classes"])
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's, stored in the weights
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = json.loads((FIXTURES / "expected_logits.json").read_text())[method]
    np.testing.assert_allclose(torch_logits(load_student(run), pixels), expected, atol=1e-6)
    config = run.config()  # migrated: the repeated top-level keys are gone, nothing is lost
    assert config.method == raw["method"] == method
    assert config.target_domains == raw["target_domains"]
    assert config.preprocess.input_size == raw["preprocess"]["input_size"]


def test_a_format1_run_exports(tiny_domains, tmp_path):
    run = old_run("rise", tmp_path)
    proc = dgkit("export", run.path, "--data", tiny_domains, "--latency-runs", "0")
    assert proc.returncode == 0, proc.stderr
    report = run.report()
    assert report is not None and report.passed
    torch_row = next(r for r in report.artifacts if r.key == "torch-fp32")
    onnx_row = next(r for r in report.artifacts if r.key == "onnx-fp32")
    assert onnx_row.agreement == 100.0 and onnx_row.accuracy == torch_row.accuracy
    assert not run.student_json.exists()  # a read never rewrites the user's run


def test_a_format1_run_demos_with_its_old_report(tmp_path):
    from dgkit.demo.models import SOURCES, Demo

    run = old_run("erm", tmp_path)
    old = json.loads(run.report_json.read_text())["artifacts"][0]["accuracy"]
    demo = Demo(run, teacher=False)
    row = next(r for r in demo.info.rows if "torch (reference)" in r.model)
    assert row.accuracy == {"sketch": old["sketch"], SOURCES: old["source_val"]}
    summary = json.loads(run.summary_json.read_text())
    assert demo.info.best_step == summary["best_step"]
    assert demo.student().artifact == "torch"  # the fixture has no exported model


def test_a_newer_format_is_refused_in_one_sentence(tmp_path):
    run = old_run("erm", tmp_path)
    raw = json.loads(run.run_json.read_text())
    run.run_json.write_text(json.dumps({**raw, "format": 99}))
    before = sorted(p.name for p in run.path.rglob("*"))
    line = error_line(proc := dgkit("export", run.path, "--latency-runs", "0"))
    assert proc.returncode == 2
    assert str(run.run_json) in line and "format 99" in line
    assert sorted(p.name for p in run.path.rglob("*")) == before


def test_a_broken_student_spec_names_the_file(tmp_path):
    run = old_run("erm", tmp_path)
    spec = run.student_spec()
    spec.write(run.student_json)
    raw = json.loads(run.student_json.read_text())
    run.student_json.write_text(json.dumps({**raw, "head": "mlp"}))
    with pytest.raises(DgkitError) as info:
        run.student_spec()
    assert str(run.student_json) in str(info.value) and "mlp" in str(info.value)


def test_records_import_no_torch():
    code = ("import sys, dgkit.records, dgkit.rundir, dgkit.teacher_spec, dgkit.train_config, "
            "dgkit.api; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
