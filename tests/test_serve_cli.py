"""`dgkit predict` and `dgkit bench infer` through Typer, as the main CLI wires them."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import (
    SERVE_EXTRA,
    SERVE_EXTRA_MISSING,
    cli_app,
    encode,
    make_model,
    needs_serve_extra,
    photo,
)
from typer.testing import CliRunner

from dgkit.errors import DgkitError
from dgkit.serve import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.fp32.onnx"
    make_model(path)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Three good images (one in a subfolder), one corrupt JPEG, one ignored text file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(photo(0)))
    (root / "b.jpg").write_bytes(encode(photo(3), "JPEG"))
    (root / "sub" / "c.png").write_bytes(encode(photo(8)))
    (root / "broken.jpg").write_bytes(encode(photo(1, 200, 200), "JPEG")[:250])
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root


def invoke(*args: str):
    return CliRunner().invoke(cli_app(), [str(a) for a in args])


def test_predict_folder_skips_corrupt_file(model: Path, folder: Path) -> None:
    result = invoke("predict", model, folder, "--top-k", "2")
    assert result.exit_code == 1, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    good = [folder / "a.png", folder / "b.jpg", folder / "sub" / "c.png"]
    want = Predictor(model).predict(good, top_k=2)
    for line, path, pred in zip(lines, good, want, strict=True):
        assert line.startswith(str(path))
        assert f"{pred.labels[0]} {pred.probs[0]:.3f}" in line
        assert f"{pred.labels[1]} {pred.probs[1]:.3f}" in line
    assert "broken.jpg" in result.stderr and "cannot be decoded" in result.stderr
    assert "1 of 4 images failed" in result.stderr
    assert "notes.txt" not in result.output


def test_predict_json_lines(model: Path, folder: Path) -> None:
    (folder / "broken.jpg").unlink()
    result = invoke("predict", model, folder, "--format", "json", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "c.png"]
    want = Predictor(model).predict([r["path"] for r in rows], top_k=5)
    for row, pred in zip(rows, want, strict=True):
        assert row["label"] == pred.label and row["prob"] == pytest.approx(pred.prob)
        assert [t["label"] for t in row["top_k"]] == list(pred.labels)
        assert sum(t["prob"] for t in row["top_k"]) == pytest.approx(1.0)


def test_predict_csv(model: Path, folder: Path) -> None:
    result = invoke("predict", model, folder / "a.png", folder / "b.jpg", folder / "nope.png",
                    "--format", "csv", "--top-k", "3")
    assert result.exit_code == 1  # nope.png does not exist
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    good = [folder / "a.png", folder / "b.jpg"]
    assert [r[0] for r in rows[1:]] == [str(p) for p in good]
    for row, pred in zip(rows[1:], Predictor(model).predict(good, top_k=3), strict=True):
        assert row[1::2] == list(pred.labels)
        assert [float(p) for p in row[2::2]] == pytest.approx(list(pred.probs), abs=1e-6)
    assert "nope.png does not exist" in result.stderr


def test_predict_many_files_keeps_stdout_clean(model: Path, tmp_path: Path) -> None:
    """Past the progress-bar threshold, stdout still holds exactly one JSON line per image."""
    for i in range(55):
        (tmp_path / f"{i:02d}.png").write_bytes(encode(photo(i % 5, 32, 32)))
    result = invoke("predict", model, tmp_path, "--format", "json", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [f"{i:02d}.png" for i in range(55)]


def test_predict_user_errors(model: Path, folder: Path, tmp_path: Path) -> None:
    result = invoke("predict", model, folder, "--format", "xml")
    assert isinstance(result.exception, DgkitError) and "table, json, csv" in str(
        result.exception)
    result = invoke("predict", tmp_path / "missing.onnx", folder)
    assert isinstance(result.exception, DgkitError) and "does not exist" in str(result.exception)
    result = invoke("predict", model, folder, "--backend", "gpu")
    assert isinstance(result.exception, DgkitError) and "unknown backend" in str(
        result.exception)
    (tmp_path / "empty").mkdir()
    result = invoke("predict", model, tmp_path / "empty")
    assert isinstance(result.exception, DgkitError) and "no images" in str(result.exception)


def test_bench_infer_json(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = invoke("bench", "infer", model, "--batch-sizes", "1,2", "--runs", "2",
                    "--backend", "ort-cpu", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    for row in data["results"]:
        assert set(data["columns"]) <= set(row)
        assert row["backend"] == "ort-cpu" and row["runs"] == 2
        assert row["latency_ms_p50"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"]
        assert row["preprocess_ms_p50"] > 0 and row["images_per_s"] > 0
        assert row["end_to_end_images_per_s"] < row["images_per_s"]
    table = result.stdout
    assert "prep ms p50" in table and "e2e img/s" in table and "ort-cpu" in table


@pytest.mark.parametrize(("args", "named"), [
    (["--batch-sizes", "1,x"], "'1,x'"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--runs", "0"], "--runs"),
    (["--clients", "-1"], "--clients"),
    (["--backend", "gpu"], "'gpu'"),
])
def test_bench_infer_bad_options_name_the_option_and_write_nothing(
        model: Path, tmp_path: Path, args: list[str], named: str) -> None:
    out = tmp_path / "bench.json"
    result = invoke("bench", "infer", model, *args, "--json", out)
    assert isinstance(result.exception, DgkitError), result.output
    assert named in str(result.exception)
    assert result.stdout == "" and not out.exists()


@pytest.mark.skipif(not (ROOT / "dgkit" / "__main__.py").exists(),
                    reason="needs the main dgkit CLI (dgkit/__main__.py)")
def test_predict_through_main_cli(model: Path, folder: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "dgkit", "predict", str(model), str(folder),
                          "--format", "json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert len(run.stdout.splitlines()) == 3 and "broken.jpg" in run.stderr
    run = subprocess.run([sys.executable, "-m", "dgkit", "predict", str(folder / "x.onnx"),
                          str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr


@needs_serve_extra
def test_bench_infer_load_tests_the_real_server(model: Path, tmp_path: Path) -> None:
    """One row per batching mode, path and client count; each row's requests all answered, as
    the clients saw them and as the server's /metrics counted them."""
    out, images = tmp_path / "bench.json", tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(encode(photo(i), "JPEG"))
    result = invoke("bench", "infer", model, "--batch-sizes", "1", "--runs", "2", "--backend",
                    "ort-cpu", "--clients", "1,3", "--requests", "7", "--batching", "off,2",
                    "--images", images, "--json", out)
    assert result.exit_code == 0, result.output
    http = json.loads(out.read_text())["http"]
    rows = http["rows"]
    assert [(r["batching"], r["path"], r["clients"]) for r in rows] == [
        (mode, path, n) for mode in ("off", "2") for path in ("predict", "v2") for n in (1, 3)]
    for r in rows:
        assert r["answered"] == r["server_answered"] == 7 and r["errors"] == 0
        assert r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
    assert "ratio" in result.stdout and "v2" in result.stdout


def test_load_test_counts_a_refused_connection_as_an_error() -> None:
    from dgkit.serve.bench import load_test

    assert load_test("http://127.0.0.1:9/predict", b"x", clients=2, requests=4,
                     timeout=5)["errors"] == 2  # nothing listens: each client fails once


@pytest.mark.parametrize("module", SERVE_EXTRA)
def test_missing_serve_extra_is_named_before_anything_runs(model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           module: str) -> None:
    """Without the serve extra, `serve` and `bench infer --clients` say which package and how
    to install it; the benchmark writes no results."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    missing = {module, *SERVE_EXTRA_MISSING}  # just `module` where the extra is installed
    result = invoke("serve", model, "--port", "1")
    assert isinstance(result.exception, DgkitError), result.output
    assert any(f"{m} is not installed" in str(result.exception) for m in missing)
    assert "pip install 'dgkit[serve]'" in str(result.exception)
    out = tmp_path / "bench.json"
    result = invoke("bench", "infer", model, "--clients", "2", "--json", out)
    assert isinstance(result.exception, DgkitError)
    assert any(f"{m} is not installed" in str(result.exception) for m in missing)
    assert result.stdout == "" and not out.exists()
