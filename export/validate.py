"""Validation of exported artifacts on the domains the student never saw.

Every artifact runs through `dgkit.serve.Predictor` (exactly what ships) on images decoded once;
the torch FP32 student is the reference. For each: accuracy per target domain and on the
source-validation split, top-1 agreement with torch FP32, file size, batch-1 latency (median of
50 runs after warm-up) and batch-32 throughput on this machine. Writes report.json, report.md and
report.png and says which artifacts fail (target accuracy more than `max_drop` points below torch
FP32, or an FP16 model agreeing with FP32 on fewer than 99.5 % of the images).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.atomic import write_atomic, write_text
from dgkit.export.formats import TORCH_KEY, Format, format_of
from dgkit.export.images import EvalSet
from dgkit.preprocess import to_model_input
from dgkit.progress import make_progress
from dgkit.provenance import cpu_name, provenance
from dgkit.records import ArtifactResult, ValidationReport

LATENCY_RUNS = 50
WARMUP_RUNS = 5
THROUGHPUT_BATCH = 32
EVAL_BATCH = 64
FP16_MIN_AGREEMENT = 99.5

Logits = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> float32 [N, C]


@dataclass
class Candidate:
    key: str
    file: str  # file name, or "" for the in-memory torch student
    precision: str
    runtime: str
    size_bytes: int
    run: Logits | None  # None: not runnable here (see `skipped`)
    skipped: str = ""
    meta: Any = None  # the file's ModelMeta


def torch_candidate(student: Any, size_bytes: int) -> Candidate:
    import torch

    from dgkit.serve.backends import physical_cores

    torch.set_num_threads(physical_cores())

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return student(torch.from_numpy(batch)).float().numpy()

    return Candidate(TORCH_KEY, "", "fp32", "torch-cpu", size_bytes, run)


def file_candidate(path: Path, fmt: Format | None = None) -> Candidate:
    """An exported model run by the serve Predictor, or a note saying why it cannot run here."""
    from dgkit.serve.predictor import Predictor

    fmt = fmt or format_of(path)
    key = fmt.key if fmt else path.name
    size = path.stat().st_size
    if path.suffix == ".plan":
        from dgkit.export.tensorrt import unavailable

        reason = unavailable()
        if reason:
            return Candidate(key, path.name, fmt.precision if fmt else "", "tensorrt", size,
                             None, f"not runnable here: {reason}")
    predictor = Predictor(path)
    if path.suffix == ".onnx" and predictor.meta.precision == "int8-trt":
        return Candidate(key, path.name, "int8-trt", "ort-cpu-qdq-reference", size,
                         qdq_reference(path), meta=predictor.meta)
    return Candidate(key, path.name, predictor.meta.precision, predictor.backend, size,
                     predictor.run_batch, meta=predictor.meta)


def qdq_reference(path: Path) -> Logits:
    """The symmetric-INT8 model as TensorRT computes it: every Q/DQ pair applied exactly, with
    onnxruntime's graph optimisations off. Its optimised CPU run would not show this: on x86
    CPUs without VNNI onnxruntime's int8 kernels add 16-bit pairs of products (vpmaddubsw),
    which saturate on symmetric activations and cost this model most of its accuracy, while
    TensorRT accumulates in 32 bits."""
    import onnxruntime as ort

    from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME
    from dgkit.serve.backends import physical_cores

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = physical_cores()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def logits_for(candidate: Candidate, sets: Sequence[EvalSet], progress: Any) -> np.ndarray:
    assert candidate.run is not None
    total = sum(len(s.pixels) for s in sets)
    task = progress.add_task(f"Validating {candidate.file or candidate.key}", total=total)
    out = []
    for s in sets:
        for i in range(0, len(s.pixels), EVAL_BATCH):
            batch = s.pixels[i:i + EVAL_BATCH]
            out.append(candidate.run(to_model_input(batch)))
            progress.advance(task, len(batch))
    return np.concatenate(out)


def timings(run: Logits, pixels: np.ndarray,
            runs: int = LATENCY_RUNS) -> tuple[float | None, float | None]:
    """Median batch-1 latency (ms) over `runs` runs after warm-up, and batch-32 images/s
    (batches for about a second); (None, None) when `runs` is 0."""
    if runs < 1:
        return None, None
    one = to_model_input(pixels[:1])
    many = to_model_input(np.resize(pixels, (THROUGHPUT_BATCH, *pixels.shape[1:])))
    for _ in range(WARMUP_RUNS):
        run(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    run(many)
    count, start = 0, time.perf_counter()
    while count < 3 or (time.perf_counter() - start < 1.0 and count < 20):
        run(many)
        count += 1
    seconds = time.perf_counter() - start
    return round(1000 * statistics.median(times), 2), round(THROUGHPUT_BATCH * count / seconds, 1)


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * (pred == labels).mean()) if len(labels) else float("nan")


def evaluate(candidates: Sequence[Candidate], sets: Sequence[EvalSet], max_drop: float,
             latency_runs: int = LATENCY_RUNS) -> list[ArtifactResult]:
    """Run every candidate on every set; the first candidate keyed torch-fp32 is the reference."""
    labels = np.concatenate([s.labels for s in sets])
    bounds = np.cumsum([0] + [len(s.pixels) for s in sets])
    preds: dict[str, np.ndarray] = {}
    results = []
    sample = sets[0].pixels
    with make_progress() as progress:
        for c in candidates:
            r = ArtifactResult(c.key, c.file, c.precision, c.runtime,
                               round(c.size_bytes / 2**20, 3), skipped=c.skipped)
            results.append(r)
            if c.run is None:
                continue
            pred = logits_for(c, sets, progress).argmax(1)
            preds[c.key] = pred
            for s, lo, hi in zip(sets, bounds[:-1], bounds[1:], strict=True):
                r.accuracy[s.name] = round(_accuracy(pred[lo:hi], labels[lo:hi]), 2)
            targets = [r.accuracy[s.name] for s in sets if s.is_target]
            r.target_accuracy = round(float(np.mean(targets)), 2) if targets else None
            r.latency_ms, r.throughput = timings(c.run, sample, latency_runs)
    reference = next((r for r in results if r.key == TORCH_KEY and r.key in preds), None)
    held_out = np.flatnonzero(np.concatenate([np.full(len(s.pixels), s.is_target) for s in sets]))
    for r in results:
        if r.key not in preds:
            continue
        if reference is not None:
            same = preds[r.key] == preds[TORCH_KEY]
            r.agreement = round(float(100 * same.mean()), 2)
            # On the unseen domain agreement is usually lowest: report it apart.
            r.agreement_by_set = {s.name: round(float(100 * same[lo:hi].mean()), 2)
                                  for s, lo, hi in zip(sets, bounds[:-1], bounds[1:], strict=True)}
            if r.target_accuracy is not None and reference.target_accuracy is not None:
                r.drop = round(reference.target_accuracy - r.target_accuracy, 2)
                if r.drop > max_drop:
                    # In images too: on a small held-out set one image is a large share.
                    right = (preds[r.key] == labels)[held_out].sum()
                    reference_right = (preds[TORCH_KEY] == labels)[held_out].sum()
                    r.failures.append(f"target accuracy {r.target_accuracy:.2f} is {r.drop:.2f} "
                                      f"points below torch FP32 (limit {max_drop:g}): "
                                      f"{right} of {len(held_out)} held-out images right, "
                                      f"against {reference_right}")
        if r.precision == "fp16" and "onnx-fp32" in preds and r.key.startswith("onnx"):
            agree = float(100 * (preds[r.key] == preds["onnx-fp32"]).mean())
            if agree < FP16_MIN_AGREEMENT:
                r.failures.append(f"top-1 agrees with ONNX FP32 on {agree:.2f} % of the images "
                                  f"(needs {FP16_MIN_AGREEMENT} %)")
    return results


def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def table_rows(report: ValidationReport) -> tuple[list[str], list[list[str]]]:
    names = report.sets
    # Agreement per set: on the unseen domain it is usually lowest, and that is the gate's point.
    header = ["artifact", "precision", "runtime", "MB", *[f"acc {n}" for n in names],
              *[f"agree {n}" for n in names], "b1 ms", "b32 img/s", "status"]
    rows = [[r.name, r.precision, r.runtime, _cell(r.size_mb),
             *[_cell(r.accuracy.get(n)) for n in names],
             *[_cell(r.agreement_by_set.get(n)) for n in names],
             _cell(r.latency_ms), _cell(r.throughput, "{:.1f}"), r.status]
            for r in report.artifacts]
    return header, rows


def notes(report: ValidationReport) -> list[str]:
    """One line per failed or skipped artifact."""
    return [f"{r.name}: {'; '.join(r.failures) or r.skipped}"
            for r in report.artifacts if r.failures or r.skipped]


def markdown(report: ValidationReport) -> str:
    header, rows = table_rows(report)
    lines = [f"# dgkit validation: {report.model}", "",
             f"Device: {report.device}. Targets: {', '.join(report.targets)}. "
             f"Images: " + ", ".join(f"{k} {v}" for k, v in report.images.items()) + ".",
             f"Pass: {'yes' if report.passed else 'no'} (max drop {report.max_drop:g} "
             "points of target accuracy below torch FP32). Accuracy and agreement in %; "
             "agreement is top-1 agreement with torch FP32 on each set's images.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *[f"- {line}" for line in notes(report)]]
    return "\n".join(lines) + "\n"


def chart(report: ValidationReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.artifacts if r.target_accuracy is not None]
    names = [r.name for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2.2))
    left.barh(names, [r.target_accuracy for r in rows], color="#4878a8")
    left.set_xlabel("target accuracy (%)")
    left.set_title(f"Target: {', '.join(report.targets)}")
    right.barh(names, [r.latency_ms or 0 for r in rows], color="#d08040")
    right.set_xlabel("batch-1 latency (ms)")
    right.set_title(report.device[:60], fontsize=9)
    right.set_yticks([])
    for ax in (left, right):
        ax.invert_yaxis()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def build_report(model: str, results: Sequence[ArtifactResult], sets: Sequence[EvalSet],
                 max_drop: float, export: dict[str, Any] | None = None,
                 validate_seconds: float | None = None) -> ValidationReport:
    return ValidationReport(
        model=model, device=cpu_name(), targets=[s.name for s in sets if s.is_target],
        sets=[s.name for s in sets], images={s.name: int(len(s.pixels)) for s in sets},
        max_drop=max_drop, passed=not any(r.failures for r in results),
        artifacts=list(results), export=export, validate_seconds=validate_seconds,
        provenance=provenance())


def write_report(report: ValidationReport, folder: Path, stem: str = "report") -> list[Path]:
    paths = [folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"]
    report.write(paths[0])
    write_text(paths[1], markdown(report))
    chart(report, paths[2])
    return paths


def print_table(report: ValidationReport) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(report)
    table = Table(title=f"Validation of {report.model} ({report.device})")
    for name in header:
        table.add_column(name, justify="left" if name == "artifact" else "right")
    colour = {"ok": None, "skipped": "yellow", "FAIL": "red"}
    for row in rows:
        table.add_row(*row, style=colour[row[-1]])
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no 80-column wrapping
        console = Console(width=200)
    console.print(table)
    for line in notes(report):
        console.print(line, style="yellow" if "not runnable" in line else "red")
