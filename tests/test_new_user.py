"""What a new user meets first: each bad input gets one sentence naming the file or option, a
non-zero exit, and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from cli_helpers import TINY, dgkit, error_line
from serve_helpers import SPEC, encode, make_model, photo

from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec
from dgkit.rundir import new_run, resolve_run
from dgkit.train_config import TrainConfig


@pytest.fixture(scope="module")
def finished_run(tiny_domains, tmp_path_factory) -> Path:
    """A finished tiny run, read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("new_user") / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "3",
          "--eval-every", "3", "--out", out, *TINY, check=True)
    return out


def _copy(run: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run, dest, symlinks=True))


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------ 1. resume of a finished run
def test_resume_refuses_a_finished_run_and_touches_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    (run / ".checkpoint.pt.k2j4.tmp").write_bytes(b"left by a kill")
    before = _snapshot(run)
    proc = dgkit("distill", "--resume", run, "--quiet")
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"--resume {run} is a finished run" in line and "--overwrite" in line
    assert _snapshot(run) == before


# ------------------------------------------------------------ 2. runs/latest after a failure
def test_a_run_that_fails_while_decoding_leaves_latest_where_it_was(finished_run, domains_copy,
                                                                    tmp_path):
    runs = tmp_path / "runs"
    _copy(finished_run, runs / "a")
    os.symlink("a", runs / "latest")
    before = _snapshot(runs / "a")
    (domains_copy / "photo" / "circle" / "001.png").write_bytes(b"not a png")
    proc = dgkit("distill", "--data", domains_copy, "--target", "sketch", "--steps", "3",
                 "--out", runs / "b", *TINY)
    assert proc.returncode == 2 and "cannot be decoded" in error_line(proc)
    assert not (runs / "b").exists()
    assert os.readlink(runs / "latest") == "a"
    assert _snapshot(runs / "a") == before


@pytest.mark.parametrize("previous, keeps, latest", [
    (None, False, None),  # nothing before: no link left pointing at nothing
    ("a", False, "a"),  # removed: back to the previous run
    ("a", True, "b"),  # a failed run that keeps a checkpoint can be resumed through latest
])
def test_new_run_points_latest_only_at_a_run_that_exists(tmp_path, previous, keeps, latest):
    if previous:
        (tmp_path / previous).mkdir()
        os.symlink(previous, tmp_path / "latest")
    with pytest.raises(RuntimeError), new_run(tmp_path / "b", overwrite=False) as run:
        assert os.readlink(tmp_path / "latest") == "b"
        if keeps:
            run.checkpoint.write_bytes(b"state")
        raise RuntimeError("training failed")
    assert (tmp_path / "b").exists() == keeps
    link = tmp_path / "latest"
    assert (os.readlink(link) if link.is_symlink() else None) == latest


# ------------------------------------------------------------ 3. after dgkit quickstart
def test_without_runs_latest_the_quickstart_run_is_used_and_named(finished_run, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DgkitError, match="runs/latest does not exist; name a run directory"):
        resolve_run(None)
    _copy(finished_run, tmp_path / "quickstart" / "run")
    assert resolve_run(None).path == (tmp_path / "quickstart" / "run").resolve()
    assert "using quickstart/run, the quickstart's run" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    os.symlink("../quickstart/run", tmp_path / "runs" / "latest")
    assert resolve_run(None).path == (tmp_path / "quickstart" / "run").resolve()
    assert "using" not in capsys.readouterr().err  # runs/latest comes first, silently


# ------------------------------------------------------------ 4. files left by killed writes
def test_export_without_a_run_after_quickstart_cleans_stale_temporary_files(finished_run,
                                                                           tmp_path):
    run = _copy(finished_run, tmp_path / "quickstart" / "run")
    export = run / "export"
    export.mkdir()
    (export / ".model.int8.onnx.a8f3kq.tmp").write_bytes(b"half an int8 model")
    (export / ".notes.tmp").write_text("mine")  # not an atomic write's name: kept
    proc = dgkit("export", "--no-validate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "using quickstart/run" in proc.stderr
    assert (export / "model.onnx").is_file()
    assert sorted(p.name for p in export.glob(".*")) == [".notes.tmp"]


def test_resume_removes_stale_temporary_files(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "finished": False}))
    stale = [run / ".checkpoint.pt.x1y2z3.tmp", run / ".student.safetensors.q9w8.tmp"]
    for path in stale:
        path.write_bytes(b"left by a kill")
    (run / ".mine.tmp").write_text("mine")
    dgkit("distill", "--resume", run, "--quiet", check=True)
    assert not any(p.exists() for p in stale)
    assert (run / ".mine.tmp").read_text() == "mine"
    assert json.loads((run / "summary.json").read_text())["finished"]


