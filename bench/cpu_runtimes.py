"""CPU runtimes side by side: onnxruntime and OpenVINO on dgkit's ONNX files, with plain
`quantize_static` and NNCF post-training INT8 as reference rows.

Latency (batch 1, --threads threads, in one process, interleaved rounds, the fastest round's
median kept): for each student at --image-size px, made as `bench/export.py` makes them (speed
does not depend on training), exported with `--int8` (the `avx2` flavour, and the `vnni` flavour
when this dgkit has `--cpu`), then
  - onnxruntime (dgkit's ort-cpu runner) on model.onnx, model.int8.onnx, model.int8-vnni.onnx,
    plain quantize_static (QDQ, U8S8, per-channel, MinMax) and NNCF's INT8 model;
  - OpenVINO (`Core().compile_model`, CPU, --threads threads, latency hint, FP32 inference
    precision: dgkit's openvino backend) on the same files, and on model.onnx with OpenVINO's
    default precision (bf16 on CPUs with AVX512-BF16 or AMX).
Plain and NNCF INT8 are calibrated on the same 512 images dgkit uses (export/images.py).

Accuracy (--accuracy-run RUN, a trained run exported with --int8): every image of the held-out
domains and of the source-validation split through each of those models; accuracy, and top-1
agreement with onnxruntime FP32.

    python bench/cpu_runtimes.py                                   # latency, both students
    python bench/cpu_runtimes.py --accuracy-run runs/erm-sketch    # and accuracy on that run
    python bench/cpu_runtimes.py --students resnet18 --no-latency --accuracy-run RUN
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "PACS"
FP32, INT8, VNNI = "model.onnx", "model.int8.onnx", "model.int8-vnni.onnx"
PLAIN, NNCF = "plain-qdq.onnx", "nncf-int8.onnx"  # written under RUN/export/cpu_runtimes/
EXTRA_DIR = "cpu_runtimes"

Fn = Callable[[np.ndarray], np.ndarray]


def _export_bench() -> ModuleType:
    """bench/export.py (run making and timing helpers), imported by path: bench is no package."""
    spec = importlib.util.spec_from_file_location("bench_export", Path(__file__).with_name(
        "export.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the models ---------------------------------------------------------------------------


def export_flavours(run: Path, calib_images: int) -> dict[str, float]:
    """`dgkit export RUN --int8` without validation, once per CPU flavour this dgkit has
    (ExportOptions.cpu: avx2, then vnni) whose file RUN lacks; seconds each."""
    from dgkit.export.exporter import ExportOptions, export_run
    from dgkit.rundir import RunDir

    has_cpu = "cpu" in {f.name for f in dataclasses.fields(ExportOptions)}
    files = {"avx2": INT8, "vnni": VNNI} if has_cpu else {"avx2": INT8}
    seconds = {}
    for cpu in [c for c, name in files.items() if not (run / "export" / name).is_file()]:
        extra = {"cpu": cpu} if has_cpu else {}
        start = time.perf_counter()
        export_run(RunDir(run), ExportOptions(int8=True, validate=False,
                                              calib_images=calib_images, **extra))
        seconds[cpu] = round(time.perf_counter() - start, 1)
    return seconds


def calibration_images(run: Path, count: int) -> np.ndarray:
    """The calibration images dgkit's export used (its cache under RUN/export/)."""
    from dgkit.export.formats import CALIB_CACHE
    from dgkit.export.images import calibration_pixels, load_data
    from dgkit.rundir import RunDir

    config = RunDir(run).require_trained()
    data = load_data(config.data_root, [*config.target_domains, *config.source_domains],
                     config.classes)
    pixels, _ = calibration_pixels(data, config.source_domains, config.seed, count,
                                   config.preprocess, Path(run) / "export" / CALIB_CACHE)
    return pixels


def _with_metadata(model: Any, fp32: Path, precision: str) -> Any:
    """Copy the FP32 model's dgkit metadata onto `model` (so dgkit's runners load it)."""
    import onnx

    source = onnx.load(str(fp32), load_external_data=False)
    del model.metadata_props[:]
    for prop in source.metadata_props:
        entry = model.metadata_props.add()
        entry.key = prop.key
        entry.value = precision if prop.key == "precision" else prop.value
    return model


class _Reader:
    """A CalibrationDataReader over the images, 32 at a time."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.chunks = iter(range(0, len(pixels), 32))
        self.pixels = pixels

    def get_next(self) -> dict[str, np.ndarray] | None:
        from dgkit.model_meta import INPUT_NAME
        from dgkit.preprocess import to_model_input

        start = next(self.chunks, None)
        if start is None:
            return None
        return {INPUT_NAME: to_model_input(self.pixels[start:start + 32])}


def plain_qdq(fp32: Path, pixels: np.ndarray, out: Path) -> float:
    """onnxruntime's recipe as documented: quant_pre_process, then quantize_static to QDQ, uint8
    activations, int8 per-channel weights, MinMax ranges, every op it can quantize."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from dgkit.export.quantize import pre_process

    start = time.perf_counter()
    pre = out.with_suffix(".pre.onnx")
    pre_process(fp32, pre)
    quantize_static(str(pre), str(out), _Reader(pixels), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    # Ranges merged every 5 batches (all 512 images' activations would not fit);
                    # not 4: onnxruntime fails when the last merge leaves nothing collected.
                    extra_options={"CalibMaxIntermediateOutputs": 5})
    pre.unlink()
    onnx.save_model(_with_metadata(onnx.load(str(out)), fp32, "int8"), str(out))
    return round(time.perf_counter() - start, 1)


