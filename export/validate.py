"""Validation of exported artifacts on the domains the student never saw.

Every artifact runs through `dgkit.serve.Predictor` (exactly what ships) on images decoded once;
the torch FP32 student is the reference. For each: accuracy per target domain and on the
source-validation split, top-1 agreement with torch FP32, file size, batch-1 latency (median of
50 runs after warm-up) and batch-32 throughput on this machine.

One gate for every artifact (`Gate`): its accuracy drop on the held-out images and on the
source-validation split, and its top-1 agreement on the held-out images, each against torch
FP32 on the same images. A check fails only when its whole 95 % interval is beyond the limit, so
that one flipped image of a small set does not fail an export; where a set is too small to
resolve a limit, the report says so. Writes report.json, report.md, report.png (the checks and
latency), report-confusion.png and training.png (the run's metrics.jsonl).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.atomic import write_atomic, write_text
from dgkit.export.commands import Gate
from dgkit.export.formats import TORCH_KEY, Format, format_of
from dgkit.export.images import SOURCE_VAL, EvalSet, read_batches
from dgkit.preprocess import to_model_input
from dgkit.progress import console, make_progress
from dgkit.provenance import cpu_name, provenance
from dgkit.records import ArtifactResult, GateCheck, ValidationReport

LATENCY_RUNS = 50
WARMUP_RUNS = 5
THROUGHPUT_BATCH = 32
EVAL_BATCH = 64

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
    from dgkit.cpu import instruction_sets
    from dgkit.serve.predictor import Predictor, WrongCpu

    fmt = fmt or format_of(path)
    key = fmt.key if fmt else path.name
    size = path.stat().st_size
    if path.suffix == ".plan":
        from dgkit.export.tensorrt import unavailable

        reason = unavailable()
        if reason:
            return Candidate(key, path.name, fmt.precision if fmt else "", "tensorrt", size,
                             None, f"not runnable here: {reason}")
    try:
        predictor = Predictor(path)
    except WrongCpu as wrong:  # made for a CPU whose int8 arithmetic this one lacks
        console.print(f"{path.name} is for another CPU than this one "
                      f"({instruction_sets()}): validated in exact arithmetic")
        return Candidate(key, path.name, wrong.meta.precision, QDQ_REFERENCE, size,
                         qdq_reference(path), meta=wrong.meta)
    if path.suffix == ".onnx" and predictor.meta.precision == "int8-trt":
        return Candidate(key, path.name, "int8-trt", QDQ_REFERENCE, size,
                         qdq_reference(path), meta=predictor.meta)
    return Candidate(key, path.name, predictor.meta.precision, predictor.backend, size,
                     predictor.run_batch, meta=predictor.meta)


QDQ_REFERENCE = "ort-cpu-qdq-reference"  # the runtime name of `qdq_reference`


def qdq_reference(path: Path) -> Logits:
    """An INT8 model as a runtime that accumulates in 32 bits computes it (TensorRT, or
    onnxruntime on a CPU with VNNI): every Q/DQ pair applied exactly, with onnxruntime's graph
    optimisations off. Its optimised run on an x86 CPU without VNNI would not show this: there
    onnxruntime's int8 kernels add 16-bit pairs of products (vpmaddubsw), which saturate on
    symmetric activations and 8-bit weights."""
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
        for batch in read_batches(s.pixels, EVAL_BATCH):  # from a store: read ahead, not all
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


# ------------------------------------------------------------------ the gate
Z95 = 1.959964  # two-sided 95 % quantile of the normal distribution
INTERVALS = ("95 %; accuracy drops: Agresti-Min paired interval (Wald's for paired proportions "
             "with 1/2 added to each cell of the 2x2 table of right and wrong); agreement: "
             "Wilson score interval")
DROP, SOURCE_DROP, AGREEMENT = "drop", "source_drop", "agreement"
# Each check: what it measures, and the option that sets its limit (a Gate field).
CHECKS = {DROP: ("accuracy drop", "--max-drop"),
          SOURCE_DROP: ("accuracy drop", "--max-source-drop"),
          AGREEMENT: ("top-1 agreement", "--min-agreement")}


def paired_drop_interval(b: int, c: int, n: int) -> tuple[float, float]:
    """95 % interval, in points, of the accuracy drop (b - c) / n of a model against a reference
    on the same n images; b: images only the reference gets right, c: only the model. Agresti
    and Min (Statistics in Medicine 24, 2005): Wald's interval with 1/2 added to each of the four
    cells, which keeps a width when no image flips and enough of one when few do."""
    b2, c2, n2 = b + 0.5, c + 0.5, n + 2
    centre = (b2 - c2) / n2
    se = math.sqrt(b2 + c2 - (b2 - c2) ** 2 / n2) / n2
    return max(-100.0, 100 * (centre - Z95 * se)), min(100.0, 100 * (centre + Z95 * se))


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval, in %, of the proportion k / n."""
    p, z2 = k / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * (centre - half), 100 * (centre + half)


