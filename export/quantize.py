"""INT8: onnxruntime static quantization (QDQ, per-channel int8 weights) after
`quant_pre_process`, calibrated once on source-domain images and written in the two flavours
the runtimes want:

- `model.int8.onnx` (precision "int8"): uint8 activations, for onnxruntime on CPUs. x86 CPUs
  without VNNI (AVX2 only) run symmetric int8 activations far slower than uint8 ones, and their
  u8 x s8 multiply (vpmaddubsw) saturates the 16-bit sum of the products of input channels 2i
  and 2i+1 when both are large. onnxruntime's guide advises 7-bit weights (`reduce_range`) for
  such CPUs; dgkit keeps them only where it does not re-round the weights (k x k convolutions
  over all channels, as in ResNet-18). The 1x1 convolutions and the classifier get 8-bit
  weights on a pair budget instead (`PAIR_BUDGET`): the weights of channels 2i and 2i+1 share
  128 levels, which cannot saturate and gives most weights more than 7 bits (EfficientNet-Lite0
  ERM on PACS, target sketch: top-1 agreement with FP32 97.9 % instead of 97.4 % with 7 bits;
  BENCHMARKS.md). Depthwise convolutions keep all 8 bits: onnxruntime's depthwise kernel
  accumulates in 32 bits, so they cannot saturate, and with 9 weights per channel they are
  where the 7th bit matters most (96.0 % instead of 87.6 % in an earlier recipe). All of these
  weights are rounded with error feedback (`round_with_error_feedback`, GPTQ): on the
  full-schedule PACS students the weights caused most of the disagreement with FP32 on the
  held-out domain (`bench/int8_error_split.py`), and this rounding took art_painting from 96.9
  to 98.1 % agreement (BENCHMARKS.md); the depthwise weights from the statistics of each
  channel's k x k input patches. Activations that take
  both signs (projection outputs, residual sums) get a range symmetric about zero (zero point
  at mid-range); those that cannot go below zero (ReLU outputs) keep [0, max] and all 256 levels.
  Calibration sees only the source domains, and a held-out domain pushes such tensors past
  that range, most on the side where it was shorter: EfficientNet-Lite0 ERM held out on sketch,
  top-1 agreement with FP32 97.3 % instead of 94.3 % (BENCHMARKS.md). TensorRT's flavour is
  symmetric throughout already.
- `model.int8-trt.onnx` (precision "int8-trt"): symmetric int8 activations (zero point 0),
  full 8-bit weights, float biases and one Q/DQ pair per consumer, as TensorRT's explicit
  quantization wants (TensorRT accumulates in 32 bits: no saturation). Its 1x1, classifier and
  depthwise weights are rounded with error feedback as well, from the same input statistics
  (collected once for both flavours).

In both the stem stays FP32: every convolution before the first residual connection (those
upstream of both inputs of the graph's first two-input Add; the first convolution alone when
there is none). These layers run at the highest resolution, and on images with large flat
areas, such as sketches, their rounding errors are the same over the whole background, so
global pooling adds them up instead of averaging them out. For EfficientNet-Lite0 that is the
first six convolutions (stem, block 0, block 1.0), for ResNet-18 the first one; EfficientNet-
Lite0 ERM on PACS, every held-out domain, CPU flavour: top-1 agreement with FP32 96.7 % on
average instead of 95.4 % with the first convolution alone, 98.3 % on source validation
instead of 96.2 % (BENCHMARKS.md), at about the same latency (FP32 at high resolution saves
the Q/DQ pairs there).

Both flavours come from one set of activation ranges: the calibration pass runs once, its
ranges go to a cache file, and each `quantize_static` call reads them from there.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.errors import DgkitError
from dgkit.model_meta import INPUT_NAME, ModelMeta
from dgkit.preprocess import to_model_input
from dgkit.progress import make_progress

CALIB_METHODS = ("minmax", "entropy", "percentile")
# minmax: the fastest, and as accurate as percentile (BENCHMARKS.md). Full-schedule 224 px
# EfficientNet-Lite0 ERM students on PACS, CPU flavour: percentile agreed 0.28 points more on
# held-out sketch and no more on art_painting, and calibrated in 96 s against 20 s (busy machine);
# entropy lost 1.9 points of sketch accuracy.
DEFAULT_CALIB_METHOD = "minmax"
CALIB_BATCH = 16  # images per calibration pass; histograms are merged between passes
QUANTIZED_SUFFIX = "_quantized"  # quantize_static's name for a quantized initializer
# onnxruntime's AVX2 u8 x s8 kernel (vpmaddubsw) adds the products of input channels 2i and
# 2i+1 in 16 bits, saturating past 32767; uint8 inputs reach 255, so two weights whose
# magnitudes sum to at most 128 can never saturate (255 * 128 = 32640). The CPU flavour's
# 1x1 and classifier weights keep to that budget instead of 7 bits (64 levels).
PAIR_BUDGET = 128
INT32_RANGE = 2.0**32 - 2  # the levels a symmetric int32 bias spans

# Calibrator options per method. onnxruntime's own defaults through quantize_static make
# entropy identical to minmax (128 histogram bins for 128 quantized bins leave one candidate
# threshold) and percentile symmetric (half of a uint8 range wasted on ReLU outputs).
CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": False},
}

FLAVOURS: dict[str, dict[str, Any]] = {
    "int8": {"activation_type": "QUInt8", "reduce_range": True, "extra_options": {},
             "full_range_depthwise": True, "symmetric_signed_ranges": True,
             "error_feedback_rounding": True, "pair_budget": True},
    "int8-trt": {"activation_type": "QInt8", "reduce_range": False,
                 "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QuantizeBias": False, "DedicatedQDQPair": True},
                 "error_feedback_rounding": True},
}


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
    QUANTIZED_SUFFIX)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)


# Depthwise statistics come from at most PATCH_GRID output positions per side per image (every
# r-th row and column, the grid shifting between batches): neighbouring patches overlap, so a
# sparse grid loses little, and gathering every patch cost more than the rest of the export.
# PACS sketch student, 512 images, 2 cores: the full grid took 99 s and agreed with FP32 on
# 97.53 % of the held-out sketches (CPU flavour) and 98.35 % (TensorRT flavour); 7x7, 20 s,
# 97.61 and 98.14 %; 4x4, 16 s, 97.38 and 98.19 % (BENCHMARKS.md).
PATCH_GRID = 4


def _refined_layers(pre: Any, quantized: Any) -> list[tuple[Any, dict[str, Any], bool]]:
    """(node, attributes, depthwise) for the Convs and Gemms of `pre` whose weights `quantized`
    holds as int8 and whose rounding error feedback refines: 1x1 Convs, Gemms (both run as
    matrix products) and depthwise Convs."""
    import onnx

    names = {i.name for i in quantized.graph.initializer}
    dims = {i.name: list(i.dims) for i in pre.graph.initializer}
    layers = []
    for node in pre.graph.node:
        if len(node.input) < 2 or node.input[1] + QUANTIZED_SUFFIX not in names:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shape = dims.get(node.input[1], [])
        pointwise = (node.op_type == "Conv" and attrs.get("group", 1) == 1
                     and list(attrs.get("kernel_shape", [])) == [1, 1]
                     and not any(attrs.get("pads", [0])))
        depthwise = (node.op_type == "Conv" and attrs.get("group", 1) > 1 and len(shape) == 4
                     and shape[0] == attrs["group"] and shape[1] == 1)
        gemm = node.op_type == "Gemm" and attrs.get("transB", 0) == 1
        if pointwise or gemm or depthwise:
            layers.append((node, attrs, depthwise))
    return layers


def patch_gram(x: np.ndarray, attrs: dict[str, Any], shift: int) -> tuple[np.ndarray, int]:
    """(sum over images and sampled positions of p p^T per channel, number of positions), where
    p is the k x k patch a depthwise Conv with `attrs` multiplies at one output position of the
    NCHW input `x`; positions on a grid of at most PATCH_GRID per side, offset by `shift`."""
    import torch
    import torch.nn.functional as F

    kh, kw = attrs["kernel_shape"]
    stride = attrs.get("strides", [1, 1])[0]
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    n, c, h, w = padded.shape
    step = max(1, -(-((h - kh) // stride + 1) // PATCH_GRID))
    offset = (shift % step) * stride
    rows = (h - kh - offset) // (stride * step) + 1
    cols = (w - kw - offset) // (stride * step) + 1
    sn, sc, sh, sw = padded.stride()
    patches = padded.as_strided((c, kh, kw, n, rows, cols),
                                (sc, sh, sw, sn, sh * stride * step, sw * stride * step),
                                offset * (sh + sw)).reshape(c, kh * kw, -1)
    return torch.bmm(patches, patches.transpose(1, 2)).double().numpy(), patches.shape[2]


def input_correlations(pre: Any, layers: list[tuple[Any, dict[str, Any], bool]],
                       pixels: np.ndarray) -> dict[str, np.ndarray]:
    """For each layer, the mean over calibration images and positions of x x^T (the float
    model's activations): x is the vector of a matrix product's input channels at one position,
    or for a depthwise Conv each channel's k x k input patch (channels x k*k x k*k)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(pre)
    wanted = sorted({node.input[0] for node, _, _ in layers})
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None) for name in wanted)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    with make_progress() as progress:
        task = progress.add_task("Rounding weights", total=len(pixels))
        for batch_index, start in enumerate(range(0, len(pixels), CALIB_BATCH)):
            batch = pixels[start:start + CALIB_BATCH]
            acts = dict(zip(wanted, session.run(wanted, {INPUT_NAME: to_model_input(batch)}),
                            strict=True))
            for node, attrs, depthwise in layers:
                x = acts[node.input[0]]
                if depthwise:
                    gram, count = patch_gram(x, attrs, batch_index)
                else:
                    if x.ndim == 4:  # NCHW -> one row per position
                        strides = attrs.get("strides", [1, 1])
                        x = x[:, :, ::strides[0], ::strides[1]].transpose(0, 2, 3, 1)
                    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
                    # float32 products (summed in float64 between batches): 3x faster
                    gram, count = (x.T @ x).astype(np.float64), len(x)
                sums[node.name] = sums.get(node.name, 0) + gram
                rows[node.name] = rows.get(node.name, 0) + count
            progress.advance(task, len(batch))
    return {name: total / rows[name] for name, total in sums.items()}


