"""The real HTTP server (`dgkit serve`) in a subprocess on a free localhost port, spoken to with
httpx: health, model info, one and several images, bad images, the byte and pixel limits, the
request timeout, a client that leaves, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
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
from dgkit.serve.limits import ServeLimits

pytestmark = needs_serve_extra
httpx = pytest.importorskip("httpx", reason="needs httpx (the 'dev' extra)")

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).with_name("serve_helpers.py")
MAIN_CLI = (ROOT / "dgkit" / "__main__.py").exists()
IMAGE_MP = ServeLimits.max_image_megapixels  # the defaults the server starts with
REQUEST_MP = ServeLimits.max_request_megapixels


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
        self._printed = threading.Condition()  # notified at each line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._printed:
                self.lines.append(line)
                self._printed.notify_all()
            if f"running on {self.url}" in line:
                self._ready.set()
        self._ready.set()

    def wait_for(self, pattern: str, since: int, timeout: float = 60) -> re.Match[str]:
        """The first line matching `pattern` among those printed after the first `since`."""
        def found() -> re.Match[str] | None:
            return next((m for ln in self.lines[since:] if (m := re.search(pattern, ln))), None)

        with self._printed:
            if not self._printed.wait_for(found, timeout):
                raise AssertionError(f"server printed no line matching {pattern!r} in "
                                     f"{timeout:g} s: {self.output}")
            return found()

    def reset_peak_memory(self) -> None:
        """Start VmHWM afresh from the current resident memory (Linux 4.0 and later)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def memory_mb(self) -> tuple[float, float]:
        """The server's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status)[1]) / 1024
                     for key in ("VmRSS", "VmHWM"))

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
def running(model: Path) -> Iterator[Server]:
    """The server with its default pixel limits and timeout."""
    server = start([str(model), "--max-request-mb", "1", "--backend", "ort-cpu"])
    yield server
    code, output = server.stop()
    assert code == 0, output


@pytest.fixture(scope="module")
def server(running: Server) -> str:
    return running.url


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


def test_huge_image_is_413_not_a_crash(server: str, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    huge_png(huge)  # 20000 x 20000, about 50 KB: under the byte limit, over the pixel limit
    r = httpx.post(f"{server}/predict", files={"file": ("huge.png", huge.read_bytes())})
    assert r.status_code == 413
    assert re.fullmatch(rf"huge\.png is too large: over \d+ megapixels, above the "
                        rf"{IMAGE_MP:g}-megapixel limit per image; .*--max-image-megapixels",
                        r.json()["detail"])
    assert httpx.get(f"{server}/health").status_code == 200


def test_tiny_file_of_huge_dimensions_is_refused_from_its_header(model: Path) -> None:
    """A one-colour 8000x8000 PNG is ~200 KB but 64 megapixels: 413 from its header, and the
    server's memory never holds its pixels (a fresh server, so that its peak is this test's)."""
    side = 8000
    data = encode(Image.new("RGB", (side, side), (200, 30, 40)))
    assert len(data) < 2**20  # well under the byte limit: only a pixel limit can refuse it
    running = start([str(model), "--backend", "ort-cpu"])
    try:
        rss, _ = running.memory_mb()
        r = httpx.post(f"{running.url}/predict", files={"file": ("big.png", data, "image/png")})
        _, peak = running.memory_mb()
    finally:
        code, output = running.stop()
    assert r.status_code == 413, r.text[:300]
    assert r.json()["detail"] == (
        f"big.png is {side}x{side} pixels, {side * side / 1e6:.1f} megapixels, over the "
        f"{IMAGE_MP:g}-megapixel limit per image; send a smaller image or raise "
        "--max-image-megapixels")
    decoded_mb = side * side * 3 / 2**20  # 183 MB: the least its RGB pixels would take
    assert peak - rss < decoded_mb / 4, (rss, peak)
    assert code == 0, output


def test_pixels_in_flight_bound_the_memory_of_concurrent_requests(model: Path) -> None:
    """Four clients at once, each with a 16-megapixel image, and room for one such image in
    flight: the server's peak is that of one decode, not of several."""
    side = 4000
    data = encode(Image.new("RGB", (side, side), (20, 200, 90)))
    mp = f"{side * side / 1e6:g}"
    running = start([str(model), "--max-image-megapixels", mp, "--max-inflight-megapixels", mp,
                     "--backend", "ort-cpu"])

    def ask(i: int) -> int:
        files = {"file": (f"{i}.png", data, "image/png")}
        return httpx.post(f"{running.url}/predict", files=files, timeout=60).status_code

    def peak_growth(clients: int) -> float:
        running.reset_peak_memory()
        rss, _ = running.memory_mb()
        with ThreadPoolExecutor(clients) as pool:
            assert list(pool.map(ask, range(clients))) == [200] * clients
        return running.memory_mb()[1] - rss

    try:
        ask(0)  # warm-up: first-call allocations are not the decode's
        one = peak_growth(1)
        four = peak_growth(4)
    finally:
        code, output = running.stop()
    assert one > side * side * 3 / 2**20  # a decode shows: at least its RGB pixels (46 MB)
    assert four < 1.5 * one, (one, four)
    assert code == 0, output