def drop_check(name: str, on: str, reference_right: np.ndarray, right: np.ndarray,
               limit: float) -> GateCheck:
    """Fails when the whole interval of the drop lies above `limit`."""
    n = len(right)
    b = int((reference_right & ~right).sum())
    c = int((right & ~reference_right).sum())
    low, high = paired_drop_interval(b, c, n)
    return GateCheck(name, on, n, round(100 * (b - c) / n, 2), round(low, 2), round(high, 2),
                     limit, low <= limit, right=int(right.sum()), fp32_only=b, artifact_only=c)


def agreement_check(on: str, same: np.ndarray, limit: float) -> GateCheck:
    """Fails when the whole interval of the agreement lies below `limit`."""
    n, k = len(same), int(same.sum())
    low, high = wilson_interval(k, n)
    return GateCheck(AGREEMENT, on, n, round(100 * k / n, 2), round(low, 2), round(high, 2),
                     limit, high >= limit, differ=n - k)


def beyond(check: GateCheck, value: float) -> bool:
    """Whether `value` is on the failing side of the check's limit."""
    return value < check.limit if check.name == AGREEMENT else value > check.limit


def resolves(check: GateCheck) -> bool:
    """Whether the check's images pin the value down to within its limit: half the interval
    no wider than the limit (a drop's, or the disagreement an agreement limit allows)."""
    room = 100 - check.limit if check.name == AGREEMENT else check.limit
    return (check.high - check.low) / 2 <= room


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * (pred == labels).mean()) if len(labels) else float("nan")


def evaluate(candidates: Sequence[Candidate], sets: Sequence[EvalSet], gate: Gate,
             latency_runs: int = LATENCY_RUNS, num_classes: int = 0) -> list[ArtifactResult]:
    """Run every candidate on every set and apply the gate; the first candidate keyed
    torch-fp32 is the reference. `num_classes`: the confusion matrices' size (0: none)."""
    labels = np.concatenate([s.labels for s in sets])
    bounds = np.cumsum([0] + [len(s.pixels) for s in sets])
    held_out = np.concatenate([np.full(len(s.pixels), s.is_target) for s in sets])
    source = np.concatenate([np.full(len(s.pixels), s.name == SOURCE_VAL) for s in sets])
    held_out_name = "+".join(s.name for s in sets if s.is_target)
    # Agreement and the confusion matrices on the held-out images; a run trained on every
    # domain has none, and is measured on its source-validation images.
    shown, shown_name = (held_out, held_out_name) if held_out.any() else (source, SOURCE_VAL)
    preds: dict[str, np.ndarray] = {}
    results = []
    sample = sets[0].pixels[:THROUGHPUT_BATCH]  # all `timings` uses; a store's read once
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
            if num_classes and shown.any():
                cells = labels[shown] * num_classes + pred[shown]
                r.confusion = np.bincount(cells, minlength=num_classes**2).reshape(
                    num_classes, num_classes).tolist()
    reference = preds.get(TORCH_KEY)
    if reference is None:
        return results
    for r in results:
        if r.key not in preds:
            continue
        pred = preds[r.key]
        same = pred == reference
        r.agreement = round(float(100 * same.mean()), 2)
        # On the unseen domain agreement is usually lowest: report it apart.
        r.agreement_by_set = {s.name: round(float(100 * same[lo:hi].mean()), 2)
                              for s, lo, hi in zip(sets, bounds[:-1], bounds[1:], strict=True)}
        if r.key == TORCH_KEY:
            continue
        for name, mask, on, limit in ((DROP, held_out, held_out_name, gate.max_drop),
                                      (SOURCE_DROP, source, SOURCE_VAL, gate.max_source_drop)):
            if mask.any():
                r.checks.append(drop_check(name, on, (reference == labels)[mask],
                                           (pred == labels)[mask], limit))
        r.checks.append(agreement_check(shown_name, same[shown], gate.min_agreement))
        r.failures = [failure(c) for c in r.checks if not c.passed]
    return results


