"""INT8: onnxruntime static quantization (QDQ, per-channel int8 weights) after
`quant_pre_process`, calibrated once on source-domain images and written once per record of
`FLAVOURS` that the export asks for (one CPU flavour, `--cpu`, and TensorRT's), each the recipe
of one runtime:

- "int8" (`model.int8.onnx`): uint8 activations for onnxruntime on CPUs, because x86 CPUs
  without VNNI run symmetric int8 activations far slower. Their u8 x s8 kernel adds the
  products of input channels 2i and 2i+1 in 16 bits, so weights are either 7-bit
  (`reduce_range`, kept where they are not re-rounded) or, in 1x1 convolutions and the
  classifier, 8-bit on a pair budget (channels 2i and 2i+1 share `PAIR_BUDGET` levels), which
  cannot saturate and leaves most weights more than 7 bits. Depthwise convolutions keep all 8
  bits, because onnxruntime accumulates them in 32 bits. Activations that take both signs get a
  range symmetric about zero, because a held-out domain overshoots the source-calibrated range
  most on its shorter side; those that cannot go below zero (ReLU outputs) keep [0, max].
- "int8-vnni" (`model.int8-vnni.onnx`): the same for CPUs whose int8 products add up in 32
  bits (x86 with AVX512-VNNI, AVX-VNNI or AMX, ARM64 with the dot-product instructions; see
  `dgkit.cpu`), where nothing saturates: 8-bit weights everywhere, no pair budget. On an AVX2
  CPU without VNNI onnxruntime computes it wrong, so the Predictor refuses it there.
- "int8-trt" (`model.int8-trt.onnx`): symmetric int8 activations, full 8-bit weights, float
  biases and one Q/DQ pair per consumer, as TensorRT's explicit quantization wants (it
  accumulates in 32 bits, so nothing saturates).

In every flavour the 1x1, classifier and depthwise weights are re-rounded with error feedback
(`dgkit.export.rounding`), because on a held-out domain the weights cause most of the
disagreement with FP32; the float model's input statistics are measured once for all flavours.
The stem (every convolution upstream of both inputs of the first two-input Add; the first
convolution alone when there is none) stays FP32, because at the highest resolution the
rounding errors on flat backgrounds, such as a sketch's, are the same everywhere and global
pooling adds them up; except in "int8-vnni" where the stem is a single convolution (ResNet's
7x7): there INT8 cost little agreement, and its FP32 stem made onnxruntime's INT8 ResNet-18 no
faster than half of FP32. The calibration pass runs once: its ranges go to a cache file that
each flavour's `quantize_static` call reads. The measured effect of each choice is in
BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from dgkit.errors import DgkitError
from dgkit.export.rounding import PAIR_BUDGET, refine_weights
from dgkit.model_meta import INPUT_NAME, ModelMeta
from dgkit.preprocess import to_model_input
from dgkit.progress import make_progress

CALIB_METHODS = ("minmax", "entropy", "percentile")
# minmax: the fastest, and as accurate as percentile; entropy is less accurate (BENCHMARKS.md).
DEFAULT_CALIB_METHOD = "minmax"
CALIB_BATCH = 16  # images per calibration pass; histograms are merged between passes

# Calibrator options per method. onnxruntime's own defaults through quantize_static make
# entropy identical to minmax (128 histogram bins for 128 quantized bins leave one candidate
# threshold) and percentile symmetric (half of a uint8 range wasted on ReLU outputs).
CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": False},
}


@dataclass(frozen=True)
class Int8Flavour:
    """How `quantize` writes one INT8 model: the settings its runtime needs."""

    name: str  # ModelMeta.precision, and the format key "onnx-<name>" in formats.FORMATS
    activation_type: str  # onnxruntime QuantType member: "QUInt8" or "QInt8"
    reduce_range: bool  # onnxruntime's 7-bit weights (kept where they are not re-rounded)
    full_range_depthwise: bool = False  # depthwise weights keep 8 bits despite reduce_range
    symmetric_signed_ranges: bool = False  # ranges that span zero widened symmetric about it
    error_feedback_rounding: bool = True  # re-round 1x1, classifier, depthwise weights
    # The stem's convolutions (conv_roles): "fp32", "int8", or "int8-if-one-conv": INT8 where
    # the stem is a single convolution (ResNet's), FP32 where it spans several layers
    # (EfficientNet-Lite0's six), whose rounding on flat image areas adds up.
    stem: str = "fp32"
    pair_budget: int | None = None  # 1x1 and classifier weights: levels channels 2i, 2i+1 share
    extra_options: Mapping[str, Any] = field(  # quantize_static's extra_options
        default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def rounding_limit(self) -> int:
        """The largest level of a re-rounded 1x1 or classifier weight: on onnxruntime's own
        7-bit scales the levels must stay in its 7-bit range."""
        return 64 if self.reduce_range and self.pair_budget is None else 127


FLAVOURS: tuple[Int8Flavour, ...] = (
    # onnxruntime on CPUs: no AVX2 saturation, signed activations symmetric
    Int8Flavour("int8", "QUInt8", reduce_range=True, full_range_depthwise=True,
                symmetric_signed_ranges=True, pair_budget=PAIR_BUDGET),
    # onnxruntime on CPUs whose int8 products add up in 32 bits: 8-bit weights everywhere
    Int8Flavour("int8-vnni", "QUInt8", reduce_range=False, symmetric_signed_ranges=True,
                stem="int8-if-one-conv"),
    # TensorRT's explicit quantization: symmetric throughout, float biases
    Int8Flavour("int8-trt", "QInt8", reduce_range=False, extra_options=MappingProxyType({
        "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
        "DedicatedQDQPair": True})),
)


class _Batches:
    """A CalibrationDataReader over one slice of the calibration images."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.done = False

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.done:
            return None
        self.done = True
        return {INPUT_NAME: to_model_input(self.pixels)}

    def __iter__(self):
        return iter(self.get_next, None)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIB_METHODS:
        raise DgkitError(f"--calib-method '{name}' is not one of: {', '.join(CALIB_METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _quantizable_ops() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def conv_roles(model: Path) -> tuple[list[str], list[str]]:
    """([names of the stem's Convs], [weight names of the depthwise Convs]).

    The stem: the Convs upstream of both inputs of the first Add of two computed tensors (the
    first residual connection), or the first Conv when the graph has no such Add. ONNX graphs
    are stored in topological order; a depthwise Conv has one input channel per group."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dims = {i.name: list(i.dims) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def upstream(tensor: str) -> set[str]:
        seen: set[str] = set()
        todo = [tensor]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    residual = next((n for n in graph.node if n.op_type == "Add"
                     and len(n.input) == 2 and all(i in producer for i in n.input)), None)
    if residual is None:
        stem = {convs[0].name} if convs else set()
    else:
        stem = upstream(residual.input[0]) & upstream(residual.input[1])
    depthwise = []
    for node in convs:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = dims.get(node.input[1], [])
        if group > 1 and len(shape) == 4 and shape[0] == group and shape[1] == 1:
            depthwise.append(node.input[1])
    return [n.name for n in convs if n.name in stem], depthwise


def fp32_stem(flavour: Int8Flavour, stem: list[str]) -> list[str]:
    """The Convs of `stem` (conv_roles) that `flavour` leaves in FP32."""
    if flavour.stem == "int8" or (flavour.stem == "int8-if-one-conv" and len(stem) == 1):
        return []
    return stem


def calibrate(model: Path, pixels: np.ndarray, method: str, ranges: Path, work: Path) -> None:
    """Run `model` on the calibration images, batch by batch (histograms of every activation
    would not fit in memory at once), and save each activation's range to `ranges`."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model, _quantizable_ops(),
                                   augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=_method(method),
                                   extra_options=CALIB_OPTIONS[method])
    with make_progress() as progress:
        task = progress.add_task(f"Calibrating ({method})", total=len(pixels))
        for start in range(0, len(pixels), CALIB_BATCH):
            batch = pixels[start:start + CALIB_BATCH]
            calibrator.collect_data(_Batches(batch))
            progress.advance(task, len(batch))
    save_tensors_data(calibrator.compute_data(), ranges)


