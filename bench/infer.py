"""Predictor overhead: batch-1 `Predictor.predict` against bare onnxruntime plus preprocessing.

The goal is a ratio of at most 1.15. Both paths decode the same image with
dgkit.preprocess and run the same model with the same thread count; the bare session keeps
onnxruntime's default options. Blocks of runs alternate between the two so that a noisy
neighbour slows both alike, while one session's spinning threads do not slow the other's calls.

    python bench/infer.py MODEL.onnx [--image photo.jpg] [--runs 200] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dgkit.preprocess import load_prepared, to_model_input
from dgkit.provenance import provenance
from dgkit.serve import Predictor
from dgkit.serve.backends import physical_cores
from dgkit.serve.bench import sample_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--image", type=Path, help="default: a synthetic 640x480 JPEG")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--json", type=Path, dest="json_out")
    args = parser.parse_args()

    image = args.image.read_bytes() if args.image else sample_jpeg()
    predictor = Predictor(args.model, backend="ort-cpu", threads=args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    spec = predictor.spec

    def bare() -> np.ndarray:
        x = to_model_input(load_prepared(image, spec)[None])
        return session.run(None, {"image": x})[0]

    def ours() -> object:
        return predictor.predict(image)

    times: dict[str, list[float]] = {"bare": [], "predictor": []}
    block = max(1, args.runs // 5)
    for _ in range(5):
        for name, fn in (("bare", bare), ("predictor", ours)):
            time.sleep(0.05)  # let the other session's worker threads go idle
            for i in range(block + 3):
                t0 = time.perf_counter()
                fn()
                if i >= 3:  # warm-up after the switch
                    times[name].append((time.perf_counter() - t0) * 1e3)
    p50 = {name: float(np.median(v)) for name, v in times.items()}
    result = {"model": str(args.model), "threads": args.threads, "runs": args.runs,
              "bare_ms_p50": round(p50["bare"], 4), "predictor_ms_p50": round(p50["predictor"], 4),
              "ratio": round(p50["predictor"] / p50["bare"], 4), "goal": 1.15,
              "provenance": provenance()}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
