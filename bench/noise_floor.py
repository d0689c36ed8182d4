"""How much of INT8's disagreement is the FP32 model's own sensitivity to tiny input changes.

For a run with an export: on every validation set the run's `dgkit validate` uses (held-out
domains, source validation), top-1 agreement of the ONNX FP32 model with itself when each pixel
gets uniform noise of +-`--noise` grey levels (default 0.5: below the 8-bit resolution of the
image itself), next to the agreement of each INT8 artifact with FP32. If FP32 flips as many
images under noise that small, INT8's flips are the model's fragility, not the quantizer's.
Prints a table and writes JSON.

    python bench/noise_floor.py runs/pacs-sketch --json bench/results/noise_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dgkit.errors import DgkitError
from dgkit.export.exporter import require_export, run_context
from dgkit.export.validate import Logits, file_candidate
from dgkit.preprocess import to_model_input
from dgkit.provenance import provenance
from dgkit.rundir import RunDir

BATCH = 64


def logits(run: Logits, pixels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(pixels), BATCH):
        batch = to_model_input(pixels[i:i + BATCH])
        if noise:
            batch += rng.uniform(-noise / 255, noise / 255, batch.shape).astype(np.float32)
        out.append(run(batch))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--noise", type=float, default=0.5, help="grey levels (of 255)")
    parser.add_argument("--max-images", type=int, default=None, help="per validation set")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        measure(args)
    except DgkitError as exc:
        sys.exit(f"error: {exc}")


def measure(args: argparse.Namespace) -> None:
    run, export = RunDir(args.run), args.run / "export"
    require_export(run, "model.onnx")
    _, _, sets = run_context(run, None, args.max_images)
    fp32 = file_candidate(export / "model.onnx").run
    # The TensorRT flavour runs as validate runs it: its exact QDQ reference.
    int8 = {p.name: file_candidate(p).run for p in sorted(export.glob("model.int8*.onnx"))}
    rows = []
    for s in sets:
        clean = logits(fp32, s.pixels, 0, 0).argmax(1)
        noisy = logits(fp32, s.pixels, args.noise, 0).argmax(1)
        row = {"set": s.name, "images": len(s.pixels),
               "fp32_accuracy": round(100 * float((clean == s.labels).mean()), 2),
               "fp32_noisy_agreement": round(100 * float((noisy == clean).mean()), 2)}
        for name, run in int8.items():
            pred = logits(run, s.pixels, 0, 0).argmax(1)
            row[f"{name}_agreement"] = round(100 * float((pred == clean).mean()), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ["set", "images", "FP32 %", f"FP32 vs FP32+noise ±{args.noise:g} agree %",
              *[f"{n} agree %" for n in int8]]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "noise_grey_levels": args.noise,
                                         "rows": rows, "provenance": provenance()},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
