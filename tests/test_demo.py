"""`dgkit demo`: the real Gradio app on a free localhost port, driven with gradio_client.

One tiny KD run (random tiny CLIP teacher) exported with `dgkit export`; the student's answers
must be the serve Predictor's, the teacher's CLIP zero-shot over the run's prompts. Bad input
(not an image, corrupt, 20000x20000, nothing) gives a message in the UI, never a crash; a run
without an export falls back to the torch student and says so; a missing teacher says why.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY, dgkit, error_line
from conftest import PACS
from PIL import Image
from serve_helpers import free_port, huge_png

pytest.importorskip("gradio", reason="needs the 'demo' extra (gradio)")
pytest.importorskip("gradio_client", reason="needs gradio_client (installed with gradio)")
httpx = pytest.importorskip("httpx", reason="needs httpx (the 'dev' extra)")

from gradio_client import Client, handle_file  # noqa: E402

from dgkit.serve import Predictor  # noqa: E402

CLASSES = ["circle", "square", "triangle"]
_RUNS: dict[str, Path] = {}  # built once per session, also for test_demo_browser


def exported_run(tmp_path_factory: pytest.TempPathFactory, tiny_domains: Path,
                 tiny_teacher: str) -> Path:
    """A 3-step KD run with its FP32 ONNX export and validation report (about a minute)."""
    if "run" not in _RUNS:
        run = tmp_path_factory.mktemp("demo") / "run"
        dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--method", "kd",
              "--teacher", tiny_teacher, "--steps", "3", *TINY, "--out", run, check=True)
        proc = dgkit("export", run, "--max-images", "16")
        assert proc.returncode == 0, proc.stderr  # FP32 ONNX only: it matches torch
        assert (run / "export" / "model.onnx").is_file(), proc.stderr
        _RUNS["run"] = run
    return _RUNS["run"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_domains, tiny_teacher) -> Path:
    return exported_run(tmp_path_factory, tiny_domains, tiny_teacher)


def start(run: Path, **kwargs) -> tuple[str, object]:
    from dgkit.demo.app import build_app, launch

    app = build_app(run, **kwargs)
    url = launch(app, port=free_port(), block=False, quiet=True)
    return url.rstrip("/"), app


@pytest.fixture(scope="module")
def demo_url(demo_run: Path) -> Iterator[str]:
    url, app = start(demo_run)
    try:
        yield url
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(demo_url: str) -> Client:
    return Client(demo_url, verbose=False)


def classify(client: Client, *paths: Path, artifact: str = "onnx") -> tuple[dict, str]:
    payload, status = client.predict([handle_file(str(p)) for p in paths], artifact,
                                     api_name="/classify")
    return payload, status


def check_top_k(answer: dict, k: int) -> None:
    labels = [e["label"] for e in answer["top_k"]]
    probs = [e["prob"] for e in answer["top_k"]]
    assert len(labels) == k and len(set(labels)) == k and set(labels) <= set(CLASSES)
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert answer["label"] == labels[0]
    assert answer["infer_ms"] > 0 and answer["prep_ms"] >= 0


def check_against_predictor(run: Path, image: Path, answer: dict) -> None:
    """The student column is exactly what the edge runtime says for this file."""
    pred = Predictor(run / "export" / "model.onnx").predict(image, top_k=5)[0]
    assert answer["label"] == pred.label
    assert [e["label"] for e in answer["top_k"]] == list(pred.labels)
    np.testing.assert_allclose([e["prob"] for e in answer["top_k"]], pred.probs, atol=1e-5)


def teacher_reference(run: Path, image: Path) -> np.ndarray:
    """CLIP zero-shot computed here from the teacher and the run's prompts, independently."""
    import torch

    from dgkit.distill.teacher import load_teacher
    from dgkit.preprocess import PreprocessSpec, load_prepared, to_model_input

    config = json.loads((run / "run.json").read_text())
    teacher = load_teacher(config["train"]["teacher"])
    text = teacher.class_embeddings(config["prompt_names"], config["train"]["templates"])
    x = load_prepared(image, PreprocessSpec(teacher.image_size, teacher.image_size))
    with torch.no_grad():
        z = 100.0 * teacher.encode_images(torch.from_numpy(to_model_input(x[None]))) @ text.T
    return torch.softmax(z.double(), -1)[0].numpy()


