"""Inference benchmark: latency and throughput per backend and batch size.

Preprocessing (decode, resize, crop, NCHW float) is timed apart from the model call, because on
an edge CPU it often costs as much as the network itself.
"""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dgkit.preprocess import to_model_input
from dgkit.serve.predictor import Predictor

COLUMNS = ("backend", "batch_size", "runs", "preprocess_ms_p50", "latency_ms_p50",
           "latency_ms_p95", "images_per_s", "end_to_end_images_per_s")
# Short headings so that the table fits 80 columns; latency and img/s are the model call alone.
HEADINGS = ("backend", "batch", "runs", "prep ms p50", "ms p50", "ms p95", "img/s", "e2e img/s")


def sample_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A camera-sized JPEG with texture (a flat image would decode unrealistically fast)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bench_predictor(predictor: Predictor, batch_sizes: list[int], runs: int, warmup: int = 2,
                    image: bytes | None = None) -> list[dict[str, Any]]:
    image = image or sample_jpeg()
    rows = []
    for bs in batch_sizes:
        prep_ms, infer_ms = [], []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            batch = to_model_input(np.stack([predictor.prepare(image) for _ in range(bs)]))
            t1 = time.perf_counter()
            predictor.run_batch(batch)
            t2 = time.perf_counter()
            if i >= warmup:  # the first calls allocate and tune; they are not the steady state
                prep_ms.append((t1 - t0) * 1e3)
                infer_ms.append((t2 - t1) * 1e3)
        prep50, lat50, lat95 = (float(np.percentile(prep_ms, 50)),
                                float(np.percentile(infer_ms, 50)),
                                float(np.percentile(infer_ms, 95)))
        rows.append({"backend": predictor.backend, "batch_size": bs, "runs": runs,
                     "preprocess_ms_p50": round(prep50, 3), "latency_ms_p50": round(lat50, 3),
                     "latency_ms_p95": round(lat95, 3),
                     "images_per_s": round(bs / lat50 * 1e3, 1),
                     "end_to_end_images_per_s": round(bs / (prep50 + lat50) * 1e3, 1)})
    return rows


def host_info() -> dict[str, Any]:
    import os

    import onnxruntime

    from dgkit.serve.backends import physical_cores

    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "physical_cores": physical_cores(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------- HTTP load test

def multipart_body(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(file name, bytes) pairs as multipart/form-data fields `file`; returns (body, type)."""
    boundary = "dgkit-bench-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
             + data + b"\r\n" for name, data in images]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictor_single_image_rate(predictor: Predictor, image: bytes, requests: int) -> float:
    """Images/s of back-to-back `predict(image)` calls, decoding included, as a server does."""
    for _ in range(3):
        predictor.predict(image)
    t0 = time.perf_counter()
    for _ in range(requests):
        predictor.predict(image)
    return requests / (time.perf_counter() - t0)


def load_test(url: str, image: bytes, clients: int, requests: int, timeout: float = 300.0
              ) -> dict[str, Any]:
    """`clients` threads POST `image` to `url` on keep-alive connections until `requests` are
    answered (or `timeout` seconds pass); stdlib only, so it runs in the base install."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body, content_type = multipart_body([("image.jpg", image)])
    lock = threading.Lock()
    issued, latencies_ms, errors = 0, [], []
    deadline = time.monotonic() + timeout

    def client() -> None:
        nonlocal issued
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if issued >= requests:
                        return
                    issued += 1
                t0 = time.perf_counter()
                conn.request("POST", parts.path, body, {"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                with lock:
                    if response.status == 200:
                        latencies_ms.append((time.perf_counter() - t0) * 1e3)
                    else:
                        errors.append(response.status)
        except OSError as exc:
            with lock:
                errors.append(str(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ok = len(latencies_ms)
    return {"clients": clients, "requests": requests, "answered": ok, "errors": len(errors),
            "seconds": round(elapsed, 3), "images_per_s": round(ok / elapsed, 2),
            "latency_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2) if ok else None,
            "latency_ms_p95": round(float(np.percentile(latencies_ms, 95)), 2) if ok else None}


@contextmanager
def running_server(model: str | Path, backend: str = "auto", startup_timeout: float = 120.0
                   ) -> Iterator[str]:
    """Run `dgkit serve MODEL` on a free localhost port until the block ends; yields its URL.

    It starts in the temporary folder: from a source checkout, `python -m dgkit` would import
    the source folder dgkit/ instead of the installed package."""
    import subprocess
    import sys
    import tempfile
    import urllib.request

    from dgkit.errors import DgkitError

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The server's log goes to a file, not a pipe: an unread pipe would fill and block it.
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "dgkit", "serve",
                                   str(Path(model).resolve()), "--port", str(port),
                                   "--backend", backend],
                                  stdout=subprocess.DEVNULL, stderr=log, text=True,
                                  cwd=tempfile.gettempdir())
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if server.poll() is not None:
                    log.seek(0)
                    raise DgkitError(f"dgkit serve exited before it answered: "
                                     f"{log.read().strip()[-300:]}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise DgkitError(f"dgkit serve did not answer within "
                                         f"{startup_timeout:g} s") from None
                    time.sleep(0.2)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def bench_http(model: str, backend: str, clients: int, requests: int,
               image: bytes | None = None) -> dict[str, Any]:
    """Start `dgkit serve MODEL` on a free localhost port, load it with `clients` concurrent
    clients and compare its images/s with the Predictor's back-to-back single-image rate."""
    image = image or sample_jpeg()
    predictor = Predictor(model, backend)
    direct = predictor_single_image_rate(predictor, image, max(20, requests // 4))
    del predictor  # its session would hold memory and threads while the server runs
    with running_server(model, backend) as base:
        load_test(f"{base}/predict", image, clients, min(requests, 2 * clients))  # warm-up
        result = load_test(f"{base}/predict", image, clients, requests)
    result["predictor_images_per_s"] = round(direct, 2)
    result["ratio"] = round(result["images_per_s"] / direct, 3)
    return result