def _limit(check: GateCheck) -> str:
    unit = " %" if check.name == AGREEMENT else "-point"
    return f"{check.limit:g}{unit} limit ({CHECKS[check.name][1]})"


def _measured(check: GateCheck) -> str:
    unit = " %" if check.name == AGREEMENT else " points"
    return f"{CHECKS[check.name][0]} on {check.on}: {check.value:.2f}{unit}"


def failure(check: GateCheck) -> str:
    """The sentence a failed check adds to the report, with the images behind it."""
    side = "below" if check.name == AGREEMENT else "above"
    text = (f"{_measured(check)} (95 % interval {check.low:.2f} to {check.high:.2f}), wholly "
            f"{side} the {_limit(check)}")
    if check.name == AGREEMENT:
        return f"{text}: {check.differ} of {check.images} images predicted otherwise"
    reference_right = check.right + check.fp32_only - check.artifact_only
    return (f"{text}: {check.right} of {check.images} images right, against "
            f"{reference_right} in torch FP32")


def _has_reference(report: ValidationReport) -> bool:
    return any(r.key == TORCH_KEY and r.accuracy for r in report.artifacts)


def _points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def gate_text(report: ValidationReport) -> str:
    """The gate's limits in one sentence (an earlier report's limits where it has them)."""
    parts = [f"held-out accuracy drop at most {_points(report.max_drop)} (--max-drop)"]
    if report.max_source_drop is not None:
        parts.append(f"source-validation drop at most {_points(report.max_source_drop)} "
                     "(--max-source-drop)")
    if report.min_agreement is not None:
        parts.append(f"held-out top-1 agreement at least {report.min_agreement:g} % "
                     "(--min-agreement)")
    return ("Gate against torch FP32 on the same images, failing only what its whole 95 % "
            "interval puts beyond a limit: " + ", ".join(parts) + ".")


INFO, WARN, FAILED = "info", "warn", "fail"  # how a note is shown in a terminal