def nncf_int8(fp32: Path, pixels: np.ndarray, out: Path) -> float:
    """NNCF's post-training quantization of the FP32 ONNX model (its defaults: the mixed preset,
    fast bias correction), on the same images, one at a time."""
    import nncf
    import onnx

    from dgkit.model_meta import INPUT_NAME
    from dgkit.preprocess import to_model_input

    start = time.perf_counter()
    items = [{INPUT_NAME: to_model_input(pixels[i:i + 1])} for i in range(len(pixels))]
    model = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(items), subset_size=len(items))
    onnx.save_model(_with_metadata(model, fp32, "int8"), str(out))
    return round(time.perf_counter() - start, 1)


def reference_models(run: Path, calib_images: int) -> dict[str, float]:
    """Write plain quantize_static and NNCF INT8 of RUN's model.onnx; seconds each."""
    folder = Path(run) / "export" / EXTRA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pixels = calibration_images(run, calib_images)
    fp32 = Path(run) / "export" / FP32
    return {"plain_qdq": plain_qdq(fp32, pixels, folder / PLAIN),
            "nncf": nncf_int8(fp32, pixels, folder / NNCF)}


# --- the runtimes -------------------------------------------------------------------------


def ort_fn(path: Path, threads: int) -> Fn:
    """onnxruntime as dgkit serves it (backend ort-cpu)."""
    from dgkit.serve.backends import OrtRunner

    return OrtRunner(path, "ort-cpu", threads).run


def openvino_fn(path: Path, threads: int, precision: str | None = "f32") -> Fn:
    """OpenVINO's CPU plugin on an ONNX file: dgkit's openvino backend (`threads` threads, one
    stream, latency hint, f32); `precision` None: the same with OpenVINO's default inference
    precision (bf16 on CPUs with AVX512-BF16 or AMX)."""
    import openvino as ov

    from dgkit.serve.openvino_backend import OpenVINORunner

    if precision == "f32":
        return OpenVINORunner(path, threads).run
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()

    return run


def models(run: Path) -> dict[str, tuple[str, Path]]:
    """{row name: (runtime, file)} for the files RUN holds."""
    export = Path(run) / "export"
    files = {"fp32": export / FP32, "dgkit int8 (avx2)": export / INT8,
             "dgkit int8-vnni": export / VNNI, "plain quantize_static": export / EXTRA_DIR / PLAIN,
             "NNCF int8": export / EXTRA_DIR / NNCF}
    rows: dict[str, tuple[str, Path]] = {}
    for runtime in ("onnxruntime", "openvino"):
        for name, path in files.items():
            if path.is_file():
                rows[f"{runtime} {name}"] = (runtime, path)
        if runtime == "openvino":
            rows["openvino fp32 (default precision)"] = ("openvino-default", files["fp32"])
    return rows


def make_fn(runtime: str, path: Path, threads: int) -> Fn:
    if runtime == "onnxruntime":
        return ort_fn(path, threads)
    return openvino_fn(path, threads, None if runtime == "openvino-default" else "f32")


# --- latency ------------------------------------------------------------------------------