# ------------------------------------------------------------------ good images
def test_tiny_image_both_top_k_and_student_matches_predictor(client, demo_run, tiny_domains):
    image = tiny_domains / "sketch" / "triangle" / "002.png"
    payload, status = classify(client, image)
    assert payload["artifact"] == "onnx" and payload["teacher_available"]
    (r,) = payload["results"]
    assert r["error"] is None and r["name"] == "002.png"
    check_top_k(r["teacher"], 3)  # top-5 of 3 classes
    check_top_k(r["student"], 3)
    check_against_predictor(demo_run, image, r["student"])
    ref = teacher_reference(demo_run, image)
    got = {e["label"]: e["prob"] for e in r["teacher"]["top_k"]}
    np.testing.assert_allclose([got[c] for c in CLASSES], ref, atol=1e-4)
    assert r["agree"] == (r["teacher"]["label"] == r["student"]["label"])
    assert "Classified 1 image" in status and "student median" in status


@pytest.mark.pacs
def test_pacs_photo_both_top_k_and_student_matches_predictor(client, demo_run):
    image = sorted((PACS / "sketch" / "dog").iterdir())[0]
    other = sorted((PACS / "photo" / "horse").iterdir())[0]
    payload, _ = classify(client, image, other)
    assert [r["name"] for r in payload["results"]] == [image.name, other.name]
    for path, r in zip((image, other), payload["results"], strict=True):
        assert r["error"] is None
        check_top_k(r["teacher"], 3)
        check_top_k(r["student"], 3)
        check_against_predictor(demo_run, path, r["student"])


def test_examples_of_every_domain_mark_the_unseen_one(client):
    payload, status = client.predict("onnx", api_name="/examples")
    results = payload["results"]
    assert {r["domain"] for r in results} == {"cartoon", "photo", "sketch"}
    assert all(r["unseen_domain"] == (r["domain"] == "sketch") for r in results)
    assert all(r["true_class"] in CLASSES and r["student"] for r in results)
    assert "labelled examples" in status


def test_every_exported_artifact_can_be_picked(client, tiny_domains, demo_run):
    """The ONNX student answers as the edge Predictor does; the torch student as the run's
    student rebuilt here from student.json and the weights."""
    import torch

    from dgkit.distill.students import load_student
    from dgkit.preprocess import load_prepared, to_model_input
    from dgkit.rundir import RunDir

    image = tiny_domains / "photo" / "circle" / "001.png"
    payload, _ = classify(client, image, artifact="onnx")
    assert payload["artifact"] == "onnx"
    check_against_predictor(demo_run, image, payload["results"][0]["student"])
    payload, _ = classify(client, image, artifact="torch")
    assert payload["artifact"] == "torch"
    answer = payload["results"][0]["student"]
    check_top_k(answer, 3)
    spec = RunDir(demo_run).config().preprocess
    with torch.no_grad():
        logits = load_student(RunDir(demo_run))(
            torch.from_numpy(to_model_input(load_prepared(image, spec)[None])))
    assert answer["label"] == CLASSES[int(logits.argmax())]


def test_header_shows_sizes_and_reported_accuracy(demo_url, demo_run):
    config = httpx.get(f"{demo_url}/config", timeout=10).json()
    text = json.dumps(config)
    assert "Plumbing check" in text  # the random tiny teacher is labelled as such
    assert "model.onnx" in text and "parameters" in text and "precision" in text
    assert "sketch" in text and "(unseen)" in text and "Reported accuracy" in text
    report = json.loads((demo_run / "export" / "report.json").read_text())
    onnx = next(a for a in report["artifacts"] if a["file"] == "model.onnx")
    assert f"{onnx['accuracy']['sketch']:.1f}" in text