def notes(report: ValidationReport) -> list[tuple[str, str]]:
    """(level, line) for what the table alone does not say: a partial validation, what could
    not be checked, sets too small to resolve a limit, and one line per failed, skipped or
    narrowly passed artifact."""
    lines = []
    if report.max_images is not None:
        lines.append((WARN, f"partial validation: at most {report.max_images} images a set "
                            "(--max-images)"))
    if not _has_reference(report):
        lines.append((INFO, "no torch FP32 reference (a model file validated alone): accuracy "
                            "only, nothing gated"))
    elif not report.targets:
        lines.append((INFO, "no held-out domain: the run was trained on every domain, so the "
                            "gate checks the source-validation split only; check a new domain "
                            "with dgkit validate MODEL.onnx --data DIR --domain D"))
    # A set too small for a limit: an interval wider than the limit allows reaches across it,
    # so the check passed on the benefit of the doubt.
    checks = [c for r in report.artifacts for c in r.checks if c.low <= c.limit <= c.high]
    for name in CHECKS:
        loose = [c for c in checks if c.name == name and not resolves(c)]
        if loose:
            c = loose[0]
            widest = max((x.high - x.low) / 2 for x in loose)
            side = "below" if name == AGREEMENT else "above"
            lines.append((INFO, f"{c.images} {c.on} images cannot resolve the {_limit(c)}: "
                                f"95 % intervals up to ±{widest:.1f} points wide, so an artifact "
                                f"fails only when its whole interval is {side} the limit"))
    for r in report.artifacts:
        if r.failures:
            lines.append((FAILED, f"{r.name}: {'; '.join(r.failures)}"))
        elif r.skipped:
            lines.append((WARN, f"{r.name}: {r.skipped}"))
        for c in r.checks:
            if c.passed and beyond(c, c.value):
                lines.append((WARN, f"{r.name}: {_measured(c)}, beyond the {_limit(c)} but not "
                                    f"clearly: its 95 % interval ({c.low:.2f} to {c.high:.2f}) "
                                    "reaches the limit, so it passes"))
    return lines


# ------------------------------------------------------------------ tables
@dataclass
class Column:
    header: tuple[str, ...]  # a terminal stacks these lines; report.md joins them
    cells: list[str]
    rank: int  # a narrow terminal leaves out the highest ranks first; 0: always shown
    left: bool = False


def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _interval(check: GateCheck | None) -> str:
    return "-" if check is None else f"[{check.low:.2f}, {check.high:.2f}]"


def columns(report: ValidationReport) -> list[Column]:
    """The table of report.md and of the terminal, most important columns ranked lowest: the
    held-out accuracy and the gate's checks before the rest."""
    rows = report.artifacts
    cols = [Column(("artifact",), [r.name for r in rows], 0, left=True),
            Column(("precision",), [r.precision for r in rows], 6, left=True),
            Column(("runtime",), [r.runtime for r in rows], 7, left=True),
            Column(("MB",), [_cell(r.size_mb) for r in rows], 5)]
    cols += [Column(("acc", n), [_cell(r.accuracy.get(n)) for r in rows],
                    1 if n in report.targets else 3) for n in report.sets]
    gated = ""  # the set whose agreement the gate checks, when it is one set
    for name, rank in ((DROP, 1), (SOURCE_DROP, 2), (AGREEMENT, 2)):
        checked = [r.check(name) for r in rows]
        on = next((c.on for c in checked if c is not None), None)
        if on is None:
            continue
        gated = on if name == AGREEMENT else gated
        what = "agree" if name == AGREEMENT else "drop"
        images = "source" if on == SOURCE_VAL else "held-out"  # narrower than the set names
        cols += [Column((what, images), [_cell(c and c.value) for c in checked], rank),
                 Column((f"{what} 95 % CI", images), [_interval(c) for c in checked], 4)]
    cols += [Column(("agree", n), [_cell(r.agreement_by_set.get(n)) for r in rows], 7)
             for n in report.sets if n != gated]
    cols += [Column(("b1", "ms"), [_cell(r.latency_ms) for r in rows], 5),
             Column(("b32", "img/s"), [_cell(r.throughput, "{:.1f}") for r in rows], 7),
             Column(("status",), [r.status for r in rows], 0, left=True)]
    return cols


