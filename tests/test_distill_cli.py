"""`dgkit distill` end to end on tiny data: the run directory, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import TINY, dgkit, error_line
from safetensors.torch import load_file

from dgkit import __version__ as dgkit_version


def _train(data, out, *extra, steps=6, cwd=None):
    return dgkit("distill", "--data", data, "--target", "sketch", "--steps", steps,
                 "--eval-every", "3", "--out", out, *TINY, *extra, cwd=cwd, check=True)


def test_erm_writes_the_run_directory(tiny_domains, tmp_path):
    _train(tiny_domains, tmp_path / "runs" / "erm", cwd=tmp_path)
    run = tmp_path / "runs" / "erm"
    config = json.loads((run / "run.json").read_text())
    assert config["format"] == 2
    assert config["classes"] == ["circle", "square", "triangle"]
    assert config["train"]["targets"] == ["sketch"]
    assert config["source_domains"] == ["cartoon", "photo"]
    assert config["train"]["seed"] == 0 and config["versions"]["torch"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert set(rows[0]["source_val"]) == {"cartoon", "photo"}
    summary = json.loads((run / "summary.json").read_text())
    best = max(rows, key=lambda r: r["source_val_mean"])  # first best wins ties
    best = next(r for r in rows if r["source_val_mean"] == best["source_val_mean"])
    assert summary["best_step"] == best["step"]
    assert summary["target_accuracy"] == best["target"]
    assert summary["finished"] and summary["teacher_zero_shot_accuracy"] is None
    weights = load_file(str(run / "student.safetensors"))
    assert weights["head.weight"].shape == (3, 1280)
    spec = json.loads((run / "student.json").read_text())
    assert (spec["head"], spec["feature_dim"], spec["num_classes"]) == ("linear", 1280, 3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss/ce")}  # at every report
    assert all(logged[r["step"]] == pytest.approx(r["losses"]["ce"]) for r in rows)
    assert not (run / "checkpoint.pt").exists()
    assert os.readlink(tmp_path / "runs" / "latest") == "erm"


def test_kd_with_a_random_teacher_is_labelled_a_plumbing_check(tiny_domains, tiny_teacher,
                                                                tmp_path):
    proc = _train(tiny_domains, tmp_path / "kd", "--method", "kd", "--teacher", tiny_teacher,
                  "--temperature", "4")
    assert "plumbing check" in proc.stderr
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["plumbing_check"] is True
    assert set(summary["teacher_zero_shot_accuracy"]) == {"cartoon", "photo", "sketch"}
    config = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert config["train"]["hparams"] == {"temperature": 4.0, "kd_weight": 1.0,
                                           "ce_weight": 1.0}
    cache = sorted(p.name for p in (tmp_path / "kd" / "cache").iterdir())
    assert [c.split("-")[0] for c in cache] == ["image", "text"]
    # A second run beside the first reuses its teacher embeddings instead of recomputing.
    second = _train(tiny_domains, tmp_path / "kd2", "--method", "kd", "--teacher", tiny_teacher,
                    "--teacher-mode", "online")
    assert "Teacher embeddings" not in second.stderr
    first_cache = load_file(str(tmp_path / "kd" / "cache" / cache[0]))["embeddings"]
    second_cache = load_file(str(tmp_path / "kd2" / "cache" / cache[0]))["embeddings"]
    assert first_cache.shape == second_cache.shape == (72, 32)


def test_two_cpu_runs_with_one_seed_are_identical(tiny_domains, tmp_path):
    _train(tiny_domains, tmp_path / "a")
    _train(tiny_domains, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "student.safetensors")), \
        load_file(str(tmp_path / "b" / "student.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert _strip_speed(tmp_path / "a" / "metrics.jsonl") == \
        _strip_speed(tmp_path / "b" / "metrics.jsonl")


def _strip_speed(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("images_per_s")
    return rows


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_domains, tmp_path):
    args = ["--steps", "30", "--eval-every", "5", "--checkpoint-every", "5"]
    _train(tiny_domains, tmp_path / "whole", *args)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgkit", "distill", "--data", str(tiny_domains), "--target",
         "sketch", "--out", str(tmp_path / "killed"), *TINY, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    dgkit("distill", "--resume", tmp_path / "killed", "--quiet", check=True)
    assert _strip_speed(tmp_path / "killed" / "metrics.jsonl") == \
        _strip_speed(tmp_path / "whole" / "metrics.jsonl")
    a = load_file(str(tmp_path / "whole" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed" / "summary.json").read_text()) == \
        json.loads((tmp_path / "whole" / "summary.json").read_text())


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tiny_domains, tmp_path):
    """Ctrl-C once the loop has printed its first evaluation: the run stops with a checkpoint
    (the only one: --checkpoint-every is past the run) and says how to resume."""
    tiny = [a for a in TINY if a != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgkit", "distill", "--data", str(tiny_domains), "--target",
         "sketch", "--out", str(tmp_path / "run"), "--steps", "400", "--eval-every", "2",
         "--checkpoint-every", "1000", *tiny],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        for line in proc.stdout:  # waits for what the process prints, not for a time
            seen.append(line)
            if line.startswith("step 2:"):
                break
        assert not (tmp_path / "run" / "checkpoint.pt").exists(), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, rest  # as an interrupt during setup exits
    assert "--resume" in rest and (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}", "--target", "sketch"], "data root .* does not exist"),
    (["--data", "{data}", "--target", "clipart"], "names no domain .* cartoon, photo, sketch"),
    (["--data", "{data}", "--target", "sketch", "--method", "nope"], "unknown method 'nope'"),
    (["--data", "{data}", "--target", "sketch", "--student", "vgg"], "unknown student 'vgg'"),
    (["--data", "{data}", "--target", "sketch", "--temperature", "3"],
     "--temperature is not an option of --method erm"),
    (["--data", "{data}", "--target", "sketch", "--method", "kd", "--teacher",
      "ViT-B-32:openai"], "cannot be fetched"),
    (["--data", "{data}", "--target", "sketch", "--optimizer", "lion"], "--optimizer 'lion'"),
    (["--data", "{data}", "--target", "sketch", "--recipe", "slow"],
     "--recipe 'slow' is not one of: paper, fast"),
    (["--data", "{data}", "--target", "sketch", "--augment", "sepia"],
     "--augment 'sepia' is not one of: domainbed, domainbed-nohue, rise"),
    (["--data", "{data}", "--target", "sketch", "--epochs", "0"],
     "--epochs must be a positive number, got 0"),
    (["--data", "{data}", "--target", "sketch", "--batch-per-domain", "0"],
     "--batch-per-domain must be at least 1, got 0"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(tiny_domains, tmp_path, args,
                                                         message):
    args = [a.format(missing=tmp_path / "nowhere", data=tiny_domains) for a in args]
    proc = dgkit("distill", *args, "--out", tmp_path / "run", *TINY)
    assert proc.returncode == 2
    assert re.search(message, error_line(proc))
    if "cannot be fetched" not in message:
        assert not (tmp_path / "run").exists()


def test_existing_run_is_kept_unless_overwrite(tiny_domains, tmp_path):
    _train(tiny_domains, tmp_path / "run", steps=3)
    before = (tmp_path / "run" / "student.safetensors").read_bytes()
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "3",
                 "--out", tmp_path / "run", *TINY)
    assert proc.returncode == 2 and "already exists" in error_line(proc)
    assert (tmp_path / "run" / "student.safetensors").read_bytes() == before
    _train(tiny_domains, tmp_path / "run", "--overwrite", "--seed", "1", steps=3)
    assert (tmp_path / "run" / "student.safetensors").read_bytes() != before


def test_corrupt_images_refuse_training_or_are_skipped(domains_copy, tmp_path):
    bad = domains_copy / "photo" / "circle" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (domains_copy / "cartoon" / "square" / "002.png").write_bytes(b"")
    proc = dgkit("distill", "--data", domains_copy, "--target", "sketch", "--steps", "3",
                 "--out", tmp_path / "run", *TINY)
    line = error_line(proc)
    assert proc.returncode == 2 and "2 image(s) cannot be decoded" in line and str(bad) in line
    assert "--skip-bad" in line
    check = dgkit("data", "check", domains_copy)
    assert check.returncode == 1 and "2 unreadable of 72 images" in check.stderr + check.stdout
    ok = _train(domains_copy, tmp_path / "run2", "--skip-bad", steps=3)
    assert "skipped 2 unreadable" in ok.stderr
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["skipped_images"] == 2


def test_data_check_prints_the_count_table(tiny_domains):
    proc = dgkit("data", "check", tiny_domains, check=True)
    out = proc.stdout + proc.stderr
    assert "72 images" in out and "triangle" in out and "0 unreadable of 72" in out


def test_leave_one_domain_out_prints_the_table(tiny_domains, tmp_path):
    proc = dgkit("distill", "--data", tiny_domains, "--target", "all", "--steps", "2",
                 "--eval-every", "2", "--out", tmp_path / "lodo", *TINY, check=True)
    result = json.loads((tmp_path / "lodo" / "lodo.json").read_text())
    assert set(result["target_accuracy"]) == {"cartoon", "photo", "sketch"}
    assert result["average"] == pytest.approx(sum(result["target_accuracy"].values()) / 3)
    assert "average" in proc.stdout + proc.stderr
    for d in ("cartoon", "photo", "sketch"):
        assert (tmp_path / "lodo" / d / "summary.json").is_file()


def test_weight_averaging_changes_the_saved_student(tiny_domains, tmp_path):
    """EMA and SWA students are the averaged weights, not the last ones."""
    weights = {}
    for average in ("none", "ema", "swa"):
        _train(tiny_domains, tmp_path / average, "--average", average, "--ema-decay", "0.5",
               "--eval-every", "6")
        weights[average] = load_file(str(tmp_path / average / "student.safetensors"))
        config = json.loads((tmp_path / average / "run.json").read_text())["train"]
        assert config["average"] == average
    head = {k: w["head.weight"] for k, w in weights.items()}
    assert not torch_equal(head["none"], head["ema"])
    assert not torch_equal(head["none"], head["swa"])
    assert not torch_equal(head["ema"], head["swa"])


def test_usage_errors_are_one_line_and_version_prints() -> None:
    for args in (["--bogus"], ["export", "--bogus"], ["nosuchcommand"]):
        proc = dgkit(*args)
        assert proc.returncode == 2, args
        assert args[-1] in error_line(proc)
    proc = dgkit("--version", check=True)
    assert proc.stdout.strip() == f"dgkit {dgkit_version}"


def test_no_target_trains_on_every_domain_and_exports(tiny_domains, tmp_path):
    """`dgkit distill --data DIR` as the design card types it: every domain is a source, the
    student is selected by source validation, and export validates what it can."""
    proc = dgkit("distill", "--data", tiny_domains, "--steps", "3", "--eval-every", "3",
                 *TINY, cwd=tmp_path, check=True)
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert run.name.endswith("-erm-all-domains")
    config = json.loads((run / "run.json").read_text())
    assert config["train"]["targets"] == []
    assert config["source_domains"] == ["cartoon", "photo", "sketch"]
    summary = json.loads((run / "summary.json").read_text())
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(row["source_val"]) == {"cartoon", "photo", "sketch"}
    assert summary["target_accuracy"] == {} and summary["target_accuracy_mean"] is None
    assert summary["source_val_accuracy"] == row["source_val"]
    assert "--target all" in " ".join(proc.stderr.split())  # how to estimate the unseen domain
    export = dgkit("export", "--latency-runs", "0", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert "trained on every domain" in " ".join(export.stdout.split() + export.stderr.split())
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["targets"] == [] and report["sets"] == ["source_val"] and report["passed"]
    onnx_row = next(a for a in report["artifacts"] if a["key"] == "onnx-fp32")
    assert onnx_row["agreement_by_set"] == {"source_val": 100.0}


def test_a_long_cpu_run_is_announced_with_its_estimate(tiny_domains, tmp_path, monkeypatch,
                                                       capfd):
    """After the first steps on a CPU, a run estimated past SLOW_HOURS says how long it takes
    and which settings fit; a run under it says nothing."""
    from dgkit import api
    from dgkit.distill import trainer
    from dgkit.train_config import TrainConfig

    config = dict(data=str(tiny_domains), targets=["sketch"], steps=4, image_size=32,
                  student_weights="none", batch_size=12, device="cpu")
    api.train(TrainConfig(**config), tmp_path / "fast", quiet=True)
    assert "warning" not in capfd.readouterr().err
    monkeypatch.setattr(trainer, "SLOW_HOURS", 0.0)
    api.train(TrainConfig(**config), tmp_path / "slow", quiet=True)
    err = " ".join(capfd.readouterr().err.split())
    assert "(4 steps of 12 images at 32 px) take about" in err
    assert "--steps 300 --image-size 96 --batch-size 24" in err


def test_a_missing_teacher_file_is_reported_before_any_decoding(tiny_domains, tmp_path):
    missing = tmp_path / "nowhere" / "clip.safetensors"
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--method", "kd",
                 "--teacher", f"dgkit-tiny-clip:{missing}", "--out", tmp_path / "run",
                 *[a for a in TINY if a != "--quiet"])  # progress shown: no "Decoding" line
    assert f"teacher checkpoint {missing} does not exist" in error_line(proc)
    assert "Decoding" not in proc.stderr and not (tmp_path / "run").exists()


def test_teacher_errors_are_shortened_at_a_word_never_mid_sentence():
    from dgkit.distill.teacher import first_sentence

    long = "size mismatch for visual.proj: copying a param with shape " + "[512, 768] " * 60
    short = first_sentence(long + "\nsecond line")
    assert short.endswith(" …") and len(short) <= 302
    assert long.startswith(short[:-2]) and long[len(short) - 2] == " "
    assert first_sentence("one line\nmore") == "one line"


def test_runs_started_together_point_latest_without_racing(tmp_path):
    """Several runs in one root update `latest` at the same moment (bench/efficacy.py runs
    them in parallel): none fails, and `latest` ends at one of them."""
    from concurrent.futures import ThreadPoolExecutor

    from dgkit.rundir import RunDir, update_latest

    runs = [RunDir(tmp_path / f"run{i}") for i in range(8)]
    for run in runs:
        run.path.mkdir()

    def point(run: RunDir) -> None:
        for _ in range(200):
            update_latest(run)

    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(point, runs))  # re-raises what a thread raised
    assert os.readlink(tmp_path / "latest") in {f"run{i}" for i in range(8)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", *sorted(r.path.name
                                                                            for r in runs)]
