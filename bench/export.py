"""Export speed and size: EfficientNet-Lite0 and ResNet-18 students at 224 px on this CPU.

For each student: a run (given with --run, or made here from ImageNet / random backbone weights
and a random head on the data's classes: speed and size do not depend on training), then
`dgkit export --int8` without validation (timed: decode of the parity and calibration images,
ONNX export and parity check, calibration on --calib-images images, both INT8 flavours), then
batch-1 latency of torch FP32 eager, onnxruntime FP32, INT8 (uint8 activations) and INT8 for
TensorRT (symmetric), as the serve runtime runs them. Prints a table and writes JSON.

Latency on a shared machine: each model is timed in several interleaved rounds and the smallest
round median is kept (`wall_ms`, with --threads threads); `cpu_ms` is the process CPU time of
one single-threaded run, which other processes on the machine barely disturb.

    python bench/export.py                                  # both students, PACS, 2 threads
    python bench/export.py --students resnet18 --rounds 3
    python bench/export.py --run runs/pacs-sketch --students efficientnet_lite0
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.export.formats import BY_KEY as FORMATS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "PACS"
WEIGHTS = {"efficientnet_lite0": "imagenet", "resnet18": "none"}


def make_run(student: str, data: Path, target: str, size: int, folder: Path) -> Path:
    """A run directory like dgkit distill writes, with an untrained head."""
    import torch
    from safetensors.torch import save_file

    from dgkit.distill.students import Student, build_backbone, build_head
    from dgkit.distill.trainer import Trainer
    from dgkit.records import StudentSpec
    from dgkit.rundir import RunDir
    from dgkit.train_config import TrainConfig

    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(data=str(data), targets=[target], student=student,
                         student_weights=WEIGHTS.get(student, "none"), image_size=size, steps=1)
    trainer = Trainer(config, run, quiet=True)
    run_config = trainer.run_config()
    run.write_config(run_config)
    torch.manual_seed(0)
    backbone = build_backbone(student, config.student_weights)
    spec = StudentSpec(backbone=student, head="linear", feature_dim=backbone.feature_dim,
                       num_classes=len(run_config.classes), embed_dim=None, input_size=size,
                       mean=tuple(backbone.mean), std=tuple(backbone.std))
    run.write_student_spec(spec)
    model = Student(backbone, build_head(spec)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run.student))
    return folder


def _median_ms(fn, x, runs: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(runs):
        start = clock()
        fn(x)
        times.append(clock() - start)
    return 1000 * statistics.median(times)


def latencies(run: Path, threads: int, runs: int, rounds: int) -> dict[str, dict[str, float]]:
    import torch

    from dgkit.distill.students import load_student
    from dgkit.rundir import RunDir
    from dgkit.serve.predictor import Predictor

    size = RunDir(run).require_trained().preprocess.input_size
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    student = load_student(RunDir(run))

    def torch_fn(batch: np.ndarray) -> Any:
        with torch.inference_mode():
            return student(torch.from_numpy(batch))

    files = {f"ort-{FORMATS[k].precision}": FORMATS[k].filename
             for k in ("onnx-fp32", "onnx-int8", "onnx-int8-trt")}
    out: dict[str, dict[str, float]] = {}
    for single in (False, True):  # --threads wall clock, then one thread's CPU time
        n = 1 if single else threads
        torch.set_num_threads(n)
        fns = {"torch-fp32": torch_fn, **{k: Predictor(Path(run) / "export" / f,
                                                       backend="ort-cpu", threads=n).run_batch
                                          for k, f in files.items()}}
        best = {k: float("inf") for k in fns}
        for _ in range(1 if single else rounds):
            for key, fn in fns.items():
                for _ in range(5):
                    fn(x)
                clock = time.process_time if single else time.perf_counter
                best[key] = min(best[key], _median_ms(fn, x, runs, clock))
        for key, value in best.items():
            out.setdefault(key, {})["cpu_ms" if single else "wall_ms"] = round(value, 2)
    return out


def bench_student(student: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dgkit.export.exporter import ExportOptions, export_run
    from dgkit.rundir import RunDir

    if args.run:
        run = Path(shutil.copytree(args.run, work / f"{student}-run"))
        shutil.rmtree(run / "export", ignore_errors=True)
        made = False
    else:
        run = make_run(student, args.data, args.target, args.image_size, work / f"{student}-run")
        made = True
    start = time.perf_counter()
    # The avx2 flavour on every CPU, so that rows stay comparable; bench/cpu_runtimes.py times
    # both CPU flavours.
    summary = export_run(RunDir(run), ExportOptions(int8=True, validate=False, cpu="avx2",
                                                    calib_images=args.calib_images,
                                                    calib_method=args.calib_method))
    export_s = time.perf_counter() - start
    sizes = {FORMATS[k].precision: (run / "export" / FORMATS[k].filename).stat().st_size
             for k in ("onnx-fp32", "onnx-int8", "onnx-int8-trt")}
    lat = latencies(run, args.threads, args.runs, args.rounds)
    ratio = {
        f"int8_vs_torch_{clock}": round(lat["ort-int8"][clock] / lat["torch-fp32"][clock], 3)
        for clock in ("wall_ms", "cpu_ms")
    } | {
        f"int8_vs_ort_fp32_{clock}": round(lat["ort-int8"][clock] / lat["ort-fp32"][clock], 3)
        for clock in ("wall_ms", "cpu_ms")
    }
    return {"student": student, "run": str(args.run or "made here (untrained head)"),
            "made_here": made, "image_size": args.image_size,
            "export_seconds": round(export_s, 1), "export_stages": summary["seconds"],
            "calibration": summary["calibration"],
            "size_mb": {k: round(v / 2**20, 2) for k, v in sizes.items()},
            "int8_size_ratio": round(sizes["int8"] / sizes["fp32"], 3),
            "latency_b1": lat, "ratios": ratio}


def print_table(rows: list[dict[str, Any]], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dgkit export bench ({platform.processor() or platform.machine()}, "
                        f"batch 1; wall ms with {threads} threads / CPU ms of 1 thread)")
    for col in ("student", "export s", "torch", "ort fp32", "ort int8", "int8-trt",
                "int8/torch", "int8/ort", "int8 size"):
        table.add_column(col, justify="left" if col == "student" else "right")
    for r in rows:
        lat, ratio = r["latency_b1"], r["ratios"]

        def cell(key: str, lat: dict = lat) -> str:
            return f"{lat[key]['wall_ms']:.1f} / {lat[key]['cpu_ms']:.1f}"

        table.add_row(r["student"], f"{r['export_seconds']:.0f}", cell("torch-fp32"),
                      cell("ort-fp32"), cell("ort-int8"), cell("ort-int8-trt"),
                      f"{ratio['int8_vs_torch_wall_ms']:.2f} / {ratio['int8_vs_torch_cpu_ms']:.2f}",
                      f"{ratio['int8_vs_ort_fp32_wall_ms']:.2f} / "
                      f"{ratio['int8_vs_ort_fp32_cpu_ms']:.2f}",
                      f"{r['int8_size_ratio']:.2f}x")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: no 80-column wrapping
        console = Console(width=160)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--target", default="sketch")
    parser.add_argument("--students", default="efficientnet_lite0,resnet18")
    parser.add_argument("--run", type=Path, help="Use this trained run (one student).")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--calib-method", default="minmax")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50, help="Timed runs a round (batch 1).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgkit-bench-export"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    args = parser.parse_args()
    if not args.data.is_dir() and not args.run:
        sys.exit(f"data {args.data} not found; pass --data ROOT or --run RUN")
    shutil.rmtree(args.work, ignore_errors=True)
    rows = [bench_student(s, args, args.work) for s in args.students.split(",")]
    print_table(rows, args.threads)
    from dgkit.atomic import write_json
    from dgkit.provenance import provenance

    write_json(args.out, {"threads": args.threads, "results": rows,
                          "provenance": provenance()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