def render(cols: list[Column], width: int | None) -> tuple[list[str], list[Column]]:
    """Plain-text table lines no wider than `width` (None: every column), whole cells only:
    the highest-ranked columns are left out until it fits. Also returns those left out."""
    shown = list(cols)

    def size(c: Column) -> int:
        return max(len(x) for x in [*c.header, *c.cells])

    while width is not None and sum(map(size, shown)) + 2 * (len(shown) - 1) > width:
        droppable = [c for c in shown if c.rank > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda c: (c.rank, shown.index(c))))
    height = max(len(c.header) for c in shown)

    def line(cells: list[str]) -> str:
        return "  ".join(x.ljust(size(c)) if c.left else x.rjust(size(c))
                         for c, x in zip(shown, cells, strict=True)).rstrip()

    heads = [[""] * (height - len(c.header)) + list(c.header) for c in shown]
    lines = [line([h[i] for h in heads]) for i in range(height)]
    lines.append(line(["-" * size(c) for c in shown]))
    lines += [line([c.cells[i] for c in shown]) for i in range(len(shown[0].cells))]
    return lines, [c for c in cols if c not in shown]


def markdown(report: ValidationReport, figures: Sequence[tuple[str, str]] = ()) -> str:
    """report.md; `figures`: (caption, file name) of the PNGs beside it."""
    cols = columns(report)
    held_out = ", ".join(report.targets) or "none (trained on every domain)"
    lines = [f"# dgkit validation: {report.model}", "",
             f"Device: {report.device}. Held out: {held_out}. Images: "
             + ", ".join(f"{k} {v}" for k, v in report.images.items()) + ".", "",
             f"**Pass: {'yes' if report.passed else 'no'}.** {gate_text(report)} Intervals: "
             f"{report.intervals or 'none'}. Accuracy, drop and agreement in %; drop is torch "
             "FP32's accuracy minus the artifact's on the same images; agreement is top-1 "
             "agreement with torch FP32.", "",
             "| " + " | ".join(" ".join(c.header) for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.cells[i] for c in cols) + " |"
              for i in range(len(report.artifacts))]
    lines += ["", *[f"- {line}" for _, line in notes(report)]]
    for caption, name in figures:
        lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


