"""`dgkit export` and `dgkit validate`.

Imported at every CLI start: only typer and the standard library at the top; the work (torch,
onnx, onnxruntime) is imported inside the command bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dgkit.errors import DgkitError
from dgkit.export.formats import help_table

if TYPE_CHECKING:
    from dgkit.records import ValidationReport


@dataclass(frozen=True)
class Gate:
    """The limits every artifact is held to against torch FP32 on the same images (applied by
    dgkit.export.validate). Here rather than there: the CLI imports this module at every start,
    and validate.py needs numpy."""

    max_drop: float = 1.0  # points of held-out accuracy
    max_source_drop: float = 1.0  # points of source-validation accuracy
    min_agreement: float = 95.0  # % of held-out images whose top-1 is torch FP32's

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0 <= value <= 100:  # also refuses NaN
                raise DgkitError(f"--{f.name.replace('_', '-')} must be between 0 and 100, "
                                 f"got {value:g}")


GATE_HELP = """\b
The gate, the same for every artifact (each compared with torch FP32 on the same images;
a check fails only when its whole 95 % interval is beyond the limit):
  --max-drop          held-out accuracy drop, points
  --max-source-drop   source-validation accuracy drop, points
  --min-agreement     top-1 agreement with torch FP32 on the held-out images, %
A run without a held-out domain is checked on its source-validation images alone.
Exits with 1 when an artifact fails a check."""

EXPORT_HELP = f"""Turn a run's student into deployable artifacts under RUN/export/ and validate them
on the domain the student never saw.

\b
Artifacts (RUN/export/):
{help_table()}

\b
Examples:
  dgkit export                                # runs/latest, FP32 only
  dgkit export runs/pacs-sketch --fp16 --int8
  dgkit export runs/latest --int8 --cpu avx2   # for an edge box with AVX2 and no VNNI
  dgkit export runs/latest --int8 --calib-method percentile --calib-images 1024
  dgkit export runs/latest --fp16 --int8 --trt --max-batch 64   # on a GPU box

""" + GATE_HELP

VALIDATE_HELP = """Validate exported models: accuracy on each target domain and the source
validation split, agreement with torch FP32, size, latency and throughput on this machine.

\b
Examples:
  dgkit validate runs/latest
  dgkit validate runs/latest/export/model.int8.onnx --data ./PACS --domain sketch
  dgkit validate runs/latest --max-images 100   # a sample: writes report-partial.*