# ------------------------------------------------------------ 5. training options
@pytest.mark.parametrize("option, value, message", [
    ("lr", float("nan"), "--lr must be a positive number, got nan"),
    ("lr", float("inf"), "--lr must be a positive number, got inf"),
    ("lr", 0.0, "--lr must be a positive number, got 0.0"),
    ("eval_every", -1, "--eval-every must be at least 1, got -1"),
    ("eval_every", 0, "--eval-every must be at least 1, got 0"),
    ("checkpoint_every", -5, "--checkpoint-every must be at least 1, got -5"),
    ("warmup_steps", -1, "--warmup-steps must be at least 0, got -1"),
])
def test_train_config_names_the_bad_option(option, value, message):
    with pytest.raises(DgkitError) as err:
        TrainConfig(data="d", targets=["t"], **{option: value})
    assert str(err.value) == message
    TrainConfig(data="d", targets=["t"], warmup_steps=0)  # no warmup is allowed


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--eval-every", "-3"], "--eval-every must be at least 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
])
def test_distill_refuses_bad_numbers_before_writing(tiny_domains, tmp_path, args, message):
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--out",
                 tmp_path / "run", *TINY, *args)
    assert proc.returncode == 2 and message in error_line(proc)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ 6. model metadata
@pytest.mark.parametrize("key, value, message", [
    ("interpolation", "nearest", "interpolation 'nearest' is not one of: bilinear, bicubic"),
    ("resize_size", "20000", "resize_size 20000 is not between 1 and 4096"),
])
def test_bad_preprocessing_metadata_is_refused_on_load(tmp_path, key, value, message):
    path = tmp_path / "model.onnx"
    make_model(path)
    model = onnx.load(str(path))
    next(p for p in model.metadata_props if p.key == key).value = value
    onnx.save(model, str(path))
    image = tmp_path / "a.png"
    image.write_bytes(encode(photo(0)))
    before = path.read_bytes(), image.read_bytes()
    proc = dgkit("predict", path, image)
    assert proc.returncode == 2
    assert error_line(proc) == f"error: {path} has broken dgkit metadata: {message}"
    assert (path.read_bytes(), image.read_bytes()) == before
    with pytest.raises(DgkitError, match="m.onnx has broken"):
        PreprocessSpec.from_metadata({**SPEC.to_metadata(), key: value}, "m.onnx")


# ------------------------------------------------------------ 7. messages
@pytest.mark.parametrize("names, message", [
    (["a.png"], "the image failed; nothing was classified"),
    (["a.png", "b.png"], "all 2 images failed; nothing was classified"),
    (["a.png", "good.png"], "1 of 2 images failed; 1 classified"),
])
def test_predict_says_how_many_images_were_classified(tmp_path, names, message):
    model = tmp_path / "model.onnx"
    make_model(model)
    for name in names:
        data = encode(photo(0)) if name == "good.png" else b"not an image"
        (tmp_path / name).write_bytes(data)
    proc = dgkit("predict", model, *(tmp_path / n for n in names))
    assert proc.returncode == 1
    assert message in proc.stderr and "the others" not in proc.stderr
    assert len(proc.stdout.splitlines()) == names.count("good.png")


def test_calibration_warning_names_the_count_without_saying_it_was_asked_for(
        tiny_domains, tmp_path, capsys):
    from dgkit.data import discover
    from dgkit.export.images import calibration_pixels

    data = discover(tiny_domains)
    pixels, info = calibration_pixels(data, ["cartoon", "photo"], 0, 512, PreprocessSpec(32, 32),
                                      tmp_path / "calibration.npz")
    err = " ".join(capsys.readouterr().err.split())
    assert "INT8 calibration takes 512 images (--calib-images)" in err
    assert "has only 40 images; using all of them" in err and "asked" not in err
    assert len(pixels) == info["images"] == 40


@pytest.mark.parametrize("command", [["data", "check"], ["distill", "--target", "sketch",
                                                         "--data"]])
def test_a_folder_of_images_is_not_called_empty(tmp_path, command):
    flat = tmp_path / "photos"
    flat.mkdir()
    for i in range(5):
        (flat / f"{i}.png").write_bytes(encode(photo(i)))
    (flat / "notes.txt").write_text("mine")
    before = _snapshot(flat)
    proc = dgkit(*command, flat, cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line == (f"error: data root {flat} has no domain folders (found 5 images, 1 other "
                    "file in it): expected <root>/<domain>/<class>/<image>")
    assert _snapshot(flat) == before and not (tmp_path / "runs").exists()


def test_a_domain_without_class_folders_says_what_it_holds(tmp_path):
    from dgkit.data import discover

    (tmp_path / "root" / "photo").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "root" / "photo" / f"{i}.png").write_bytes(encode(photo(i)))
    with pytest.raises(DgkitError, match=r"domain 'photo' .* has no images in class folders "
                       r"\(found 3 images in it\): expected <root>/<domain>/<class>/<image>"):
        discover(tmp_path / "root")
