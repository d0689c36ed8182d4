"""`dgkit export` and `dgkit validate`: from a run directory to checked, deployable artifacts.

Every artifact is written atomically (temporary file, then rename) and only after its checks
pass, so a crash, a full disk or a failed check never leaves a half-written or unchecked file
beside a good one.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from dgkit.atomic import atomic_path
from dgkit.errors import DgkitError, require_extra
from dgkit.export import formats
from dgkit.export.commands import Gate
from dgkit.export.formats import CALIB_CACHE, TIMING_CACHE, TRITON_ARTIFACTS, Format
from dgkit.export.quantize import DEFAULT_CALIB_METHOD
from dgkit.progress import console
from dgkit.records import RunConfig, ValidationReport
from dgkit.rundir import RunDir


@dataclass
class ExportOptions:
    fp16: bool = False
    int8: bool = False
    trt: bool = False
    calib_method: str = DEFAULT_CALIB_METHOD
    calib_images: int = 512
    max_batch: int = 32
    data: Path | None = None  # default: the run's data root
    validate: bool = True
    max_images: int | None = None
    max_drop: float = Gate.max_drop
    max_source_drop: float = Gate.max_source_drop
    min_agreement: float = Gate.min_agreement
    latency_runs: int = 50
    triton: str | None = None  # fp32, fp16 or int8: that artifact as a Triton model repository
    cpu: str = "auto"  # the CPU INT8 flavour: avx2, vnni or auto (this machine's)

    @property
    def gate(self) -> Gate:
        return Gate(self.max_drop, self.max_source_drop, self.min_agreement)


def _check_export_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise DgkitError(f"{path} is a file, not a folder; move it away so that dgkit export can "
                         "write its artifacts there")


def require_export(run: RunDir, *names: str) -> None:
    """A trained run whose export/ holds `names`; checked before minutes of image decoding."""
    run.require_trained()  # a path that is no run gets that sentence, not the export's
    for name in names:
        if not (run.export / name).is_file():
            raise DgkitError(f"{run.export / name} is missing; run dgkit export {run.path} "
                             "--int8 first")


def run_context(run: RunDir, data_root: Path | None, max_images: int | None):
    """The run's config, the data its validation sets came from, and the sets (decoded once)."""
    from dgkit.export.images import eval_sets, load_data

    config = run.require_trained()
    root = data_root or Path(config.data_root)
    data = load_data(root, [*config.target_domains, *config.source_domains], config.classes)
    sets = eval_sets(data, config.classes, config.target_domains, config.source_domains,
                     config.seed, config.preprocess, max_images)
    return config, data, sets


@dataclass
class _Export:
    """What the format writers share: the run, its student, its images and what was written."""

    run: RunDir
    config: RunConfig
    opts: ExportOptions
    data: Any  # DomainData of the run's domains
    student: Any  # the torch student
    parity: Any  # uint8 images the FP32 export is checked on
    fp32_model: Any = None  # the FP32 ONNX graph in memory, which FP16 is converted from
    written: dict[str, Path] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def path(self, fmt: Format) -> Path:
        return self.run.export / fmt.filename

    def wrote(self, fmt: Format, note: str = "") -> None:
        self.written[fmt.key] = self.path(fmt)
        console.print(f"wrote {self.path(fmt)}{note}")


def _write_onnx(x: _Export, fmts: list[Format]) -> None:
    """FP32 ONNX, renamed into place only when it matches torch on the parity images."""
    import onnx

    from dgkit.export import onnx_export as ox

    (fmt,) = fmts
    model = ox.to_onnx(x.student, ox.model_meta(x.run, x.config, fmt.precision), x.parity)
    reference = ox.torch_logits(x.student, x.parity)
    with atomic_path(x.path(fmt)) as tmp:
        onnx.save_model(model, str(tmp))
        diff = ox.check_parity(tmp, reference, x.parity)
    x.fp32_model = model
    x.wrote(fmt, f" (parity with torch on {len(x.parity)} images: max |logit diff| {diff:.1e}, "
                 "same top-1)")


def _write_fp16(x: _Export, fmts: list[Format]) -> None:
    from dgkit.export import onnx_export as ox

    (fmt,) = fmts
    meta = ox.model_meta(x.run, x.config, fmt.precision)
    ox.save_onnx(ox.to_fp16(x.fp32_model, meta), x.path(fmt))
    x.wrote(fmt)