# ------------------------------------------------------------------ bad input
def test_bad_files_get_a_message_and_the_good_one_still_runs(client, tmp_path, tiny_domains):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    good = tiny_domains / "cartoon" / "square" / "000.png"
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    huge = tmp_path / "huge.png"
    huge_png(huge)  # a valid 20000x20000 PNG of ~50 KB
    payload, status = classify(client, text, corrupt, huge, good)
    by_name = {r["name"]: r for r in payload["results"]}
    assert "not an image" in by_name["notes.txt"]["error"]
    assert "broken.png cannot be decoded" in by_name["broken.png"]["error"]
    huge_error = by_name["huge.png"]["error"]
    assert huge_error.startswith("huge.png is") and ("too large" in huge_error
                                                     or "megapixel" in huge_error)
    for name in ("notes.txt", "broken.png", "huge.png"):
        assert by_name[name]["student"] is None and str(tmp_path) not in by_name[name]["error"]
    assert by_name["000.png"]["error"] is None and by_name["000.png"]["student"]
    assert "3 files rejected" in status
    # the app is still there
    payload, _ = classify(client, good)
    assert payload["results"][0]["error"] is None


def test_empty_submission_says_what_to_do(client):
    payload, status = client.predict([], "onnx", api_name="/classify")
    assert payload["results"] == [] and "Upload" in status


def test_run_without_export_falls_back_to_torch_and_says_so(demo_run, tmp_path, tiny_domains):
    run = Path(shutil.copytree(demo_run, tmp_path / "unexported", ignore=shutil.ignore_patterns(
        "export", "tensorboard")))
    url, app = start(run)
    try:
        assert "Not the shipped model" in httpx.get(f"{url}/config", timeout=10).text
        image = tiny_domains / "sketch" / "square" / "001.png"
        payload, _ = classify(Client(url, verbose=False), image, artifact="torch")
        assert payload["artifact"] == "torch" and "FP32 torch" in payload["student"]
        (r,) = payload["results"]
        check_top_k(r["student"], 3)
        check_top_k(r["teacher"], 3)
        # the torch student and its ONNX export agree on the class
        assert r["student"]["label"] == Predictor(
            demo_run / "export" / "model.onnx").predict(image)[0].label
    finally:
        app.close()


def test_missing_teacher_weights_leave_the_student_running(demo_run, tmp_path, tiny_domains):
    run = Path(shutil.copytree(demo_run, tmp_path / "edge", ignore=shutil.ignore_patterns(
        "tensorboard", "cache")))
    config = json.loads((run / "run.json").read_text())
    config["train"]["teacher"] = "dgkit-tiny-clip:/nowhere/tiny_clip.safetensors"
    (run / "run.json").write_text(json.dumps(config))
    url, app = start(run)
    try:
        image = tiny_domains / "photo" / "triangle" / "003.png"
        payload, status = classify(Client(url, verbose=False), image)
        assert not payload["teacher_available"]
        assert "/nowhere/tiny_clip.safetensors does not exist" in payload["teacher_reason"]
        (r,) = payload["results"]
        assert r["teacher"] is None and r["agree"] is None
        check_against_predictor(demo_run, image, r["student"])
        assert "Teacher unavailable" in httpx.get(f"{url}/config", timeout=10).text
    finally:
        app.close()