def symmetric_signed_ranges(ranges: Path, out: Path) -> None:
    """Copy the calibration cache `ranges` to `out` with every range that spans zero widened to
    be symmetric about it; ranges that start at zero stay as they are."""
    from onnxruntime.quantization.calibrate import (
        TensorData,
        TensorsData,
        load_tensors_data,
        save_tensors_data,
    )

    cache = load_tensors_data(ranges)
    widened = {}
    for name, data in cache.data.items():
        fields = {k: v for k, v in data.to_dict().items() if k != "CLS"}
        low, high = (float(np.ravel(v)[0]) for v in data.range_value)
        if low < 0:
            bound = max(-low, high)
            fields["lowest"] = np.array(-bound, dtype=data.lowest.dtype)
            fields["highest"] = np.array(bound, dtype=data.highest.dtype)
        widened[name] = TensorData(**fields)
    save_tensors_data(TensorsData(cache.calibration_method, widened), out)


def pre_process(fp32: Path, out: Path) -> None:
    """Write the graph `quantize_static` starts from: shapes inferred, BatchNorm folded into the
    convolutions (initializer names kept, so a quantized weight is its float name plus
    rounding.QUANTIZED_SUFFIX)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)


def quantize(fp32: Path, pixels: np.ndarray, method: str, metas: dict[str, ModelMeta],
             flavours: Sequence[Int8Flavour] = FLAVOURS) -> dict[str, Any]:
    """Calibrate `fp32` on `pixels` (N x S x S x 3 uint8) once and return {flavour name:
    ModelProto}, with its dgkit metadata, for each of `flavours` whose name is in `metas`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from dgkit.export.onnx_export import set_metadata

    _method(method)
    unknown = set(metas) - {flavour.name for flavour in flavours}
    if unknown:
        raise ValueError(f"no INT8 flavour named {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # onnxruntime logs a line per skipped tensor
    try:
        with tempfile.TemporaryDirectory(prefix="dgkit-int8-") as tmp:
            work = Path(tmp)
            pre = work / "pre.onnx"
            pre_process(fp32, pre)
            ranges = work / "ranges.json"
            calibrate(pre, pixels, method, ranges, work)
            stem, depthwise = conv_roles(pre)
            float_model = onnx.load(str(pre))
            correlations: dict[str, np.ndarray] = {}  # measured once for all flavours
            for flavour in flavours:
                if flavour.name not in metas:
                    continue
                target = work / f"{flavour.name}.onnx"
                extra = dict(flavour.extra_options)
                flavour_ranges = ranges
                if flavour.symmetric_signed_ranges:
                    flavour_ranges = work / f"{flavour.name}-ranges.json"
                    symmetric_signed_ranges(ranges, flavour_ranges)
                if flavour.full_range_depthwise:
                    extra["TensorQuantOverrides"] = {
                        w: [{"axis": 0, "reduce_range": False}] for w in depthwise}
                quantize_static(
                    str(pre), str(target), None, quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=flavour.reduce_range,
                    activation_type=getattr(QuantType, flavour.activation_type),
                    weight_type=QuantType.QInt8, calibrate_method=_method(method),
                    nodes_to_exclude=fp32_stem(flavour, stem),
                    extra_options=extra,
                    calibration_cache_path=str(flavour_ranges),
                )
                model = onnx.load(str(target))
                if flavour.error_feedback_rounding:
                    refine_weights(model, float_model, pixels, correlations,
                                   flavour.rounding_limit, flavour.pair_budget)
                set_metadata(model, metas[flavour.name])
                out[flavour.name] = model
    finally:
        quiet.setLevel(level)
    return out