def latency(run: Path, size: int, threads: int, runs: int, rounds: int,
            median_ms: Callable[..., float]) -> dict[str, dict[str, float]]:
    """Batch-1 ms of every model of RUN, interleaved rounds, the fastest round kept: `wall_ms`
    with `threads` threads, and `cpu_ms`, the process CPU time of one single-threaded run
    (which other processes on the machine barely disturb)."""
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    out: dict[str, dict[str, float]] = {}
    for n, clock, key in ((threads, time.perf_counter, "wall_ms"),
                          (1, time.process_time, "cpu_ms")):
        fns = {name: make_fn(runtime, path, n) for name, (runtime, path) in models(run).items()}
        best = {name: float("inf") for name in fns}
        for _ in range(rounds if n == threads else max(1, rounds // 3)):
            for name, fn in fns.items():
                for _ in range(5):
                    fn(x)
                best[name] = min(best[name], median_ms(fn, x, runs, clock))
        for name, ms in best.items():
            out.setdefault(name, {})[key] = round(ms, 2)
        del fns
    return out


def bench_latency(student: str, args: argparse.Namespace, bench: ModuleType) -> dict[str, Any]:
    run = args.work / f"{student}-run"
    if not (run / "export" / FP32).is_file():
        shutil.rmtree(run, ignore_errors=True)
        bench.make_run(student, args.data, args.target, args.image_size, run)
    seconds: dict[str, Any] = {"export": export_flavours(run, args.calib_images)}
    if not (run / "export" / EXTRA_DIR / NNCF).is_file():
        seconds |= reference_models(run, args.calib_images)
    ms = latency(run, args.image_size, args.threads, args.runs, args.rounds, bench._median_ms)
    base = ms["onnxruntime fp32"]
    return {"student": student, "image_size": args.image_size, "run": str(run),
            "seconds": seconds, "latency_b1": ms,
            "vs_ort_fp32": {name: {k: round(v / base[k], 3) for k, v in row.items()}
                            for name, row in ms.items()}}


# --- accuracy -----------------------------------------------------------------------------


def logits_of(fn: Fn, pixels: np.ndarray, batch: int = 50) -> np.ndarray:
    from dgkit.preprocess import to_model_input

    return np.concatenate([fn(to_model_input(pixels[i:i + batch]))
                           for i in range(0, len(pixels), batch)])


def bench_accuracy(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy on each validation set and top-1 agreement with onnxruntime FP32."""
    from dgkit.export.exporter import run_context
    from dgkit.rundir import RunDir

    seconds = {}
    if not (run / "export" / EXTRA_DIR / NNCF).is_file():
        seconds = reference_models(run, args.calib_images)
    _, _, sets = run_context(RunDir(run), args.data if args.data.is_dir() else None, None)
    rows = models(run)
    top1: dict[str, dict[str, np.ndarray]] = {}
    for name, (runtime, path) in rows.items():
        fn = make_fn(runtime, path, args.threads)
        top1[name] = {s.name: logits_of(fn, s.pixels).argmax(1) for s in sets}
    out: dict[str, Any] = {}
    for name, by_set in top1.items():
        out[name] = {s.name: {"images": len(s.labels),
                              "accuracy": round(float((by_set[s.name] == s.labels).mean()), 4),
                              "agreement": round(float(
                                  (by_set[s.name] == top1["onnxruntime fp32"][s.name]).mean()),
                                  4)}
                     for s in sets}
    config = RunDir(run).require_trained()
    return {"run": str(run), "student": config.student, "image_size":
            config.preprocess.input_size, "targets": list(config.target_domains),
            "seconds": seconds, "models": out}


# --- report -------------------------------------------------------------------------------


def print_tables(latencies: list[dict[str, Any]], accuracy: dict[str, Any] | None,
                 threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    if latencies:
        table = Table(title=f"batch 1: wall ms with {threads} threads (x onnxruntime FP32) / "
                            "CPU ms of 1 thread")
        table.add_column("runtime / model")
        for r in latencies:
            table.add_column(f"{r['student']} {r['image_size']} px", justify="right")
        names = list(dict.fromkeys(k for r in latencies for k in r["latency_b1"]))

        def cell(r: dict[str, Any], name: str) -> str:
            if name not in r["latency_b1"]:
                return "-"
            ms, x = r["latency_b1"][name], r["vs_ort_fp32"][name]["wall_ms"]
            return f"{ms['wall_ms']:.2f} ({x:.2f}x) / {ms['cpu_ms']:.2f}"

        for name in names:
            table.add_row(name, *(cell(r, name) for r in latencies))
        console.print(table)
    if accuracy:
        sets = list(next(iter(accuracy["models"].values())))
        table = Table(title=f"{accuracy['student']} {accuracy['image_size']} px, "
                            f"{accuracy['run']}: accuracy % / agreement with ORT FP32 %")
        table.add_column("runtime / model")
        for s in sets:
            table.add_column(s, justify="right")
        for name, by_set in accuracy["models"].items():
            table.add_row(name, *(f"{100 * v['accuracy']:.2f} / {100 * v['agreement']:.2f}"
                                  for v in by_set.values()))
        console.print(table)


def versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("onnxruntime", "openvino", "nncf", "onnx", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--target", default="sketch")
    parser.add_argument("--students", default="efficientnet_lite0,resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="Timed runs a round (batch 1).")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--accuracy-run", type=Path, help="A trained run exported with --int8.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgkit-bench-cpu-runtimes"),
                        help="Where the latency runs are made (reused when already exported).")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "cpu_runtimes.json")
    args = parser.parse_args()
    if not args.data.is_dir() and not args.no_latency:
        sys.exit(f"data {args.data} not found; pass --data ROOT")
    bench = _export_bench()
    load = {"loadavg_start": os.getloadavg()}
    latencies = [] if args.no_latency else [bench_latency(s, args, bench)
                                            for s in args.students.split(",")]
    accuracy = bench_accuracy(args.accuracy_run, args) if args.accuracy_run else None
    load["loadavg_end"] = os.getloadavg()
    print_tables(latencies, accuracy, args.threads)
    from dgkit.atomic import write_json
    from dgkit.provenance import provenance

    write_json(args.out, {"threads": args.threads, "runs": args.runs, "rounds": args.rounds,
                          "latency": latencies, "accuracy": accuracy, "versions": versions(),
                          "provenance": provenance(**load)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