def round_with_error_feedback(weight: np.ndarray, scale: np.ndarray, limit: int,
                              correlation: np.ndarray, damping: float = 0.01,
                              pair_budget: int | None = None) -> np.ndarray:
    """Integer levels for `weight` (outputs x inputs) on the per-output `scale`, in
    [-limit, limit], chosen input by input so that each rounding error is compensated on the
    inputs not yet rounded, in proportion to how those inputs correlate (GPTQ, Frantar et al.
    2022, with the float model's input statistics). Minimises the layer's output error on
    the calibration images instead of each weight's own error. With `pair_budget`, the levels
    of inputs 2i and 2i+1 also sum in magnitude to at most it (the second of a pair gets what
    the first left). Leading dimensions are independent layers (a depthwise Conv's channels):
    weight (..., outputs, inputs), scale (..., outputs), correlation (..., inputs, inputs)."""
    w = weight.astype(np.float64).copy()
    h = correlation.astype(np.float64).copy()
    diagonal = np.einsum("...ii->...i", h)  # a writable view
    dead = diagonal == 0  # an input that is always zero: its weight does not matter
    diagonal[dead] = 1
    w[np.broadcast_to(dead[..., None, :], w.shape)] = 0
    diagonal += damping * diagonal.mean(-1, keepdims=True)
    inverse = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), -1, -2)  # upper triangular
    levels = np.zeros(w.shape, dtype=np.int64)
    scale = scale.astype(np.float64)
    for i in range(w.shape[-1]):
        bound = limit
        if pair_budget and i % 2:
            bound = np.minimum(limit, pair_budget - np.abs(levels[..., i - 1]))
        levels[..., i] = np.clip(np.round(w[..., i] / scale), -bound, bound)
        error = (w[..., i] - levels[..., i] * scale) / inverse[..., i, i, None]
        w[..., i + 1:] -= error[..., None] * inverse[..., None, i, i + 1:]
    return levels