# ------------------------------------------------------------------ the command
def test_queue_is_bounded_and_binds_localhost(demo_run):
    import socket

    from dgkit.demo.app import CONCURRENCY, QUEUE_SIZE, build_app, launch
    from dgkit.errors import DgkitError

    app = build_app(demo_run, teacher=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(DgkitError, match="pass another --port"):
            launch(app, port=busy.getsockname()[1], block=False, quiet=True)
    url = launch(app, port=free_port(), block=False, quiet=True)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert app._queue.default_concurrency_limit == CONCURRENCY
        assert app._queue.max_size == QUEUE_SIZE
        assert not app.share
    finally:
        app.close()


def test_cli_serves_the_demo(demo_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgkit", "demo", str(demo_run), "--port",
                             str(port), "--no-teacher", "--artifact", "onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # read on a thread, so that a full pipe never blocks the demo
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    announced = f"dgkit demo of run on http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        # The announcement is printed once the server listens.
        while not any(announced in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"dgkit demo did not start: {''.join(lines)}"
            time.sleep(0.2)
        page = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10)
        assert page.status_code == 200
        assert "switched off (--no-teacher)" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    assert "Traceback" not in "".join(lines), "".join(lines)


def test_cli_user_errors_are_one_line(tmp_path, demo_run):
    assert "does not exist" in error_line(dgkit("demo", tmp_path / "nope"))
    line = error_line(dgkit("demo", demo_run, "--artifact", "int4"))
    assert "unknown --artifact 'int4'" in line
    line = error_line(dgkit("demo", demo_run, "--artifact", "int8"))  # not exported
    assert "has no INT8 ONNX model" in line and "dgkit export" in line


def test_missing_gradio_names_the_extra(monkeypatch, demo_run):
    import importlib.util

    from dgkit.demo import commands
    from dgkit.errors import DgkitError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(DgkitError, match=r"pip install 'dgkit\[demo\]'"):
        commands.demo(run=demo_run)


def test_a_picture_of_any_mode_is_fine(client, tmp_path, demo_run):
    """Greyscale, RGBA and a big JPEG all go through the one preprocessing path."""
    paths = []
    for mode, size, fmt in (("L", (50, 30), "PNG"), ("RGBA", (64, 64), "PNG"),
                            ("RGB", (3000, 2000), "JPEG")):
        path = tmp_path / f"pic_{mode}.{fmt.lower()}"
        Image.new(mode, size, 120).save(path, fmt)
        paths.append(path)
    payload, _ = classify(client, *paths)
    for path, result in zip(paths, payload["results"], strict=True):
        assert result["error"] is None
        check_against_predictor(demo_run, path, result["student"])


def test_report_json_is_read_defensively(demo_run, tmp_path):
    """A broken or unknown export/report.json still lets the header build (with a note), and
    the typed report's rows carry its accuracies as they are."""
    from dgkit.demo.models import SOURCES, report_rows, run_info
    from dgkit.records import ArtifactResult, ValidationReport
    from dgkit.rundir import RunDir

    run = RunDir(shutil.copytree(demo_run, tmp_path / "run", ignore=shutil.ignore_patterns(
        "tensorboard", "cache", "*.onnx")))
    config, summary = run.config(), run.summary()
    for broken in ("{not json", "[1, 2]", '{"format": 9, "artifacts": []}', '{"artifacts": [7]}'):
        (run.export / "report.json").write_text(broken)
        info = run_info(run, config, summary)
        assert [r.model for r in info.rows] == ["Teacher (CLIP zero-shot)",
                                                "Student FP32 (training evaluation)"]
        assert any("report.json cannot be read" in n for n in info.notes), broken
    report = ValidationReport("run", "cpu", ["sketch"], ["sketch", "source_val"],
                              {"sketch": 8, "source_val": 4}, 1.0, False, [
        ArtifactResult("onnx-int8", "model.int8.onnx", "int8", "ort-cpu", 1.5,
                       {"sketch": 62.5, "source_val": 50.0}, latency_ms=2.5,
                       failures=["too slow"]),
        ArtifactResult("trt-int8", "model.int8.plan", "int8", "tensorrt", 2.0,
                       skipped="not runnable here: no GPU"),
        ArtifactResult("onnx-fp16", "model.fp16.onnx", "fp16", "ort-cpu", 2.0)])
    rows = report_rows(report, ["sketch"])
    assert rows[0].accuracy == {"sketch": 62.5, SOURCES: 50.0}
    assert rows[0].status == "too slow" and rows[0].size_bytes == int(1.5 * 2**20)
    assert rows[1].status.startswith("not runnable") and rows[1].accuracy == {}
    assert len(rows) == 2  # a row with no accuracy and nothing to say is left out
