"""How INT8 weights are rounded (error feedback from the float model's input statistics, and the
CPU flavour's pair budget), kept apart from quantize.py so the numerics can be tested and
changed without touching calibration or the flavours' recipes."""

from __future__ import annotations

from typing import Any

import numpy as np

from dgkit.model_meta import INPUT_NAME
from dgkit.preprocess import to_model_input
from dgkit.progress import make_progress

QUANTIZED_SUFFIX = "_quantized"  # quantize_static's name for a quantized initializer
BATCH = 16  # images per pass of the float model while measuring input statistics
# onnxruntime's AVX2 u8 x s8 kernel (vpmaddubsw) adds the products of input channels 2i and
# 2i+1 in 16 bits, saturating past 32767; uint8 inputs reach 255, so two weights whose
# magnitudes sum to at most 128 can never saturate (255 * 128 = 32640).
PAIR_BUDGET = 128
INT32_RANGE = 2.0**32 - 2  # the levels a symmetric int32 bias spans
# Depthwise statistics come from at most PATCH_GRID output positions per side per image (every
# r-th row and column, the grid shifting between batches): neighbouring patches overlap, so a
# sparse grid loses little, and gathering every patch costs more than the rest of the export
# (BENCHMARKS.md compares grids).
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
        for batch_index, start in enumerate(range(0, len(pixels), BATCH)):
            batch = pixels[start:start + BATCH]
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
