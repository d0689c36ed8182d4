"""End to end: `dgkit distill --method M` on the tiny domains with the tiny teacher writes a
complete run, and the exported student rebuilt from run.json + student.safetensors alone (no
teacher) computes the same logits as the student the trainer builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from typer.testing import CliRunner

from dgkit.data import discover
from dgkit.preprocess import PreprocessSpec, load_prepared

CASES = {
    "rise": ["--method", "rise"],
    "scmd": ["--method", "scmd", "--select-fraction", "0.5"],
    "vl2v": ["--method", "vl2v", "--align-steps", "2", "--distill-steps", "2"],
    "psd": ["--method", "psd"],
    "psd+scmd": ["--method", "psd", "--base", "scmd"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_distill_cli_writes_a_run_that_rebuilds(case, tiny_domains, tiny_teacher, tmp_path):
    from dgkit.cli import app
    from dgkit.distill.students import load_student
    from dgkit.distill.trainer import Trainer
    from dgkit.rundir import RunDir

    out = tmp_path / "run"
    args = ["distill", "--data", str(tiny_domains), "--target", "sketch", "--teacher",
            tiny_teacher, "--student", "timm:test_resnet", "--student-weights", "none",
            "--image-size", "32", "--batch-size", "6", "--eval-every", "3", "--out", str(out),
            "--quiet", *CASES[case], *([] if case == "vl2v" else ["--steps", "3"])]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("run.json", "student.safetensors", "summary.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    config = json.loads((out / "run.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    method = CASES[case][1]
    assert config["train"]["method"] == method
    losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    expected_terms = {"rise": {"kd", "ce", "ad", "rd"}, "scmd": {"ce", "kd", "cm"},
                      "vl2v": {"image", "text"}, "psd": {"psd"},
                      "psd+scmd": {"ce", "kd", "cm", "psd"}}[case]
    assert set(losses) == expected_terms
    if case == "vl2v":
        assert config["train"]["steps"] == 4  # align + distill

    weights = load_file(str(out / "student.safetensors"))
    rebuilt = load_student(RunDir(out))  # from student.json and the weights alone
    trainer = Trainer(RunDir(out).config().train, RunDir(out), quiet=True)
    prep = trainer.prepare()
    student, _, spec = trainer.build(prep)
    assert json.loads((out / "student.json").read_text())["head"] == spec.head == {
        "rise": "projected", "vl2v": "text"}.get(method, "linear")
    student.load_state_dict(weights)
    student.eval()
    images = prep.pixels[:8].float() / 255.0
    with torch.no_grad():
        assert_close(rebuilt(images), student(images), rtol=1e-4, atol=1e-4)
    if method in ("rise", "vl2v"):  # heads as wide as the teacher's embedding (32 here)
        assert rebuilt.head.proj.out_features == 32

    # The reported target accuracy is the saved student's on every sketch, decoded here.
    data = discover(tiny_domains)
    sketches = [s for s in data.samples if data.domains[s.domain] == "sketch"]
    assert len(sketches) == 24
    pixels = np.stack([load_prepared(s.path, PreprocessSpec(32, 32)) for s in sketches])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        hits = (student(x).argmax(-1) == torch.tensor([s.label for s in sketches])).sum()
    assert summary["target_accuracy"]["sketch"] == pytest.approx(100.0 * int(hits) / 24)