def terminal_width() -> int | None:
    """Columns to fit: $COLUMNS when set, else the terminal's; None in a log or a pipe, where
    nothing is cut."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def print_table(report: ValidationReport, width: int | None = None) -> None:
    """The report on stdout as plain text within `width` (default: `terminal_width()`), every
    artifact name whole; colours only in a terminal."""
    from rich.console import Console

    width = width or terminal_width()
    out = Console(highlight=False, soft_wrap=True, emoji=False)

    def wrapped(text: str, style: str | None = None) -> None:
        for line in textwrap.wrap(text, width or len(text) or 1, subsequent_indent="  ",
                                  break_long_words=False, break_on_hyphens=False):
            out.print(line, style=style, markup=False)

    wrapped(f"Validation of {report.model} ({report.device})", "bold")
    wrapped(gate_text(report))
    lines, left_out = render(columns(report), width)
    colour = {"ok": None, "skipped": "yellow", "FAIL": "red"}
    height = len(lines) - len(report.artifacts)
    for i, line in enumerate(lines):
        row = i - height
        out.print(line, markup=False, style=colour[report.artifacts[row].status]
                  if row >= 0 else None)
    if left_out:
        wrapped(f"not shown at {width} columns: "
                + ", ".join(" ".join(c.header) for c in left_out) + " (report.md has them)")
    wrapped(f"Pass: {'yes' if report.passed else 'no'}", None if report.passed else "red")
    style = {INFO: None, WARN: "yellow", FAILED: "red"}
    for level, line in notes(report):
        wrapped(line, style[level])


# ------------------------------------------------------------------ figures
PASS, FAIL, REFERENCE = "#4c9a5b", "#c8453c", "#8a8a8a"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)


def chart(report: ValidationReport, path: Path) -> None:
    """report.png: each gate check (value, 95 % interval, the limit, pass or fail colour) and
    batch-1 latency on a log axis, with value labels."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    checks = [n for n in CHECKS if any(r.check(n) for r in report.artifacts)]
    panels = len(checks) + 1
    ncols = 2 if panels > 1 else 1
    nrows = math.ceil(panels / ncols)
    height = 0.42 * max(1, len(report.artifacts)) + 1.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, height * nrows), squeeze=False)
    for ax, name in zip(axes.flat, checks, strict=False):
        rows = [(r.name, c) for r in report.artifacts if (c := r.check(name))]
        for y, (_, c) in enumerate(rows):  # the value, its interval, and the value's label
            ax.errorbar(c.value, y, xerr=[[c.value - c.low], [c.high - c.value]], fmt="o",
                        color=PASS if c.passed else FAIL, capsize=4, markersize=6)
            ax.annotate(f"{c.value:.2f}", (c.value, y), xytext=(0, 7),
                        textcoords="offset points", ha="center", fontsize=8)
        first = rows[0][1]
        ax.axvline(first.limit, color="#222222", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), [n for n, _ in rows])
        ax.set_ylim(len(rows) - 0.5, -0.7)
        unit = "%" if name == AGREEMENT else "points"
        ax.set_xlabel(f"vs torch FP32 ({unit}), 95 % interval; dashed: the limit")
        ax.set_title(f"{CHECKS[name][0]} on {first.on} (limit {first.limit:g}, "
                     f"{CHECKS[name][1]})", fontsize=10)
        ax.margins(x=0.1)
    ax = axes.flat[len(checks)]
    timed = [r for r in report.artifacts if r.latency_ms]
    if timed:
        colours = [REFERENCE if r.key == TORCH_KEY else FAIL if r.failures else PASS
                   for r in timed]
        ax.barh([r.name for r in timed], [r.latency_ms for r in timed], color=colours)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        for y, r in enumerate(timed):
            ax.annotate(f"{r.latency_ms:.1f} ms", (r.latency_ms, y), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.margins(x=0.3)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "not timed (--latency-runs 0)", ha="center", va="center")
        ax.set_yticks([])
    ax.set_xlabel("batch-1 latency (ms, log scale)")
    ax.set_title(report.device[:60], fontsize=9)
    for extra in list(axes.flat)[panels:]:
        extra.set_visible(False)
    _save(fig, path)


def confusion_pick(report: ValidationReport) -> list[ArtifactResult]:
    """Whose confusion matrices the figure shows: torch FP32 and the artifact with the largest
    drop on the confusion images (or every model, without a reference)."""
    ran = [r for r in report.artifacts if r.confusion is not None]
    reference = [r for r in ran if r.key == TORCH_KEY]
    checked = [(c.value, c.fp32_only + c.artifact_only, r) for r in ran for c in r.checks
               if c.name in (DROP, SOURCE_DROP) and c.on == report.confusion_on]
    if not reference:
        return ran
    return reference + ([max(checked, key=lambda t: t[:2])[2]] if checked else [])


