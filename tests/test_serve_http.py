"""The real HTTP server (`dgkit serve`) in a subprocess on a free localhost port, spoken to with
httpx: health, model info, one and several images, bad images, the size limit, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import (
    CLASSES,
    encode,
    free_port,
    huge_png,
    make_model,
    needs_serve_extra,
    photo,
)

from dgkit.serve import Predictor

pytestmark = needs_serve_extra
httpx = pytest.importorskip("httpx", reason="needs httpx (the 'dev' extra)")

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).with_name("serve_helpers.py")
MAIN_CLI = (ROOT / "dgkit" / "__main__.py").exists()


class Server:
    """`dgkit serve ...` (or the same command wired by the test helper) on a free port, its
    output read on a thread: a full pipe would block the server, and the test waits for the
    line uvicorn prints once its socket listens, not for a fixed time."""

    def __init__(self, args: list[str], main_cli: bool = MAIN_CLI) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        prefix = ["-m", "dgkit"] if main_cli else [str(HELPERS)]
        self.proc = subprocess.Popen(
            [sys.executable, *prefix, "serve", *args, "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()  # set by the listening line, or when output ends
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if f"running on {self.url}" in line:
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_listening(self, timeout: float = 60) -> str:
        if not self._ready.wait(timeout):
            self.proc.kill()
            raise AssertionError(f"server printed no listening line in {timeout:g} s: "
                                 f"{self.output}")
        if self.proc.poll() is not None or f"running on {self.url}" not in self.output:
            self.proc.kill()
            self._reader.join(timeout=10)
            raise AssertionError(f"server exited with {self.proc.wait()}: {self.output}")
        return self.url

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=10)
        return code, self.output


def start(args: list[str], main_cli: bool = MAIN_CLI) -> Server:
    server = Server(args, main_cli)
    server.wait_listening()
    return server


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.fp32.onnx"
    make_model(path)
    return path


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[str]:
    running = start([str(model), "--max-request-mb", "1", "--backend", "ort-cpu"])
    yield running.url
    code, output = running.stop()
    assert code == 0, output


def test_health_and_model(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/model").json()
    assert info["classes"] == CLASSES
    assert info["input_size"] == 32 and info["precision"] == "fp32"
    assert info["backend"] == "ort-cpu"


def test_predict_one_and_two(server: str, model: Path) -> None:
    a, b = encode(photo(0)), encode(photo(3), "JPEG")
    want = Predictor(model, "ort-cpu").predict([a, b], top_k=3)

    one = httpx.post(f"{server}/predict", files={"file": ("a.png", a, "image/png")})
    assert one.status_code == 200, one.text
    [row] = one.json()["predictions"]
    assert row["file"] == "a.png" and row["label"] == want[0].label
    assert row["prob"] == pytest.approx(want[0].prob, rel=1e-5)
    assert len(row["top_k"]) == 5 and sum(t["prob"] for t in row["top_k"]) == pytest.approx(1)

    two = httpx.post(f"{server}/predict?top_k=3",
                     files=[("file", ("a.png", a, "image/png")),
                            ("file", ("b.jpg", b, "image/jpeg"))])
    assert two.status_code == 200, two.text
    rows = two.json()["predictions"]
    assert [r["file"] for r in rows] == ["a.png", "b.jpg"]
    for r, w in zip(rows, want, strict=True):
        assert [t["label"] for t in r["top_k"]] == list(w.labels)
        assert [t["prob"] for t in r["top_k"]] == pytest.approx(list(w.probs), rel=1e-5)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"hello, I am text", "notes.txt cannot be decoded: not an image"),
    (b"", "notes.txt is empty"),
    (encode(photo(1, 200, 200), "JPEG")[:300], "notes.txt cannot be decoded"),
])
def test_bad_image_is_400_with_reason(server: str, payload: bytes, reason: str) -> None:
    good = encode(photo(0))
    r = httpx.post(f"{server}/predict", files=[("file", ("ok.png", good, "image/png")),
                                              ("file", ("notes.txt", payload, "text/plain"))])
    assert r.status_code == 400
    assert reason in r.json()["detail"]


def test_huge_image_is_400_not_a_crash(server: str, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    huge_png(huge)  # 20000 x 20000, about 50 KB: under the byte limit, over the pixel limit
    r = httpx.post(f"{server}/predict", files={"file": ("huge.png", huge.read_bytes())})
    assert r.status_code == 400
    assert re.search(r"huge\.png .*(too large|megapixel)", r.json()["detail"])
    assert httpx.get(f"{server}/health").status_code == 200


def test_missing_file_field_is_400(server: str) -> None:
    r = httpx.post(f"{server}/predict", files={"image": ("a.png", encode(photo(0)))})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = httpx.post(f"{server}/predict", content=b"raw bytes",
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400
    r = httpx.post(f"{server}/predict?top_k=0", files={"file": ("a.png", encode(photo(0)))})
    assert r.status_code == 400 and "top_k" in r.json()["detail"]


def test_over_size_limit_is_413(server: str) -> None:
    big = b"\0" * (1024 * 1024 + 10)
    r = httpx.post(f"{server}/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "1 MB" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b"x" * 65536

    r = httpx.post(f"{server}/predict", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_concurrent_clients(server: str, model: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = [encode(photo(s)) for s in (0, 3, 8, 5)]
    want = [p.label for p in Predictor(model, "ort-cpu").predict(images)]
    assert len(set(want)) > 1  # else a server answering one class for all would pass

    def ask(i: int) -> str:
        r = httpx.post(f"{server}/predict", files={"file": (f"{i}.png", images[i % 4])})
        return r.json()["predictions"][0]["label"]

    with ThreadPoolExecutor(8) as pool:
        labels = list(pool.map(ask, range(16)))
    assert labels == [want[i % 4] for i in range(16)]


def test_sigterm_exits_zero_promptly(model: Path) -> None:
    running = start([str(model)])  # no --host: localhost only
    assert httpx.get(f"{running.url}/health").status_code == 200
    began = time.monotonic()
    code, output = running.stop()
    assert code == 0, output
    assert time.monotonic() - began < 5
    assert f"serving {model.name} ({len(CLASSES)} classes)" in output
    assert "0.0.0.0" not in output, output  # bound to localhost by default


@pytest.mark.parametrize(("args", "named"), [
    (["{missing}"], "{missing}"),
    (["{model}", "--max-request-mb", "0"], "--max-request-mb"),
    (["{model}", "--port", "70000"], "--port"),
])
def test_serve_user_errors(args: list[str], named: str, model: Path, tmp_path: Path) -> None:
    """A bad model file or option: exit 2 with one `error:` line naming it, nothing served."""
    missing = tmp_path / "none.onnx"
    args = [a.format(missing=missing, model=model) for a in args]
    prefix = ["-m", "dgkit"] if MAIN_CLI else [str(HELPERS)]
    run = subprocess.run([sys.executable, *prefix, "serve", *args], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "running on" not in run.stderr + run.stdout
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, run.stderr
    assert named.format(missing=missing) in lines[0]


def test_load_test_counts_refused_requests_as_errors(server: str) -> None:
    from dgkit.serve.bench import load_test, sample_jpeg

    good = load_test(f"{server}/predict", sample_jpeg(), clients=2, requests=5)
    assert good["answered"] == 5 and good["errors"] == 0
    bad = load_test(f"{server}/predict", b"not an image", clients=2, requests=6)
    assert bad["answered"] == 0 and bad["errors"] == 6 and bad["latency_ms_p50"] is None
