"""`dgkit quickstart`: the whole pipeline on a tiny schedule, through the real CLI."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import dgkit, error_line

# A short schedule on one CPU thread, and a teacher of 60 steps (cached in the test's own
# XDG_CACHE_HOME). One thread: on cores shared with other jobs, two threads wait on each other
# and run several times slower; on an idle machine it costs little.
TINY = ["--per-class", "24", "--steps", "60", "--batch-size", "24", "--threads", "1",
        "--teacher-steps", "60"]
CHANCE = 100 / 6
WORLD_TEACHER = "a small CLIP trained on the sample world, not OpenAI's"


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_beats_chance_on_held_out_sketches(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = dgkit("quickstart", "--out", out, *TINY, timeout=900, check=True, env=env)
    result = json.loads((out / "quickstart.json").read_text())
    assert result["target"] == "sketch"
    if result["teacher"] != "ViT-B-32:openai":  # no CLIP weights here: the sample world's CLIP
        assert result["method"] == "vl2v"
        assert result["teacher"].startswith("dgkit-world-clip:" + str(tmp_path / "cache"))
        assert result["teacher_about"] == WORLD_TEACHER
        assert "using --method vl2v: rise needs the CLIP teacher" in proc.stderr
        assert WORLD_TEACHER in proc.stdout
        assert not result["plumbing_check"]
    # The teacher's zero-shot accuracy and the ERM student beside the distilled one.
    assert 0 <= result["teacher_zero_shot_accuracy"]["sketch"] <= 100
    erm = json.loads((out / "erm" / "summary.json").read_text())
    assert erm["finished"] and json.loads((out / "erm" / "run.json").read_text())[
        "train"]["method"] == "erm"
    assert result["baseline"]["target_accuracy"] == erm["target_accuracy_mean"]
    assert "erm (no teacher)" in proc.stdout
    assert (out / "latest").resolve() == (out / "run").resolve()
    export = out / "run" / "export"
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "report.json"):
        assert (export / name).is_file(), name
    rows = {r["artifact"]: r for r in result["artifacts"]}
    assert {"torch student", "model.onnx", "model.fp16.onnx", "model.int8.onnx"} <= set(rows)
    for name in ("torch student", "model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert rows[name]["target_accuracy"] >= 3 * CHANCE, rows[name]
    report = json.loads((export / "report.json").read_text())
    int8 = next(a for a in report["artifacts"] if a["file"] == "model.int8.onnx")
    assert rows["model.int8.onnx"]["target_agreement"] == int8["agreement_by_set"]["sketch"]
    assert rows["torch student"]["target_agreement"] == 100.0
    assert len(result["examples"]) == 6
    assert all(e["image"].startswith(str(out / "data" / "sketch")) for e in result["examples"])
    # The printed report: the table, the predictions and the next commands.
    assert "sketch held out" in proc.stdout and "model.int8.onnx" in proc.stdout
    assert f"dgkit serve {export / 'model.int8.onnx'}" in proc.stdout
    assert f"dgkit demo {out / 'run'}" in proc.stdout


def test_quickstart_refuses_a_non_empty_folder_and_bad_options(tmp_path):
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "mine.txt").write_text("keep me")
    assert "not empty" in error_line(dgkit("quickstart", "--out", tmp_path / "qs"))
    assert (tmp_path / "qs" / "mine.txt").read_text() == "keep me"
    assert "--steps" in error_line(dgkit("quickstart", "--out", tmp_path / "new", "--steps",
                                         "0"))
    assert "--threads" in error_line(dgkit("quickstart", "--out", tmp_path / "new",
                                           "--threads", "0"))
    assert "--teacher-steps must be at least 1, got 0" in error_line(dgkit(
        "quickstart", "--out", tmp_path / "new", "--teacher-steps", "0"))
    assert not (tmp_path / "new").exists()


def test_method_choice_skips_unavailable_methods_and_teachers(monkeypatch):
    import dgkit.quickstart as quickstart
    from dgkit.errors import DgkitError

    monkeypatch.setattr(quickstart, "METHODS", [
        ("no-such-method", None), ("kd", "ViT-B-32:/no/such/checkpoint.pt"), ("erm", None)])
    method, teacher, why = quickstart.choose_method()
    assert (method, teacher) == ("erm", None)
    assert "no-such-method is not in this dgkit" in why
    assert "kd needs the CLIP teacher" in why and "/no/such/checkpoint.pt" in why
    # A teacher the user names must load: no silent fallback.
    with pytest.raises(DgkitError, match="/no/such/other.pt"):
        quickstart.choose_method("ViT-B-32:/no/such/other.pt")