def _write_int8(x: _Export, fmts: list[Format]) -> None:
    """Every INT8 flavour from one calibration pass (`dgkit.export.quantize.FLAVOURS`)."""
    from dgkit.export import onnx_export as ox
    from dgkit.export.images import calibration_pixels
    from dgkit.export.quantize import quantize

    pixels, calib = calibration_pixels(x.data, x.config.source_domains, x.config.seed,
                                       x.opts.calib_images, x.config.preprocess,
                                       x.run.export / CALIB_CACHE)
    metas = {f.precision: ox.model_meta(x.run, x.config, f.precision) for f in fmts}
    models = quantize(x.written["onnx-fp32"], pixels, x.opts.calib_method, metas)
    for fmt in fmts:
        ox.save_onnx(models[fmt.precision], x.path(fmt))
        x.wrote(fmt)
    x.calibration = {**calib, "method": x.opts.calib_method}


def _write_tensorrt(x: _Export, fmts: list[Format]) -> None:
    import onnx

    from dgkit.export import tensorrt

    reason = tensorrt.unavailable()
    if reason:
        console.print(f"[yellow]--trt: no TensorRT engine built: {escape(reason)}")
        return
    for fmt in fmts:
        source = x.written[fmt.source]
        props = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
        tensorrt.build_engine(source, x.path(fmt), props, x.opts.max_batch,
                              x.run.export / TIMING_CACHE, fmt.precision)
        x.wrote(fmt)


# Format.writer -> the function that writes those formats (one call for all of them).
WRITERS: dict[str, Callable[[_Export, list[Format]], None]] = {
    "onnx": _write_onnx, "fp16": _write_fp16, "int8": _write_int8, "tensorrt": _write_tensorrt}


def export_run(run: RunDir, opts: ExportOptions) -> dict[str, Any]:
    """Write the artifacts `opts` asks for under RUN/export/, in table order, then validate."""
    from dgkit.export.images import MIN_CALIB_IMAGES
    from dgkit.export.quantize import CALIB_METHODS

    gate = opts.gate  # refuses a limit out of range before any work
    if opts.calib_method not in CALIB_METHODS:
        raise DgkitError(f"--calib-method '{opts.calib_method}' is not one of: "
                         f"{', '.join(CALIB_METHODS)}")
    if opts.max_batch < 1:
        raise DgkitError(f"--max-batch must be at least 1, got {opts.max_batch}")
    if opts.int8 and opts.calib_images < MIN_CALIB_IMAGES:
        raise DgkitError(f"--calib-images {opts.calib_images} is too few: INT8 calibration "
                         f"needs at least {MIN_CALIB_IMAGES} images")
    if opts.triton is not None and opts.triton not in TRITON_ARTIFACTS:
        raise DgkitError(f"--triton '{opts.triton}' is not one of: "
                         f"{', '.join(TRITON_ARTIFACTS)}")
    # --triton fp16 or int8 needs that artifact, so it is written too.
    int8 = opts.int8 or opts.triton == "int8"
    cpu = cpu_flavour(opts.cpu, announce=int8)
    plan = formats.wanted(opts.fp16 or opts.triton == "fp16", int8, opts.trt, cpu)
    for fmt in plan:
        if fmt.extra != "trt":  # a missing TensorRT is reported, the ONNX files still written
            for module in fmt.needs:
                require_extra(fmt.extra, module)
    run.require_trained()
    _check_export_dir(run.export)
    from dgkit.atomic import remove_stale_temps
    remove_stale_temps(run.export)  # left by exports that were killed
    from dgkit.distill.students import load_student
    from dgkit.export import onnx_export as ox
    from dgkit.export.images import gather_rows

    started = time.perf_counter()
    # Without validation only the parity images are needed: 32 from each validation set.
    limit = opts.max_images if opts.validate else ox.PARITY_IMAGES // 2
    config, data, sets = run_context(run, opts.data, limit)
    student = load_student(run)
    parity = gather_rows(sets, ox.parity_rows(sum(len(s.pixels) for s in sets)))
    x = _Export(run, config, opts, data, student, parity)
    timing: dict[str, float] = {}
    for writer, group in itertools.groupby(plan, key=lambda f: f.writer):
        t = time.perf_counter()
        WRITERS[writer](x, list(group))
        timing[writer] = time.perf_counter() - t
    if opts.triton:
        from dgkit.export.triton import write_repository

        key = formats.cpu_int8_key(cpu) if opts.triton == "int8" else TRITON_ARTIFACTS[opts.triton]
        repo = write_repository(x.written[key], run.export / "triton",
                                name=triton_name(run), max_batch=opts.max_batch)
        console.print(f"wrote {repo} (Triton model repository: tritonserver "
                      f"--model-repository {repo.parent})", soft_wrap=True)
    timing["export_total"] = time.perf_counter() - started

    summary: dict[str, Any] = {"artifacts": {k: str(p) for k, p in x.written.items()},
                               "calibration": x.calibration, "seconds": _rounded(timing)}
    if opts.validate:
        candidates = _candidates(run, student, [(formats.BY_KEY[k], p)
                                                for k, p in x.written.items()])
        # The artifacts are new, so their report is report.json even when partial: an earlier
        # one would describe the files they replaced. A partial report says so.
        summary["report"] = _validate(candidates, sets, gate, opts.latency_runs, run.export,
                                      run, config.classes, opts.max_images, dict(summary))
    return summary


