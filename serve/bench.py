"""Inference benchmark: latency and throughput per backend and batch size.

Preprocessing (decode, resize, crop, NCHW float) is timed apart from the model call, because on
an edge CPU it often costs as much as the network itself.
"""

from __future__ import annotations

import io
import platform
import time
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
