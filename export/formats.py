"""The export formats, in one table (as Ultralytics' exporter): file, precision, what each needs.

Torch-free, so `dgkit validate` and the CLI can read it without the train extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OPSET = 17


@dataclass(frozen=True)
class Format:
    key: str  # report name
    filename: str  # under RUN/export/
    precision: str  # ModelMeta.precision
    option: str  # the CLI option that asks for it ("" = always written)
    needs: tuple[str, ...]  # Python modules, checked before any work
    extra: str  # the dgkit extra that provides them
    runtime: str  # what runs it in validate
    writer: str  # the exporter's function (WRITERS) that writes it; one call per group
    description: str
    source: str = ""  # the format it is built from (a TensorRT engine's ONNX model)
    cpu: str = ""  # an INT8 model for onnxruntime on CPUs: the --cpu flavour it is made for


FORMATS: tuple[Format, ...] = (
    Format("onnx-fp32", "model.onnx", "fp32", "", ("torch", "onnx"), "train", "onnxruntime",
           "onnx", f"FP32, opset {OPSET}, dynamic batch"),
    Format("onnx-fp16", "model.fp16.onnx", "fp16", "--fp16", ("onnx", "onnxconverter_common"),
           "train", "onnxruntime", "fp16", "FP16 compute, FP32 input and output"),
    Format("onnx-int8", "model.int8.onnx", "int8", "--int8", ("onnx", "onnxruntime"), "train",
           "onnxruntime", "int8", "QDQ for x86 CPUs with AVX2 alone (--cpu avx2; onnxruntime)",
           cpu="avx2"),
    Format("onnx-int8-vnni", "model.int8-vnni.onnx", "int8-vnni", "--int8",
           ("onnx", "onnxruntime"), "train", "onnxruntime", "int8",
           "QDQ for CPUs with VNNI, AMX or ARM64 dot product (--cpu vnni)", cpu="vnni"),
    Format("onnx-int8-trt", "model.int8-trt.onnx", "int8-trt", "--int8", ("onnx", "onnxruntime"),
           "train", "onnxruntime", "int8", "QDQ, symmetric int8 activations, for TensorRT"),
    Format("trt-fp16", "model.fp16.plan", "fp16", "--trt", ("tensorrt",), "trt", "tensorrt",
           "tensorrt", "TensorRT engine from model.fp16.onnx",
           source="onnx-fp16"),
    Format("trt-int8", "model.int8.plan", "int8", "--trt", ("tensorrt",), "trt", "tensorrt",
           "tensorrt", "TensorRT engine from model.int8-trt.onnx",
           source="onnx-int8-trt"),
)

BY_KEY = {f.key: f for f in FORMATS}
TORCH_KEY = "torch-fp32"  # the reference every artifact is compared with
CALIB_CACHE = "calibration.npz"
TIMING_CACHE = "tensorrt.timing-cache"
REPORT_FILES = ("report.json", "report.md", "report.png")


def cpu_int8_key(cpu: str) -> str:
    """The CPU INT8 format of a `--cpu` flavour (dgkit.cpu.CPU_FLAVOURS)."""
    return next(f.key for f in FORMATS if f.cpu == cpu)


def cpu_flavour_of(precision: str) -> str:
    """The `--cpu` flavour an ONNX model of `precision` is made for; "" when not a CPU INT8."""
    return next((f.cpu for f in FORMATS if f.cpu and f.precision == precision), "")


def wanted(fp16: bool, int8: bool, trt: bool, cpu: str = "avx2") -> list[Format]:
    """The formats an export writes: FP32 always; with `int8`, the CPU flavour for `cpu` and
    TensorRT's; `--trt` builds an engine from each reduced precision asked for, and from FP16
    when none was."""
    if trt and not (fp16 or int8):
        fp16 = True
    keys = ["onnx-fp32"]
    keys += ["onnx-fp16"] if fp16 else []
    keys += [cpu_int8_key(cpu), "onnx-int8-trt"] if int8 else []
    keys += ["trt-fp16"] if trt and fp16 else []
    keys += ["trt-int8"] if trt and int8 else []
    return [BY_KEY[k] for k in keys]


# `dgkit export --triton P`: the ONNX artifact a Triton model repository serves, by precision
# ("int8": the CPU flavour the export wrote, see cpu_int8_key).
TRITON_ARTIFACTS = {"fp32": "onnx-fp32", "fp16": "onnx-fp16", "int8": "onnx-int8"}


def present(export_dir: Path) -> list[tuple[Format, Path]]:
    """The artifacts an export folder holds, in table order."""
    return [(f, export_dir / f.filename) for f in FORMATS if (export_dir / f.filename).is_file()]


def format_of(path: Path) -> Format | None:
    return next((f for f in FORMATS if f.filename == path.name), None)


def help_table() -> str:
    """The artifacts as `dgkit export --help` lists them, from the table."""
    report = "report.json/.md/.png"
    width = max(len(name) for name in [report, *(f.filename for f in FORMATS)]) + 2
    lines = [f"  {f.filename:<{width}}{f.option + ': ' if f.option else ''}{f.description}"
             for f in FORMATS]
    return "\n".join([*lines, f"  {report:<{width}}the validation report"])
