"""The CPU INT8 flavours side by side on trained students: held-out accuracy and agreement.

For each run (exported with at least model.onnx): calibrates once on the export's 512
calibration images and writes, in a temporary folder, the `avx2` flavour (model.int8.onnx), the
`vnni` flavour (model.int8-vnni.onnx), and the `vnni` flavour with its stem INT8 and with it
FP32 (the flavour itself quantizes a stem of one convolution alone); runs each in exact
arithmetic (the QDQ graph with onnxruntime's graph optimisations off, what a CPU
that accumulates in 32 bits computes) and through the Predictor on this CPU, on every
validation set `dgkit validate` uses; prints accuracy, its change against torch FP32 and top-1
agreement with torch FP32. Writes JSON.

    python bench/int8_cpu_flavours.py runs/erm-sketch runs/erm-cartoon \
        --json bench/results/int8_cpu_flavours.json
    python bench/int8_cpu_flavours.py runs/erm-photo --variants int8,int8-vnni --arithmetic cpu
    python bench/int8_cpu_flavours.py runs/r18-sketch --variants int8-vnni-stem-fp32,int8-vnni \
        --arithmetic cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.cpu import instruction_sets, native_flavour
from dgkit.errors import DgkitError
from dgkit.export import onnx_export as ox
from dgkit.export.exporter import require_export, run_context
from dgkit.export.formats import CALIB_CACHE, cpu_flavour_of
from dgkit.export.images import calibration_pixels
from dgkit.export.quantize import FLAVOURS, quantize
from dgkit.export.validate import Logits, qdq_reference, torch_candidate
from dgkit.provenance import provenance
from dgkit.rundir import RunDir

BATCH = 64
CPU_RECORDS = {f.name: f for f in FLAVOURS if cpu_flavour_of(f.name)}
VARIANTS = {**CPU_RECORDS, **{  # the vnni flavour with its stem INT8, or FP32, whatever it is
    f"int8-vnni-stem-{stem}": dataclasses.replace(
        CPU_RECORDS["int8-vnni"], name=f"int8-vnni-stem-{stem}", stem=stem)
    for stem in ("int8", "fp32")}}


def predictions(run: Logits, pixels: np.ndarray) -> np.ndarray:
    from dgkit.preprocess import to_model_input

    return np.concatenate([run(to_model_input(pixels[i:i + BATCH])).argmax(1)
                           for i in range(0, len(pixels), BATCH)])


def optimised(path: Path) -> Logits | None:
    """The model as the Predictor runs it on this CPU; None where it refuses (wrong CPU)."""
    from dgkit.serve.predictor import Predictor, WrongCpu

    try:
        return Predictor(path, backend="ort-cpu").run_batch
    except WrongCpu:
        return None


def measure_run(path: Path, max_images: int | None, variants: dict[str, Any],
                arithmetics: tuple[str, ...]) -> list[dict[str, object]]:
    from dgkit.distill.students import load_student

    run = RunDir(path)
    require_export(run, "model.onnx")
    config, data, sets = run_context(run, None, max_images)
    pixels, _ = calibration_pixels(data, config.source_domains, config.seed, 512,
                                   config.preprocess, run.export / CALIB_CACHE)
    student = load_student(run)
    reference = {s.name: predictions(torch_candidate(student, 0).run, s.pixels) for s in sets}
    rows: list[dict[str, object]] = [{"run": str(path), "variant": "torch FP32", **{
        f"{s.name}_accuracy": round(100 * float((reference[s.name] == s.labels).mean()), 2)
        for s in sets}}]
    metas = {f.name: ox.model_meta(run, config, f.name.split("-stem")[0])
             for f in variants.values()}
    models = quantize(run.export / "model.onnx", pixels, "minmax", metas,
                      list(variants.values()))
    with tempfile.TemporaryDirectory(prefix="dgkit-flavours-") as tmp:
        for label, flavour in variants.items():
            file = Path(tmp) / f"{flavour.name}.onnx"
            ox.save_onnx(models[flavour.name], file)
            for arithmetic in arithmetics:
                runner = qdq_reference(file) if arithmetic == "exact" else optimised(file)
                if arithmetic == "cpu":
                    arithmetic = f"this CPU ({instruction_sets()})"
                row: dict[str, object] = {"run": str(path), "variant": label,
                                          "arithmetic": arithmetic}
                if runner is None:
                    row["skipped"] = "refused: made for another CPU"
                    rows.append(row)
                    continue
                for s in sets:
                    pred = predictions(runner, s.pixels)
                    row[f"{s.name}_accuracy"] = round(100 * float((pred == s.labels).mean()), 2)
                    row[f"{s.name}_agreement"] = round(
                        100 * float((pred == reference[s.name]).mean()), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| run | variant | arithmetic | held-out % (Δ) | agreement held-out / source % |",
             "|---|---|---|---:|---:|"]
    base: dict[str, float] = {}
    for r in rows:
        target = next((k.removesuffix("_accuracy") for k in r if k.endswith("_accuracy")
                       and not k.startswith("source")), None)
        if r["variant"] == "torch FP32":
            base[str(r["run"])] = float(r[f"{target}_accuracy"])  # type: ignore[arg-type]
            lines.append(f"| {Path(str(r['run'])).name} | torch FP32 | | {base[str(r['run'])]} | |")
            continue
        if target is None:
            lines.append(f"| | {r['variant']} | {r['arithmetic']} | {r.get('skipped')} | |")
            continue
        acc = float(r[f"{target}_accuracy"])  # type: ignore[arg-type]
        source = next(k for k in r if k.startswith("source") and k.endswith("_agreement"))
        lines.append(f"| | {r['variant']} | {r['arithmetic']} | "
                     f"{acc:.2f} ({acc - base[str(r['run'])]:+.2f}) | "
                     f"{r[f'{target}_agreement']} / {r[source]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--max-images", type=int, default=None, help="per validation set")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--arithmetic", choices=("both", "exact", "cpu"), default="both",
                        help="exact: the QDQ graph unoptimised; cpu: the Predictor on this CPU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"--variants: no variant {', '.join(sorted(unknown))}")
    arithmetics = ("exact", "cpu") if args.arithmetic == "both" else (args.arithmetic,)
    try:
        rows = [row for run in args.runs for row in measure_run(
            run, args.max_images, {n: VARIANTS[n] for n in names}, arithmetics)]
    except DgkitError as exc:
        sys.exit(f"error: {exc}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "native_flavour": native_flavour(),
                                         "provenance": provenance()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