""" + GATE_HELP

MaxImages = Annotated[int | None, typer.Option(
    help="Cap each validation set (target domain, source val) at N images (default: all): a "
         "partial validation, which dgkit validate writes to report-partial.*, leaving "
         "report.json as it was (dgkit export marks its report.json partial).")]
MaxDrop = Annotated[float, typer.Option(
    help="Gate: held-out accuracy at most this many points below torch FP32.")]
MaxSourceDrop = Annotated[float, typer.Option(
    help="Gate: source-validation accuracy at most this many points below torch FP32.")]
MinAgreement = Annotated[float, typer.Option(
    help="Gate: top-1 the same as torch FP32's on at least this % of the held-out images.")]
LatencyRuns = Annotated[int, typer.Option(
    help="Batch-1 latency: median of this many runs after warm-up (0: skip timing).")]
Data = Annotated[Path | None, typer.Option(
    help="Data root (default: the run's); needed with a MODEL.")]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("export", help=EXPORT_HELP)(export)
    app.command("validate", help=VALIDATE_HELP)(validate)


def _finish(report: ValidationReport | None) -> None:
    if report is not None and not report.passed:
        bad = [f"{r.name}: {'; '.join(r.failures)}" for r in report.artifacts if r.failures]
        typer.secho("validation failed: " + " | ".join(bad), fg="red", err=True)
        raise typer.Exit(1)


def _write_errors(exc: OSError) -> DgkitError:
    where = exc.filename or "the export folder"
    return DgkitError(f"cannot write {where}: {exc.strerror or exc}; the artifacts written "
                      "before are left as they were")


def export(
    run: Annotated[Path | None, typer.Argument(
        help="Run directory (default: runs/latest).", show_default=False)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx.")] = False,
    int8: Annotated[bool, typer.Option(
        "--int8", help="Also write INT8 models: one for CPUs (see --cpu) and "
                       "model.int8-trt.onnx for TensorRT.")] = False,
    cpu: Annotated[str, typer.Option(
        "--cpu", metavar="auto|avx2|vnni",
        help="The CPU the INT8 model will run on: avx2 (x86 with AVX2 alone: model.int8.onnx) "
             "or vnni (x86 with AVX512-VNNI, AVX-VNNI or AMX, ARM64 with dot product: "
             "model.int8-vnni.onnx, faster there, wrong on AVX2 alone); auto: this machine's.")
    ] = "auto",
    trt: Annotated[bool, typer.Option(
        "--trt", help="Also build TensorRT engines (needs the trt extra and a CUDA GPU).")
    ] = False,
    calib_method: Annotated[str, typer.Option(
        help="INT8 calibration: minmax, entropy or percentile (minmax: as accurate, "
             "fastest; see dgkit.export.quantize).")] = "minmax",
    calib_images: Annotated[int, typer.Option(
        help="Calibration images from the source domains' training split.")] = 512,
    max_batch: Annotated[int, typer.Option(
        help="Largest batch of the TensorRT optimisation profile and of the Triton "
             "repository.")] = 32,
    triton: Annotated[str | None, typer.Option(
        "--triton", metavar="fp32|fp16|int8",
        help="Also write that artifact as a Triton Inference Server model repository in "
             "RUN/export/triton/ (config.pbtxt with the onnxruntime backend and dynamic "
             "batching, labels.txt, 1/model.onnx); fp16 and int8 imply --fp16 and --int8.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data root (default: the run's).")] = None,
    validate: Annotated[bool, typer.Option(
        help="Validate the artifacts after writing them.")] = True,
    max_images: MaxImages = None,
    max_drop: MaxDrop = Gate.max_drop,
    max_source_drop: MaxSourceDrop = Gate.max_source_drop,
    min_agreement: MinAgreement = Gate.min_agreement,
    latency_runs: LatencyRuns = 50,
) -> None:
    from dgkit.export.exporter import ExportOptions, export_run
    from dgkit.rundir import resolve_run

    opts = ExportOptions(fp16=fp16, int8=int8, trt=trt, calib_method=calib_method,
                         calib_images=calib_images, max_batch=max_batch, data=data,
                         validate=validate, max_images=max_images, max_drop=max_drop,
                         max_source_drop=max_source_drop, min_agreement=min_agreement,
                         latency_runs=latency_runs, triton=triton, cpu=cpu)
    try:
        summary = export_run(resolve_run(run), opts)
    except OSError as exc:
        raise _write_errors(exc) from exc
    _finish(summary.get("report"))


def validate(
    target: Annotated[Path | None, typer.Argument(
        help="Run directory (default: runs/latest), or a dgkit .onnx / .plan file.",
        show_default=False)] = None,
    data: Data = None,
    domain: Annotated[list[str] | None, typer.Option(
        help="Domain to validate a MODEL on (repeatable).")] = None,
    max_images: MaxImages = None,
    max_drop: MaxDrop = Gate.max_drop,
    max_source_drop: MaxSourceDrop = Gate.max_source_drop,
    min_agreement: MinAgreement = Gate.min_agreement,
    latency_runs: LatencyRuns = 50,
) -> None:
    from dgkit.export.exporter import validate_model, validate_run
    from dgkit.rundir import resolve_run

    gate = Gate(max_drop, max_source_drop, min_agreement)
    try:
        if target is not None and target.is_file():
            report = validate_model(target, data, list(domain or []), max_images, gate,
                                    latency_runs)
        else:
            if domain:
                raise DgkitError("--domain is for a MODEL file; a run validates on its own "
                                 "target domains")
            report = validate_run(resolve_run(target), data, max_images, gate, latency_runs)
    except OSError as exc:
        raise _write_errors(exc) from exc
    _finish(report)
