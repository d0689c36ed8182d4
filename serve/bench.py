"""Inference benchmark: latency and throughput per backend and batch size.

Preprocessing (decode, resize, crop, NCHW float) is timed apart from the model call, because on
an edge CPU it often costs as much as the network itself.
"""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Callable, Iterator, Sequence
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


def predict_request(image: bytes) -> tuple[bytes, str]:
    """One image as `POST /predict` takes it."""
    return multipart_body([("image.jpg", image)])


def v2_request(image: bytes, top_k: int = 5) -> tuple[bytes, str]:
    """One image as a plain-JSON v2 infer request: BYTES `image_bytes` in base64, top-k labels
    back, so that the server does the same work as for `/predict`."""
    import base64
    import json

    from dgkit.model_meta import OUTPUT_NAME
    from dgkit.serve.v2 import BYTES_INPUT

    body = {"inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"classification": top_k}}]}
    return json.dumps(body).encode(), "application/json"


# The server's model name under /v2, fixed so that the bench knows the infer URL.
V2_MODEL = "bench"
PATHS: dict[str, tuple[str, Callable[[bytes], tuple[bytes, str]]]] = {
    "predict": ("/predict", predict_request),
    "v2": (f"/v2/models/{V2_MODEL}/infer", v2_request)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictor_single_image_rate(predictor: Predictor, image: bytes | list[bytes],
                                requests: int) -> float:
    """Images/s of back-to-back `predict(image)` calls, decoding included, as a server does."""
    images = image if isinstance(image, list) else [image]
    for i in range(3):
        predictor.predict(images[i % len(images)])
    t0 = time.perf_counter()
    for i in range(requests):
        predictor.predict(images[i % len(images)])
    return requests / (time.perf_counter() - t0)


def load_test(url: str, image: bytes | list[bytes], clients: int, requests: int,
              timeout: float = 300.0,
              encode: Callable[[bytes], tuple[bytes, str]] = predict_request) -> dict[str, Any]:
    """`clients` threads POST the images in turn, each made a request body by `encode`, to
    `url` on keep-alive connections until `requests` are answered (or `timeout` seconds pass);
    stdlib only, so it runs in the base install."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    bodies = [encode(im) for im in (image if isinstance(image, list) else [image])]
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
                    body, content_type = bodies[issued % len(bodies)]
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
            **{f"latency_ms_p{q}": round(float(np.percentile(latencies_ms, q)), 2) if ok
               else None for q in (50, 95, 99)}}


@contextmanager
def running_server(model: str | Path, backend: str = "auto", startup_timeout: float = 120.0,
                   args: Sequence[str] = ()) -> Iterator[str]:
    """Run `dgkit serve MODEL [ARGS]` on a free localhost port until the block ends; yields its
    URL once uvicorn says it listens.

    It starts in the temporary folder: from a source checkout, `python -m dgkit` would import
    the source folder dgkit/ instead of the installed package."""
    import subprocess
    import sys
    import tempfile
    import threading
    from collections import deque

    from dgkit.errors import DgkitError

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dgkit", "serve",
                               str(Path(model).resolve()), "--port", str(port),
                               "--backend", backend, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=tempfile.gettempdir())
    log: deque[str] = deque(maxlen=20)
    listening, done = threading.Event(), threading.Event()

    def drain() -> None:  # read the log to its end, or the full pipe would block the server
        for line in server.stderr:  # type: ignore[union-attr]
            log.append(line)
            if "Uvicorn running on" in line:
                listening.set()
                done.set()
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        if not done.wait(startup_timeout):
            raise DgkitError(f"dgkit serve did not start listening within "
                             f"{startup_timeout:g} s")
        if not listening.is_set():
            raise DgkitError(f"dgkit serve exited before it listened: "
                             f"{''.join(log).strip()[-300:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def answered_requests(base: str) -> int:
    """Requests the server counts as answered with 200 on /predict and v2 infer, from its
    /metrics: a count kept apart from the clients'."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(n) for endpoint, n in re.findall(
        r'^dgkit_requests_total\{endpoint="([^"]+)",status="200"\} (\S+)$', text, re.M)
        if endpoint == "/predict" or endpoint.endswith("/infer")))


def batching_args(mode: str) -> list[str]:
    """`dgkit serve` options of a batching mode: "off" (one image a call) or a delay in ms."""
    return ["--max-batch", "1"] if mode == "off" else ["--max-delay-ms", mode]


def bench_http(model: str, backend: str, clients: list[int], requests: int,
               image: bytes | list[bytes] | None = None, batching: Sequence[str] = ("off",),
               paths: Sequence[str] = ("predict",)) -> dict[str, Any]:
    """For each batching mode a fresh `dgkit serve MODEL` on a free localhost port, loaded by
    each number of concurrent clients on each path; beside it the Predictor's back-to-back
    single-image rate. Each row carries the requests the clients saw answered and those the
    server's /metrics counted."""
    image = image or sample_jpeg()
    predictor = Predictor(model, backend)
    direct = predictor_single_image_rate(predictor, image, max(20, requests // 4))
    del predictor  # its session would hold memory and threads while the server runs
    rows = []
    for mode in batching:
        args = [*batching_args(mode), "--model-name", V2_MODEL]
        with running_server(model, backend, args=args) as base:
            for path in paths:
                route, encode = PATHS[path]
                load_test(base + route, image, max(clients), 2 * max(clients),
                          encode=encode)  # warm-up: first calls allocate and tune
                for n in clients:
                    before = answered_requests(base)
                    row = load_test(base + route, image, n, requests, encode=encode)
                    rows.append({"path": path, "batching": mode, **row,
                                 "server_answered": answered_requests(base) - before,
                                 "ratio": round(row["images_per_s"] / direct, 3)})
    return {"predictor_images_per_s": round(direct, 2), "rows": rows}
