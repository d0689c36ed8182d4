"""The efficacy world, small: a teacher trained on every style moves into the student what ERM
cannot learn from the source domains (VL2V, the method the full table shows far ahead), and a
random teacher moves nothing. `bench/efficacy.py` is run as a user runs it."""

from __future__ import annotations

import json

import pytest
from cli_helpers import bench_script


@pytest.mark.slow
def test_a_trained_teacher_beats_erm_and_a_random_one_does_not(tmp_path):
    out = tmp_path / "efficacy.json"
    proc = bench_script("efficacy.py", "--out", tmp_path / "work", "--methods", "erm,vl2v",
                        "--controls", "random", "--seeds", "1", "--per-class", "24",
                        "--steps", "100", "--teacher-steps", "200", "--jobs", "2",
                        "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    table = result["results"]
    erm = table["erm"]["none"]["target"]["mean"]
    assert table["vl2v"]["trained"]["target"]["mean"] > erm + 15
    assert table["vl2v"]["random"]["target"]["mean"] < erm + 5
    zero_shot = result["teacher_zero_shot_accuracy"]
    assert zero_shot["trained"]["sketch"] > 80 and zero_shot["random"]["sketch"] < 40
    assert "Held-out sketch accuracy" in proc.stdout