def pair_budget_scale(weight: np.ndarray, budget: int, bias: np.ndarray | None,
                      input_scale: float) -> np.ndarray:
    """Per-output scales for `weight` (outputs x inputs) on which inputs 2i and 2i+1 fit in
    `budget` levels together and no weight needs more than 127; never so small that the int32
    bias on input_scale * scale would overflow (as onnxruntime ensures for its own scales)."""
    magnitude = np.abs(weight.astype(np.float64))
    if magnitude.shape[1] % 2:
        magnitude = np.pad(magnitude, ((0, 0), (0, 1)))
    scale = np.maximum((magnitude[:, 0::2] + magnitude[:, 1::2]).max(1) / budget,
                       magnitude.max(1) / 127)
    if bias is not None:
        scale = np.maximum(scale, 1.0001 * 2 * np.abs(bias) / INT32_RANGE / input_scale)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def refine_weights(quantized: Any, float_model: Any, pixels: np.ndarray,
                   correlations: dict[str, np.ndarray], limit: int = 127,
                   pair_budget: int | None = None) -> None:
    """Re-round, in place, the int8 weights of `quantized`'s 1x1 Convs and Gemms (on `limit`
    levels) and depthwise Convs (127 levels) with `round_with_error_feedback`. Depthwise Convs
    keep onnxruntime's scales; so do the others without `pair_budget`, while with it they get
    `pair_budget_scale`'s and their int32 biases are quantized again on the new scales.
    `correlations` caches the float model's input statistics between flavours: layers it
    lacks are measured on `pixels`."""
    from onnx import numpy_helper

    layers = _refined_layers(float_model, quantized)
    missing = [layer for layer in layers if layer[0].name not in correlations]
    if missing:
        correlations.update(input_correlations(float_model, missing, pixels))
    init = {i.name: i for i in quantized.graph.initializer}
    floats = {i.name: i for i in float_model.graph.initializer}
    producer = {out: node for node in quantized.graph.node for out in node.output}
    quantized_nodes = {node.name: node for node in quantized.graph.node}

    def put(name: str, array: np.ndarray) -> None:
        init[name].CopyFrom(numpy_helper.from_array(array, name))

    for node, _, depthwise in layers:
        name = node.input[1]
        weight = numpy_helper.to_array(floats[name])
        scale = numpy_helper.to_array(init[name + "_scale"])
        if depthwise:  # each channel a layer of one output
            levels = round_with_error_feedback(weight.reshape(len(weight), 1, -1),
                                               scale[:, None], 127, correlations[node.name])
        else:
            matrix = weight.reshape(len(weight), -1)
            if pair_budget:
                bias_name = node.input[2] if len(node.input) > 2 else ""
                bias = numpy_helper.to_array(floats[bias_name]) if bias_name in floats else None
                input_dq = producer[quantized_nodes[node.name].input[0]]
                input_scale = float(numpy_helper.to_array(init[input_dq.input[1]]))
                scale = pair_budget_scale(matrix, pair_budget, bias, input_scale)
                put(name + "_scale", scale)
                if bias is not None and bias_name + QUANTIZED_SUFFIX in init:
                    bias_scale = scale * np.float32(input_scale)
                    put(bias_name + QUANTIZED_SUFFIX + "_scale", bias_scale)
                    put(bias_name + QUANTIZED_SUFFIX,
                        np.round(bias / bias_scale.astype(np.float64)).astype(np.int32))
            levels = round_with_error_feedback(matrix, scale, limit, correlations[node.name],
                                               pair_budget=pair_budget)
        put(name + QUANTIZED_SUFFIX, levels.reshape(weight.shape).astype(np.int8))