FRAME_SIDE = 2000
FRAME_MP = FRAME_SIDE**2 / 1e6


def frames(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """`count` one-colour FRAME_SIDE-square RGBA PNGs: 20 KB each on the wire, FRAME_MP
    megapixels decoded, and slow to decode (alpha is composited onto white)."""
    data = encode(Image.new("RGBA", (FRAME_SIDE, FRAME_SIDE), (10, 20, 30, 128)))
    return [("file", (f"{i}.png", data, "image/png")) for i in range(count)]


def test_request_over_the_pixel_budget_is_refused_before_decoding(server: str,
                                                                  model: Path) -> None:
    n = int(REQUEST_MP // FRAME_MP) + 1  # each image is within the limit, together not
    files = frames(n)
    began = time.monotonic()
    Predictor(model, "ort-cpu").prepare(files[0][1][1])
    decode_s = (time.monotonic() - began) * n  # what decoding them all would take here
    began = time.monotonic()
    r = httpx.post(f"{server}/predict", files=files, timeout=60)
    elapsed = time.monotonic() - began
    assert r.status_code == 413, r.text[:300]
    assert r.json()["detail"] == (
        f"the {n} images are {n * FRAME_MP:.1f} megapixels in all, over the {REQUEST_MP:g}"
        "-megapixel limit per request; send fewer or smaller images or raise "
        "--max-request-megapixels")
    assert elapsed < decode_s / 4, (elapsed, decode_s)


@pytest.fixture(scope="module")
def slow(model: Path) -> Iterator[Server]:
    """A server given room for a request of MAX_FILES frames, ~10 s of decoding on one core,
    and a 2 s timeout."""
    from dgkit.serve.app import MAX_FILES

    server = start([str(model), "--request-timeout", "2", "--max-request-megapixels",
                    str(MAX_FILES * FRAME_MP), "--backend", "ort-cpu"])
    yield server
    code, output = server.stop()
    assert code == 0, output


def test_client_that_leaves_stops_its_request(slow: Server) -> None:
    from dgkit.serve.app import MAX_FILES

    since = len(slow.lines)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up well before the timeout
        httpx.post(f"{slow.url}/predict", files=frames(MAX_FILES),
                   timeout=httpx.Timeout(30, read=0.8))
    line = slow.wait_for(r"stopped POST /predict \(the client disconnected\)"
                         r"(?: after (\d+) of (\d+) images)?", since)
    assert line[2] == str(MAX_FILES), line[0]  # it had started on the images...
    assert int(line[1]) < MAX_FILES, line[0]  # ...and left the rest undecoded
    r = httpx.post(f"{slow.url}/predict", files={"file": ("a.png", encode(photo(0)))})
    assert r.status_code == 200, r.text


def test_request_over_the_timeout_gets_504_and_stops(slow: Server) -> None:
    from dgkit.serve.app import MAX_FILES

    since = len(slow.lines)
    r = httpx.post(f"{slow.url}/predict", files=frames(MAX_FILES), timeout=60)
    assert r.status_code == 504, r.text[:300]
    assert r.json()["detail"] == (
        "the request took longer than the 2 s --request-timeout and was stopped")
    line = slow.wait_for(r"stopped POST /predict \(over --request-timeout\)"
                         r" after (\d+) of (\d+) images", since)
    assert line[2] == str(MAX_FILES) and int(line[1]) < MAX_FILES, line[0]
    assert httpx.get(f"{slow.url}/health").status_code == 200


def test_model_reports_the_limits(server: str) -> None:
    limits = httpx.get(f"{server}/model").json()["limits"]
    assert limits == {"max_request_mb": 1.0, "max_image_megapixels": IMAGE_MP,
                      "max_request_megapixels": REQUEST_MP,
                      "max_inflight_megapixels": ServeLimits.max_inflight_megapixels,
                      "request_timeout": ServeLimits.request_timeout}


def test_missing_file_field_is_400(server: str) -> None:
    r = httpx.post(f"{server}/predict", files={"image": ("a.png", encode(photo(0)))})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = httpx.post(f"{server}/predict", content=b"raw bytes",
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
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
    (["{model}", "--request-timeout", "0"], "--request-timeout"),
    (["{model}", "--max-inflight-megapixels", "10"], "--max-inflight-megapixels"),
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