def confusion_chart(report: ValidationReport, path: Path) -> bool:
    """The confusion matrices of `confusion_pick` as a PNG; False (nothing written) when the
    report has none."""
    picked = confusion_pick(report)
    if not picked or not report.classes:
        return False
    plt = _pyplot()
    size = 0.5 * len(report.classes) + 2.2
    fig, axes = plt.subplots(1, len(picked), figsize=(size * len(picked), size), squeeze=False)
    for ax, r in zip(axes[0], picked, strict=True):
        counts = np.array(r.confusion)
        shares = counts / np.maximum(1, counts.sum(1, keepdims=True))
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.6 else "black")
        ticks = range(len(report.classes))
        ax.set_xticks(ticks, report.classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, report.classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        right = np.trace(counts) / max(1, counts.sum())
        ax.set_title(f"{r.name} on {report.confusion_on}: {100 * right:.1f} % right",
                     fontsize=9)
    _save(fig, path)
    return True


def training_chart(metrics: Sequence[dict[str, Any]], best_step: int | None,
                   path: Path) -> bool:
    """training.png from the run's metrics.jsonl: the training loss (the sum of its terms, each
    term thin) and the validation accuracies against the step; False when there are none."""
    rows = [m for m in metrics if "step" in m]
    if not rows:
        return False
    plt = _pyplot()
    steps = [m["step"] for m in rows]
    fig, (loss, acc) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    terms = sorted({k for m in rows for k in m.get("losses", {})})
    if terms:
        loss.plot(steps, [sum(m.get("losses", {}).values()) for m in rows], "o-", color="black",
                  label="training loss")
        if len(terms) > 1:
            for k in terms:
                loss.plot(steps, [m.get("losses", {}).get(k, math.nan) for m in rows], ".-",
                          linewidth=0.8, label=k)
        loss.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    loss.set_ylabel("training loss\n(mean since the last evaluation)")
    acc.plot(steps, [m.get("source_val_mean", math.nan) for m in rows], "o-", color="black",
             label="source validation (mean)")
    for key, style in (("source_val", ":"), ("target", "--")):
        for domain in sorted({d for m in rows for d in m.get(key) or {}}):
            what = "held out" if key == "target" else "validation"
            acc.plot(steps, [(m.get(key) or {}).get(domain, math.nan) for m in rows],
                     f".{style}", linewidth=1, label=f"{domain} ({what})")
    if best_step is not None:
        for ax in (loss, acc):
            ax.axvline(best_step, color="#888888", linestyle="--", linewidth=1)
        acc.annotate(f"selected step {best_step}", (best_step, 0.02),
                     xycoords=("data", "axes fraction"), xytext=(4, 0),
                     textcoords="offset points", fontsize=8)
    acc.set_ylabel("accuracy (%)")
    acc.set_xlabel("step")
    acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


# ------------------------------------------------------------------ the report
def build_report(model: str, results: Sequence[ArtifactResult], sets: Sequence[EvalSet],
                 gate: Gate, classes: Sequence[str] = (), export: dict[str, Any] | None = None,
                 validate_seconds: float | None = None,
                 max_images: int | None = None) -> ValidationReport:
    targets = [s.name for s in sets if s.is_target]
    return ValidationReport(
        model=model, device=cpu_name(), targets=targets,
        sets=[s.name for s in sets], images={s.name: int(len(s.pixels)) for s in sets},
        max_drop=gate.max_drop, passed=not any(r.failures for r in results),
        artifacts=list(results), export=export, validate_seconds=validate_seconds,
        provenance=provenance(), max_source_drop=gate.max_source_drop,
        min_agreement=gate.min_agreement, intervals=INTERVALS, max_images=max_images,
        classes=list(classes), confusion_on="+".join(targets) or SOURCE_VAL)


def write_report(report: ValidationReport, folder: Path, stem: str = "report",
                 metrics: Sequence[dict[str, Any]] = (),
                 best_step: int | None = None) -> list[Path]:
    """STEM.json, STEM.md, STEM.png, STEM-confusion.png and, from a run's `metrics`,
    training.png; returns the paths written."""
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    report.write(paths[0])
    figures: list[tuple[str, str]] = []
    try:
        _pyplot()
    except ImportError:  # an edge box: dgkit without [train]
        console.print("no figures: matplotlib is not installed (pip install matplotlib, or "
                      "dgkit[train])")
    else:
        chart(report, folder / f"{stem}.png")
        paths.append(folder / f"{stem}.png")
        figures.append(("Gate checks and latency", f"{stem}.png"))
        confusion = folder / f"{stem}-confusion.png"
        if confusion_chart(report, confusion):
            paths.append(confusion)
            figures.append((f"Confusion matrices on {report.confusion_on}", confusion.name))
        training = folder / "training.png"
        if training_chart(metrics, best_step, training):
            paths.append(training)
            figures.append(("Training loss and validation accuracy", training.name))
    write_text(paths[1], markdown(report, figures))
    return paths