def quantize(fp32: Path, pixels: np.ndarray, method: str,
             metas: dict[str, ModelMeta]) -> dict[str, Any]:
    """Calibrate `fp32` on `pixels` (N x S x S x 3 uint8) once and return {flavour: ModelProto}
    for each flavour in `metas`, with its dgkit metadata."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from dgkit.export.onnx_export import set_metadata

    _method(method)
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
            keep_fp32, depthwise = conv_roles(pre)
            float_model = onnx.load(str(pre))
            correlations: dict[str, np.ndarray] = {}  # measured once for both flavours
            for flavour, meta in metas.items():
                spec = FLAVOURS[flavour]
                target = work / f"{flavour}.onnx"
                extra = dict(spec["extra_options"])
                flavour_ranges = ranges
                if spec.get("symmetric_signed_ranges"):
                    flavour_ranges = work / f"{flavour}-ranges.json"
                    symmetric_signed_ranges(ranges, flavour_ranges)
                if spec.get("full_range_depthwise"):
                    extra["TensorQuantOverrides"] = {
                        w: [{"axis": 0, "reduce_range": False}] for w in depthwise}
                quantize_static(
                    str(pre), str(target), None, quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=spec["reduce_range"],
                    activation_type=getattr(QuantType, spec["activation_type"]),
                    weight_type=QuantType.QInt8, calibrate_method=_method(method),
                    nodes_to_exclude=keep_fp32, extra_options=extra,
                    calibration_cache_path=str(flavour_ranges),
                )
                model = onnx.load(str(target))
                if spec.get("error_feedback_rounding"):
                    budget = PAIR_BUDGET if spec.get("pair_budget") else None
                    # on onnxruntime's own 7-bit scales the levels must stay in its 7-bit range
                    limit = 64 if spec["reduce_range"] and budget is None else 127
                    refine_weights(model, float_model, pixels, correlations, limit, budget)
                set_metadata(model, meta)
                out[flavour] = model
    finally:
        quiet.setLevel(level)
    return out