def cpu_flavour(option: str, announce: bool = True) -> str:
    """The CPU INT8 flavour `--cpu option` asks for; with `announce`, auto says which it chose
    and why."""
    from dgkit.cpu import CPU_FLAVOURS, instruction_sets, native_flavour

    if option not in ("auto", *CPU_FLAVOURS):
        raise DgkitError(f"--cpu '{option}' is not one of: auto, {', '.join(CPU_FLAVOURS)}")
    if option != "auto":
        return option
    flavour = native_flavour()
    if announce:
        console.print(f"INT8 for CPUs: --cpu auto chose {flavour}, the flavour of this "
                      f"machine's CPU ({instruction_sets()}); pass --cpu for another CPU")
    return flavour


def triton_name(run: RunDir) -> str:
    """The run folder's name in the characters Triton allows in a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run.path.name)


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def _candidates(run: RunDir, student: Any, artifacts: list[tuple[Format, Path]]) -> list:
    from dgkit.export.validate import file_candidate, torch_candidate

    return [torch_candidate(student, run.student.stat().st_size),
            *(file_candidate(path, fmt) for fmt, path in artifacts)]


PARTIAL = "-partial"  # the stem's suffix of a validation on at most --max-images images a set


def _validate(candidates: list, sets: list, gate: Gate, latency_runs: int, folder: Path,
              run: RunDir | None, classes: list[str], max_images: int | None,
              export: dict[str, Any] | None = None, stem: str = "report") -> ValidationReport:
    from dgkit.export.validate import build_report, evaluate, print_table, write_report

    t = time.perf_counter()
    results = evaluate(candidates, sets, gate, latency_runs, len(classes))
    model = str(run.path) if run else candidates[0].file
    report = build_report(model, results, sets, gate, classes, export,
                          round(time.perf_counter() - t, 2), max_images)
    metrics, best_step = [], None
    if run is not None:
        summary = run.summary()
        best_step = summary.best_step if summary else None
        try:
            metrics = run.read_metrics()
        except ValueError:  # a line being written by a run still training: no curve
            metrics = []
    paths = write_report(report, folder, stem, metrics, best_step)
    print_table(report)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
    return report


def _stem(stem: str, max_images: int | None, folder: Path) -> str:
    """The report's stem: a partial validation (--max-images) writes beside the full report and
    says so, leaving it as it was."""
    if max_images is None:
        return stem
    console.print(f"partial validation (--max-images {max_images}): writing {stem}{PARTIAL}.*; "
                  f"{folder / stem}.json, if any, is left as it was")
    return stem + PARTIAL


def validate_run(run: RunDir, data: Path | None, max_images: int | None,
                 gate: Gate | float = Gate(), latency_runs: int = 50) -> ValidationReport:
    """`dgkit validate RUN`: torch FP32 and every artifact under RUN/export/. `gate`: the
    limits, or the held-out drop alone (the other limits at their defaults)."""
    if not isinstance(gate, Gate):
        gate = Gate(max_drop=gate)
    require_extra("train", "torch")
    run.require_trained()
    artifacts = formats.present(run.export)
    if not artifacts:
        raise DgkitError(f"{run.export} holds no exported model; run dgkit export {run.path} "
                         "first")
    config, _, sets = run_context(run, data, max_images)
    from dgkit.distill.students import load_student

    student = load_student(run)
    return _validate(_candidates(run, student, artifacts), sets, gate, latency_runs,
                     run.export, run, config.classes, max_images,
                     stem=_stem("report", max_images, run.export))


def validate_model(path: Path, data: Path | None, domains: list[str], max_images: int | None,
                   gate: Gate = Gate(), latency_runs: int = 50) -> ValidationReport:
    """`dgkit validate MODEL --data ROOT --domain D`: one exported model, no torch reference."""
    from dgkit.export.images import eval_sets, load_data
    from dgkit.export.validate import file_candidate

    if data is None or not domains:
        raise DgkitError(f"validating a model file ({path.name}) needs --data ROOT and "
                         "--domain D (the run directory knows both: dgkit validate RUN)")
    candidate = file_candidate(path)  # refuses a file that is not a dgkit model
    if candidate.run is None:
        reason = candidate.skipped.removeprefix("not runnable here: ")
        raise DgkitError(f"{path} cannot be validated on this machine: {reason}")
    meta = candidate.meta
    loaded = load_data(data, domains, meta.classes)
    sets = eval_sets(loaded, meta.classes, domains, [], 0, meta.preprocess, max_images)
    return _validate([candidate], sets, gate, latency_runs, path.parent, None,
                     list(meta.classes), max_images,
                     stem=_stem(f"{path.name}.report", max_images, path.parent))
