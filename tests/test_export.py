"""`dgkit export` / `dgkit validate` end to end on a tiny run: the artifacts against the torch
student on real images, the files the CLI must write, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import TINY, bench_script, dgkit, error_line
from onnx import TensorProto, numpy_helper

from dgkit.data import decode_samples, discover, split_sources
from dgkit.distill.students import load_student
from dgkit.export import tensorrt
from dgkit.export.images import calibration_pixels, calibration_rows
from dgkit.export.onnx_export import model_meta, torch_logits
from dgkit.export.quantize import FLAVOURS, conv_roles, quantize, symmetric_signed_ranges
from dgkit.export.rounding import (
    PAIR_BUDGET,
    pair_budget_scale,
    patch_gram,
    round_with_error_feedback,
)
from dgkit.model_meta import ModelMeta
from dgkit.preprocess import PreprocessSpec, to_model_input
from dgkit.rundir import RunDir

FAST = ["--latency-runs", "2"]
LOOSE = ["--max-drop", "100", "--max-source-drop", "100", "--min-agreement", "0"]
ARTIFACTS = ["model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8-trt.onnx"]


@pytest.fixture(scope="module")
def tiny_run(tiny_domains, tmp_path_factory) -> Path:
    """A trained tiny run (EfficientNet-Lite0 layout, 32 px), read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("export") / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "4", "--out", out,
          *TINY, check=True)
    return out


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, Any]:
    """A copy of the tiny run exported with --fp16 --int8 --triton int8 under limits nothing
    can fail (the tiny student's logits are near ties), and the export's result."""
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("exported") / "run"))
    proc = dgkit("export", run, "--fp16", "--int8", "--triton", "int8", *LOOSE, *FAST)
    assert proc.returncode == 0, proc.stderr
    return run, proc


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _images(run: Path, domain: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prepared images (and labels) of the run's data: one domain, or every image."""
    config = json.loads((run / "run.json").read_text())
    data = discover(config["data_root"])
    rows = [i for i, s in enumerate(data.samples)
            if domain is None or data.domains[s.domain] == domain]
    decoded = decode_samples(data, rows, PreprocessSpec(**config["preprocess"]), None)
    return decoded.pixels, np.array([data.samples[i].label for i in decoded.indices])


def _validation_images(run: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The images validate uses (the target domain, then the sources' validation split), their
    labels in the run's class order, and how many are held out."""
    config = json.loads((run / "run.json").read_text())
    data = discover(config["data_root"])
    sources = [data.domains.index(d) for d in config["source_domains"]]
    _, val = split_sources(data, sources, config["train"]["seed"])
    rows = [i for i, s in enumerate(data.samples) if data.domains[s.domain] == "sketch"]
    spec = PreprocessSpec(**config["preprocess"])
    decoded = decode_samples(data, [*rows, *val], spec, None)
    labels = [config["classes"].index(data.classes[data.samples[i].label])
              for i in decoded.indices]
    return decoded.pixels, np.array(labels), len(rows)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    return _session(path).run(["logits"], {"image": to_model_input(pixels)})[0]


# ------------------------------------------------------------------ the artifacts


def _assert_onnx_matches_torch(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """64 images of the run's data: max |logit diff| <= 1e-4 and identical top-1; returns
    (pixels, torch logits)."""
    pixels, _ = _images(run)
    pixels = pixels[np.linspace(0, len(pixels) - 1, 64).astype(int)]
    reference = torch_logits(load_student(RunDir(run)), pixels)
    logits = _logits(run / "export" / "model.onnx", pixels)
    assert np.abs(logits - reference).max() <= 1e-4
    assert (logits.argmax(1) == reference.argmax(1)).all()
    return pixels, reference


def test_export_writes_every_artifact_and_report(exported):
    run, proc = exported
    names = sorted(p.name for p in (run / "export").iterdir())
    assert names == sorted([*ARTIFACTS, "calibration.npz", "report.json", "report.md",
                            "report.png", "report-confusion.png", "training.png", "triton"])
    assert not [n for n in names if n.endswith(".tmp")]
    report = json.loads((run / "export" / "report.json").read_text())
    keys = [a["key"] for a in report["artifacts"]]
    assert keys == ["torch-fp32", "onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int8-trt"]
    assert report["targets"] == ["sketch"] and report["sets"] == ["sketch", "source_val"]
    assert report["images"] == {"sketch": 24, "source_val": 8}  # 20 % of 2 x 3 x 8 images
    for a in report["artifacts"]:
        assert set(a["accuracy"]) == {"sketch", "source_val"}
        assert a["latency_ms"] > 0 and a["throughput"] > 0 and a["size_mb"] > 0
    assert report["artifacts"][1]["agreement"] == 100.0  # ONNX FP32 == torch on every image
    runtimes = [a["runtime"] for a in report["artifacts"]]
    assert runtimes == ["torch-cpu", "ort-cpu", "ort-cpu", "ort-cpu", "ort-cpu-qdq-reference"]
    assert report["export"]["calibration"]["images"] == 40  # the sources' training split
    assert "Validation of" in proc.stdout and "model.int8.onnx" in proc.stdout
    for figure in ("report.png", "report-confusion.png", "training.png"):
        assert (run / "export" / figure).read_bytes()[:4] == b"\x89PNG"
        assert f"]({figure})" in (run / "export" / "report.md").read_text()
    assert "| model.fp16.onnx | fp16 |" in (run / "export" / "report.md").read_text()


def test_triton_repository_serves_the_int8_artifact(exported):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    run, proc = exported
    folder = run / "export" / "triton" / "run"  # named after the run folder
    assert f"wrote {folder}" in " ".join(proc.stderr.split())
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == (run / "export" / "model.int8.onnx").read_bytes()
    config = text_format.Parse((folder / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.name == "run" and config.max_batch_size == 32  # --max-batch's default
    classes = json.loads((run / "run.json").read_text())["classes"]
    assert (folder / config.output[0].label_filename).read_text().splitlines() == classes
    bad = dgkit("export", run, "--triton", "int4")
    assert "--triton 'int4' is not one of: fp32, fp16, int8" in error_line(bad)


def test_onnx_contract_and_metadata(exported):
    run, _ = exported
    config = RunDir(run).require_trained()
    model = onnx.load(str(run / "export" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    props = {p.key: p.value for p in model.metadata_props}
    raw = json.loads((run / "run.json").read_text())  # read here, not through dgkit's records
    meta = ModelMeta.from_props(props)
    assert (meta.student, meta.method, meta.precision) == (
        raw["train"]["student"], raw["train"]["method"], "fp32")
    assert meta.target_domains == ("sketch",) and meta.prompt_names == raw["prompt_names"]
    assert meta.run_id.startswith(f"{run.name}-") and config.classes == meta.classes
    assert meta.classes == ["circle", "square", "triangle"] and meta.preprocess.input_size == 32
    assert meta.run_id.startswith("run-") and meta.student == "efficientnet_lite0"
    for name, precision in zip(ARTIFACTS[1:], ["fp16", "int8", "int8-trt"], strict=True):
        other = {p.key: p.value for p in onnx.load(str(run / "export" / name)).metadata_props}
        assert other == {**props, "precision": precision}


def test_onnx_matches_torch_on_real_images(exported):
    """64 real images of the run's data: max |logit diff| <= 1e-4, identical top-1, any batch."""
    run, _ = exported
    pixels, reference = _assert_onnx_matches_torch(run)
    one = _logits(run / "export" / "model.onnx", pixels[:1])  # dynamic batch: 1 and 64
    assert np.abs(one - reference[:1]).max() <= 1e-4


def test_fp16_keeps_fp32_io_and_agrees(exported):
    run, _ = exported
    model = onnx.load(str(run / "export" / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    kinds = {i.data_type for i in model.graph.initializer if i.name in conv_weights}
    assert kinds == {TensorProto.FLOAT16}
    pixels, _ = _images(run)
    half = _logits(run / "export" / "model.fp16.onnx", pixels)
    full = _logits(run / "export" / "model.onnx", pixels)
    assert half.dtype == np.float32
    assert np.abs(half - full).max() < 0.05


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    """Zero points of the activations' QuantizeLinear nodes."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


def _int8_conv_weights(model: onnx.ModelProto) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The int8 weights of (depthwise, other) Convs, traced through their DequantizeLinear."""
    init = {i.name: i for i in model.graph.initializer}
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear"}
    depthwise, other = [], []
    for node in model.graph.node:
        source = dq_source.get(node.input[1]) if node.op_type == "Conv" else None
        if source in init and init[source].data_type == TensorProto.INT8:
            weight = numpy_helper.to_array(init[source])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            (depthwise if group > 1 and weight.shape[1] == 1 else other).append(weight)
    return depthwise, other


def test_int8_flavours(exported):
    """CPU flavour: uint8 activations; TensorRT flavour: int8 activations with zero point 0 and
    float biases; both per-channel int8 weights and both close to FP32 on real images."""
    run, _ = exported
    cpu = onnx.load(str(run / "export" / "model.int8.onnx"))
    trt = onnx.load(str(run / "export" / "model.int8-trt.onnx"))
    assert {z.dtype for z in _zero_points(cpu)} == {np.dtype(np.uint8)}
    # signed activations (the logits, for one) symmetric about zero (127.5 rounds either way
    # in float32); ReLU outputs from zero
    cpu_zps = {int(z) for z in _zero_points(cpu)}
    assert 0 in cpu_zps and cpu_zps & {127, 128} and cpu_zps <= {0, 127, 128}
    zps = _zero_points(trt)
    assert zps and {z.dtype for z in zps} == {np.dtype(np.int8)}
    assert all((z == 0).all() for z in zps)
    for model in (cpu, trt):
        init = {i.name: i for i in model.graph.initializer}
        weights = [init[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in init and init[n.input[0]].data_type == TensorProto.INT8]
        assert weights, "no int8 weights"
        per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                       and n.input[0] in init and len(init[n.input[1]].dims) == 1]
        assert per_channel, "no per-channel weight scales"
    for model in (cpu, trt):  # the stem convolution stays FP32
        init = {i.name for i in model.graph.initializer}
        stem = next(n for n in model.graph.node if n.op_type == "Conv")
        assert stem.input[1] in init, "the first Conv's weights should be float initializers"
    # CPU flavour: full 8 bits in depthwise convolutions (32-bit accumulation); where a 1x1
    # convolution runs as a matrix product, input channels 2i and 2i+1 share 128 levels (no
    # AVX2 saturation), more than 7-bit weights (64 levels) would give each.
    depthwise, other = _int8_conv_weights(cpu)
    assert depthwise and other
    assert all(np.abs(w).max() == 127 for w in depthwise)
    pairs = [np.abs(w.reshape(len(w), -1).astype(int)) for w in other]
    assert all((m[:, 0::2] + m[:, 1::2]).max() <= PAIR_BUDGET for m in pairs)
    assert max(m.max() for m in pairs) > 64
    # ... and in both flavours the 1x1 and depthwise weights are rounded with error feedback,
    # not each weight to its nearest level
    floats = _bench_module("int8_error_split").float_initializers(run / "export" / "model.onnx")
    for model in (cpu, trt):
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        refined = {"pointwise": 0, "depthwise": 0}
        for name, weight in floats.items():
            if weight.ndim == 4 and name + "_quantized" in init:
                kind = "depthwise" if weight.shape[1] == 1 else "pointwise"
                scale = init[name + "_scale"].reshape(-1, 1, 1, 1)
                plain = np.clip(np.round(weight / scale), -127, 127)
                refined[kind] += int((init[name + "_quantized"] != plain).any())
        assert refined["pointwise"] and refined["depthwise"], refined
    trt_w = np.concatenate([w.ravel() for w in sum(_int8_conv_weights(trt), [])])
    assert np.abs(trt_w).max() == 127  # TensorRT keeps full 8-bit weights
    trt_bias = [n for n in trt.graph.node if n.op_type == "DequantizeLinear"
                and any(i.name == n.input[0] and i.data_type == TensorProto.INT32
                        for i in trt.graph.initializer)]
    assert not trt_bias, "TensorRT flavour must keep float biases"
    size = (run / "export" / "model.int8.onnx").stat().st_size
    assert size <= 0.35 * (run / "export" / "model.onnx").stat().st_size
    pixels, _ = _images(run)
    full = _logits(run / "export" / "model.onnx", pixels)
    for name in ("model.int8.onnx", "model.int8-trt.onnx"):
        assert np.isfinite(_logits(run / "export" / name, pixels)).all()
        agree = (_logits(run / "export" / name, pixels).argmax(1) == full.argmax(1)).mean()
        assert agree >= 0.5, name  # a 4-step student on 32 px shapes; PACS test checks more


def test_quantize_writes_one_model_per_flavour_record(exported):
    """The FLAVOURS records are frozen and named apart; quantize returns exactly one model per
    record, in table order, each with the record's name as its precision."""
    run, _ = exported
    assert len({f.name for f in FLAVOURS}) == len(FLAVOURS)
    for flavour in FLAVOURS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            flavour.reduce_range = not flavour.reduce_range
        with pytest.raises(TypeError):
            flavour.extra_options["QuantizeBias"] = True
    config = RunDir(run).require_trained()
    metas = {f.name: model_meta(RunDir(run), config, f.name) for f in FLAVOURS}
    pixels, _ = _images(run)
    models = quantize(run / "export" / "model.onnx", pixels[:16], "minmax", metas)
    assert list(models) == [f.name for f in FLAVOURS]
    for name, model in models.items():
        props = {p.key: p.value for p in model.metadata_props}
        assert props == metas[name].to_props() and props["precision"] == name


def test_symmetric_signed_ranges_widen_only_ranges_that_span_zero(tmp_path):
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        load_tensors_data,
        save_tensors_data,
    )

    def f32(v):
        return np.array(v, dtype=np.float32)

    hist = np.array([3, 1], dtype=np.int64)
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, {
        "relu": TensorData(lowest=f32(0.0), highest=f32(6.0), hist=hist, bins=2),
        "short_low": TensorData(lowest=f32(-20.0), highest=f32(32.0), hist=hist, bins=2),
        "short_high": TensorData(lowest=f32(-68.0), highest=f32(40.0), hist=hist, bins=2)}),
        tmp_path / "in.json")
    symmetric_signed_ranges(tmp_path / "in.json", tmp_path / "out.json")
    out = load_tensors_data(tmp_path / "out.json")
    assert out.calibration_method == CalibrationMethod.Entropy
    got = {k: tuple(float(np.ravel(v)[0]) for v in d.range_value) for k, d in out.data.items()}
    assert got == {"relu": (0.0, 6.0), "short_low": (-32.0, 32.0), "short_high": (-68.0, 68.0)}
    assert all(np.array_equal(d.hist, hist) and d.bins == 2 for d in out.data.values())


def test_error_feedback_rounding_without_correlation_is_plain_rounding():
    """Inputs that never occur together give no error to pass on: each weight rounds alone."""
    weight = np.array([[0.26, -0.74, 1.49], [2.0, 0.5, -3.2]])
    scale = np.array([0.5, 0.05])
    levels = round_with_error_feedback(weight, scale, 64, np.diag([1.0, 2.0, 3.0]))
    assert levels.tolist() == [[1, -1, 3], [40, 10, -64]]  # -3.2 / 0.05 = -64, not beyond


def test_error_feedback_rounding_lowers_the_layers_output_error():
    """Two inputs that always carry the same value: the first weight's rounding error goes to
    the second (by hand: 0.3 rounds to 0, the second weight becomes 0.3 + 0.3 = 0.6 and rounds
    to 1, output 1 * x against 0.6 * x, where plain rounding gives 0 * x). On correlated random
    inputs the output error is below plain rounding's."""
    same = np.array([[1.0, 1.0], [1.0, 1.0]])
    levels = round_with_error_feedback(np.array([[0.3, 0.3]]), np.array([1.0]), 64, same, 1e-6)
    assert levels.tolist() == [[0, 1]]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 4)) @ rng.normal(size=(4, 24))  # 24 inputs, rank 4
    weight = rng.normal(size=(16, 24))
    scale = np.abs(weight).max(1) / 64
    plain = np.clip(np.round(weight / scale[:, None]), -64, 64)
    fed_back = round_with_error_feedback(weight, scale, 64, x.T @ x / len(x))
    assert np.abs(fed_back).max() <= 64
    error = [np.linalg.norm(x @ (weight - q * scale[:, None]).T) for q in (plain, fed_back)]
    assert error[1] < 0.5 * error[0]


def test_patch_statistics_match_unfolded_patches(monkeypatch):
    """A depthwise Conv's patch statistics against torch's own unfold: every channel's k x k
    input patches at the sampled output positions (at most 4 per side: every 3rd row and
    column of a 9x9 output, every 2nd of an 8x8 one, the grid shifting by one position a
    batch), multiplied out by hand."""
    import torch
    import torch.nn.functional as F

    from dgkit.export import rounding

    monkeypatch.setattr(rounding, "PATCH_GRID", 4)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    for k, stride, shift, side, keep in ((3, 2, 0, 8, [0, 2, 4, 6]), (3, 2, 1, 8, [1, 3, 5, 7]),
                                         (5, 2, 1, 8, [1, 3, 5, 7]), (3, 1, 1, 9, [1, 4, 7]),
                                         (3, 1, 2, 9, [2, 5, 8])):
        data = x[:, :, :side, :side] if stride == 1 else x
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [k // 2] * 4}
        gram, count = patch_gram(data, attrs, shift)
        cols = F.unfold(torch.from_numpy(data), k, padding=k // 2, stride=stride).numpy()
        cols = cols.reshape(2, 3, k * k, side, side)[:, :, :, keep][..., keep]
        patches = cols.transpose(1, 2, 0, 3, 4).reshape(3, k * k, -1).astype(np.float64)
        assert count == 2 * len(keep) ** 2
        np.testing.assert_allclose(gram, patches @ patches.transpose(0, 2, 1), rtol=1e-4,
                                   atol=1e-4)


def _qdq_layer(levels: np.ndarray, op: str) -> tuple[bytes, list[int]]:
    """A QDQ 1x1 Conv (NCHW, 4x4 positions) or Gemm with int8 weights `levels` (scale 1) on
    uint8 inputs (scale 1) and a uint8 output (scale 8192): onnxruntime fuses it into one int8
    kernel unless its graph optimisations are off."""
    from onnx import helper

    outputs, inputs = levels.shape
    weight = levels.reshape(outputs, inputs, 1, 1) if op == "Conv" else levels
    shapes = ([1, inputs, 4, 4], [1, outputs, 4, 4]) if op == "Conv" else ([4, inputs],
                                                                           [4, outputs])
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(8192.0, np.float32), "out_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "u8_zero"),
             numpy_helper.from_array(weight.astype(np.int8), "w"),
             numpy_helper.from_array(np.ones(outputs, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(outputs, np.int8), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "u8_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "one", "u8_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node(op, ["xd", "wd"], ["y"], **({} if op == "Conv" else {"transB": 1})),
             helper.make_node("QuantizeLinear", ["y", "out_scale", "u8_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "out_scale", "u8_zero"], ["out"])]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         shapes[0])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             shapes[1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), shapes[0]


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_pair_budget_weights_never_saturate_onnxruntimes_int8_kernel(op):
    """Positive weights on the pair budget's scale, rounded with error feedback, run on inputs
    of 255 everywhere (the worst case for 16-bit sums of two products): onnxruntime's fused
    int8 kernel gives exactly sum(levels) * 255, as integer arithmetic by hand does. Plain
    8-bit weights would put pairs of ~127 side by side (on AVX2, fused 33,000 instead of
    65,000 for one such pair)."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.2, 1.0, size=(16, 64))
    scale = pair_budget_scale(weight, PAIR_BUDGET, None, 1.0)
    assert np.allclose(scale, (weight[:, 0::2] + weight[:, 1::2]).max(1) / PAIR_BUDGET)
    levels = round_with_error_feedback(weight, scale, 127, np.eye(64), pair_budget=PAIR_BUDGET)
    pair_sums = levels[:, 0::2] + levels[:, 1::2]
    assert pair_sums.max() == PAIR_BUDGET and levels.max() > 64
    model, shape = _qdq_layer(levels, op)
    x = np.full(shape, 255.0, np.float32)
    fused = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    by_hand = np.round(levels.sum(1) * 255 / 8192) * 8192
    got = fused[0, :, 0, 0] if op == "Conv" else fused[0]
    np.testing.assert_array_equal(got, by_hand)


def test_pair_budget_scale_leaves_room_for_the_bias():
    """A channel of tiny weights and a large bias gets a scale whose int32 bias (on
    input scale x weight scale) fits; an all-zero channel gets scale 1."""
    weight = np.array([[1e-9, 0.0], [0.5, 0.25], [0.0, 0.0]])
    scale = pair_budget_scale(weight, 128, np.array([100.0, 0.0, 0.0]), 0.01)
    assert 100.0 / (scale[0] * 0.01) < 2**31 - 1
    assert scale[1] == pytest.approx(0.75 / 128) and scale[2] == 1.0


def test_error_feedback_rounding_per_channel_is_each_channel_alone():
    """A depthwise Conv's channels are independent layers: rounding them in one call gives
    what rounding each alone gives."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 1, 9))
    scale = np.abs(weight).max(-1) / 127
    grams = np.stack([z.T @ z / 50 for z in rng.normal(size=(4, 50, 9))])
    together = round_with_error_feedback(weight, scale, 127, grams)
    alone = [round_with_error_feedback(weight[c], scale[c], 127, grams[c]) for c in range(4)]
    assert np.array_equal(together, np.stack(alone))
    assert not np.array_equal(together, np.round(weight / scale[..., None]))


def _conv_graph(path: Path, nodes: list[tuple[str, str, list[str]]]) -> Path:
    """A graph of (op, output, inputs); a Conv's weight is a 3x3 initializer, depthwise when its
    output name starts with 'dw'."""
    from onnx import helper

    inits, made = [], []
    for op, out, inputs in nodes:
        if op == "Conv":
            depthwise = out.startswith("dw")
            weight = numpy_helper.from_array(
                np.ones((4, 1 if depthwise else 4, 3, 3), np.float32), f"{out}_w")
            inits.append(weight)
            made.append(helper.make_node("Conv", [*inputs, weight.name], [out], name=f"c_{out}",
                                         group=4 if depthwise else 1, pads=[1, 1, 1, 1]))
        else:
            made.append(helper.make_node(op, inputs, [out], name=f"n_{out}"))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("x", "y")]
    onnx.save(helper.make_model(helper.make_graph(made, "g", io[:1], io[1:], inits)), path)
    return path


def test_the_stem_is_every_conv_before_the_first_residual_connection(tmp_path):
    # stem, a depthwise block, then a residual block whose skip input is dw1's output: the
    # stem is what feeds both inputs of the Add, not the residual branch.
    graph = _conv_graph(tmp_path / "res.onnx", [
        ("Conv", "s", ["x"]), ("Relu", "r", ["s"]), ("Conv", "dw1", ["r"]),
        ("Conv", "b1", ["dw1"]), ("Conv", "b2", ["b1"]), ("Add", "a", ["dw1", "b2"]),
        ("Conv", "dw2", ["a"]), ("Add", "y", ["dw2", "a"])])
    assert conv_roles(graph) == (["c_s", "c_dw1"], ["dw1_w", "dw2_w"])
    # No residual connection (and an Add with a constant does not count): the first Conv.
    plain = _conv_graph(tmp_path / "plain.onnx", [
        ("Conv", "s", ["x"]), ("Conv", "c", ["s"]), ("Add", "y", ["c", "s_w"])])
    assert conv_roles(plain)[0] == ["c_s"]


def test_calibration_uses_only_the_sources_training_split(tiny_run, tmp_path):
    config = RunDir(tiny_run).require_trained()
    data = discover(config.data_root)
    sources = [data.domains.index(d) for d in config.source_domains]
    train, val = split_sources(data, sources, config.seed)
    rows = calibration_rows(data, sources, config.seed, 36)
    assert len(rows) == 36 and set(rows) <= set(train) and not set(rows) & set(val)
    cells = np.zeros((len(data.domains), len(data.classes)), dtype=int)
    for i in rows:
        cells[data.samples[i].domain, data.samples[i].label] += 1
    assert cells[data.domains.index("sketch")].sum() == 0
    sizes = np.zeros_like(cells)
    for i in train:
        sizes[data.samples[i].domain, data.samples[i].label] += 1
    top = cells.max()  # balanced: a cell is taken whole, or within one image of the largest
    assert all(c == n or c >= top - 1 for c, n in zip(cells[sources].ravel(),
                                                      sizes[sources].ravel(), strict=True))

    spec = config.preprocess
    cache = tmp_path / "calibration.npz"
    first, info = calibration_pixels(data, config.source_domains, 0, 36, spec, cache)
    assert not info["cached"] and first.shape == (36, 32, 32, 3) and cache.is_file()
    again, info = calibration_pixels(data, config.source_domains, 0, 36, spec, cache)
    assert info["cached"] and np.array_equal(first, again)
    _, info = calibration_pixels(data, config.source_domains, 0, 34, spec, cache)
    assert not info["cached"]  # another count is another calibration set


def test_validate_run_measures_what_it_claims(exported, tmp_path):
    run = _copy(exported[0], tmp_path)
    for name in ("report.json", "report.md", "report.png"):
        (run / "export" / name).unlink()
    proc = dgkit("validate", run, *LOOSE, *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["passed"] and (run / "export" / "report.png").is_file()
    assert (report["max_drop"], report["max_source_drop"], report["min_agreement"]) == (
        100.0, 100.0, 0.0)
    pixels, labels, held = _validation_images(run)
    torch_pred = torch_logits(load_student(RunDir(run)), pixels).argmax(1)
    by_key = {a["key"]: a for a in report["artifacts"]}
    assert by_key["torch-fp32"]["accuracy"]["sketch"] == round(
        100 * (torch_pred[:held] == labels[:held]).mean(), 2)
    assert not by_key["torch-fp32"]["checks"]
    for key, name in (("onnx-fp32", "model.onnx"), ("onnx-fp16", "model.fp16.onnx"),
                      ("onnx-int8", "model.int8.onnx")):
        pred = _logits(run / "export" / name, pixels).argmax(1)
        assert by_key[key]["accuracy"]["sketch"] == round(
            100 * (pred[:held] == labels[:held]).mean(), 2)
        # The gate's counts, from the two models' own predictions on the same images.
        checks = {c["name"]: c for c in by_key[key]["checks"]}
        for check, rows in (("drop", slice(None, held)), ("source_drop", slice(held, None))):
            ref_right, right = torch_pred[rows] == labels[rows], pred[rows] == labels[rows]
            assert (checks[check]["images"], checks[check]["fp32_only"],
                    checks[check]["artifact_only"]) == (
                len(right), int((ref_right & ~right).sum()), int((right & ~ref_right).sum())), key
        assert checks["agreement"]["differ"] == int((pred[:held] != torch_pred[:held]).sum())
        assert by_key[key]["agreement_by_set"]["sketch"] == round(
            100 * (pred[:held] == torch_pred[:held]).mean(), 2)
    # report.md shows the held-out agreement (gated) in its own column
    lines = (run / "export" / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| artifact"))
    int8_row = next(line for line in lines if line.startswith("| model.int8.onnx |"))
    cells = dict(zip(header.split(" | "), int8_row.split(" | "), strict=True))
    assert cells["agree held-out"] == f"{by_key['onnx-int8']['agreement_by_set']['sketch']:.2f}"
    assert by_key["onnx-int8"]["size_mb"] == round(
        (run / "export" / "model.int8.onnx").stat().st_size / 2**20, 3)


def _rotate_classes(path: Path) -> None:
    """Make the model at `path` predict class (k + 1) mod C wherever it predicted k: a Gather
    after its logits."""
    from onnx import helper

    model = onnx.load(str(path))
    (out,) = model.graph.output
    classes = out.type.tensor_type.shape.dim[1].dim_value
    for node in model.graph.node:
        node.output[:] = ["raw_logits" if o == out.name else o for o in node.output]
    order = numpy_helper.from_array(np.roll(np.arange(classes), 1).astype(np.int64), "rotation")
    model.graph.initializer.append(order)
    model.graph.node.append(helper.make_node("Gather", ["raw_logits", "rotation"], [out.name],
                                             axis=1))
    onnx.save(model, str(path))


def test_validate_fails_exactly_the_artifact_that_disagrees(exported, tmp_path):
    """An FP16 model whose every prediction is moved to the next class, beside the FP32 one:
    at the default limits the FP16 model fails its agreement (0 %) and the command exits 1;
    model.onnx, identical to torch, passes."""
    run = _copy(exported[0], tmp_path)
    for name in ("model.int8.onnx", "model.int8-trt.onnx"):
        (run / "export" / name).unlink()
    _rotate_classes(run / "export" / "model.fp16.onnx")
    proc = dgkit("validate", run, *FAST)
    assert proc.returncode == 1
    assert "validation failed" in proc.stderr and "--min-agreement" in proc.stderr
    report = json.loads((run / "export" / "report.json").read_text())
    by_key = {a["key"]: a for a in report["artifacts"]}
    assert not by_key["onnx-fp32"]["failures"] and not report["passed"]
    sketches = report["images"]["sketch"]
    agreement = next(f for f in by_key["onnx-fp16"]["failures"] if "agreement" in f)
    assert agreement.startswith("top-1 agreement on sketch: 0.00 %")
    assert agreement.endswith(f"{sketches} of {sketches} images predicted otherwise")


def test_partial_validation_writes_beside_the_full_report_at_80_columns(exported, tmp_path,
                                                                       monkeypatch):
    """--max-images 10 writes report-partial.* and says so; report.json and its figures stay
    as the export wrote them. At COLUMNS=80 every line fits and every artifact is named whole."""
    run = _copy(exported[0], tmp_path)
    full = ("report.json", "report.md", "report.png", "report-confusion.png")
    before = {n: (run / "export" / n).read_bytes() for n in full}
    monkeypatch.setenv("COLUMNS", "80")
    proc = dgkit("validate", run, "--max-images", "10", *LOOSE, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert {n: (run / "export" / n).read_bytes() for n in full} == before
    partial = json.loads((run / "export" / "report-partial.json").read_text())
    assert partial["max_images"] == 10 and partial["images"] == {"sketch": 10, "source_val": 8}
    said = " ".join(proc.stderr.split())
    assert "partial validation (--max-images 10): writing report-partial.*" in said
    assert f"{run / 'export' / 'report'}.json, if any, is left as it was" in said
    assert "partial validation: at most 10 images a set" in (
        run / "export" / "report-partial.md").read_text()
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80, proc.stdout
    first_words = [line.split()[0] for line in lines if line.strip()]
    for name in ["torch-fp32", *ARTIFACTS]:
        assert first_words.count(name) == 1, (name, proc.stdout)


def test_gate_limits_out_of_range_fail_in_one_line(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    proc = dgkit("validate", run, "--max-drop", "-1")
    assert proc.returncode == 2
    assert "--max-drop must be between 0 and 100, got -1" in error_line(proc)
    proc = dgkit("export", run, "--min-agreement", "101")
    assert proc.returncode == 2
    assert "--min-agreement must be between 0 and 100, got 101" in error_line(proc)
    assert not (run / "export").exists()


def test_validate_model_file(exported, tiny_domains, tmp_path):
    run = _copy(exported[0], tmp_path)
    model = run / "export" / "model.int8.onnx"
    proc = dgkit("validate", model, "--data", tiny_domains, "--domain", "sketch", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "export" / "model.int8.onnx.report.json").read_text())
    run_report = json.loads((run / "export" / "report.json").read_text())
    expected = next(a for a in run_report["artifacts"] if a["key"] == "onnx-int8")
    (only,) = report["artifacts"]
    assert only["accuracy"] == {"sketch": expected["accuracy"]["sketch"]}
    assert only["agreement"] is None  # no torch reference for a lone model file


def test_trt_without_tensorrt_says_so_in_one_line(tiny_run, tmp_path):
    reason = tensorrt.unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: see test_tensorrt_engine")
    run = _copy(tiny_run, tmp_path)
    proc = dgkit("export", run, "--trt", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert (run / "export" / "model.onnx").is_file()
    assert (run / "export" / "model.fp16.onnx").is_file()  # --trt alone builds from FP16
    lines = [ln for ln in proc.stderr.splitlines() if "--trt" in ln]
    assert len(lines) == 1 and reason in lines[0]
    assert not list((run / "export").glob("*.plan"))


@pytest.mark.skipif(tensorrt.unavailable() is not None,
                    reason=f"TensorRT engine build needs it: {tensorrt.unavailable()}")
def test_tensorrt_engine(exported, tmp_path):
    from dgkit.serve.predictor import Predictor

    run = _copy(exported[0], tmp_path)
    proc = dgkit("export", run, "--fp16", "--int8", "--trt", "--max-batch", "8", *FAST, *LOOSE)
    assert proc.returncode == 0, proc.stderr
    pixels, _ = _images(run)
    full = _logits(run / "export" / "model.onnx", pixels[:8])
    for name in ("model.fp16.plan", "model.int8.plan"):
        sidecar = json.loads((run / "export" / f"{name}.json").read_text())
        assert set(sidecar) == {"tensorrt_version", "gpu_name", "compute_capability", "metadata"}
        logits = Predictor(run / "export" / name).run_batch(to_model_input(pixels[:8]))
        assert logits.shape == full.shape
    assert (run / "export" / "tensorrt.timing-cache").is_file()


# ------------------------------------------------------------------ bad input


def test_missing_incomplete_and_foreign_runs(tiny_run, tmp_path):
    assert "does not exist" in error_line(dgkit("export", tmp_path / "nope"))
    run = _copy(tiny_run, tmp_path)
    config = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**config, "format": 99}))
    line = error_line(dgkit("export", run))
    assert str(run / "run.json") in line and "format 99" in line
    (run / "run.json").write_text(json.dumps(config))
    (run / "student.safetensors").unlink()
    proc = dgkit("validate", run)
    assert proc.returncode == 2 and "incomplete" in error_line(proc)
    assert not (run / "export").exists()


def test_an_unfinished_run_is_exported_with_one_line_saying_so(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "finished": False}))
    proc = dgkit("export", run, "--no-validate")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (f"has not finished training: it stopped after step {last} of 4, so this is its "
            f"best student so far (step {summary['best_step']})") in said
    assert f"dgkit distill --resume {run} finishes it" in said
    assert (run / "export" / "model.onnx").is_file()


def test_target_domain_absent_from_the_data(tiny_run, exported, domains_copy, tmp_path):
    shutil.rmtree(domains_copy / "sketch")
    run = _copy(tiny_run, tmp_path)
    line = error_line(dgkit("export", run, "--data", domains_copy))
    assert "'sketch' is absent" in line
    assert not (run / "export").exists()
    model = tmp_path / "model.onnx"
    shutil.copy(exported[0] / "export" / "model.onnx", model)
    line = error_line(dgkit("validate", model, "--data", domains_copy, "--domain", "sketch"))
    assert "'sketch' is absent" in line


def test_non_dgkit_onnx_is_refused(tmp_path, tiny_domains):
    from serve_helpers import make_model

    plain = tmp_path / "plain.onnx"
    make_model(plain, meta=False)  # a valid classifier without dgkit's metadata
    proc = dgkit("validate", plain, "--data", tiny_domains, "--domain", "sketch")
    assert proc.returncode == 2 and "not a dgkit model" in error_line(proc)


def test_too_few_calibration_images(tiny_run, domains_copy, tmp_path):
    run = _copy(tiny_run, tmp_path)
    proc = dgkit("export", run, "--int8", "--calib-images", "1000", "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "only 40 images; using all of them" in " ".join(proc.stderr.split())
    for domain in ("cartoon", "photo"):  # 3 images a class: 2 x 8 in the training split
        for image in (domains_copy / domain).rglob("*.png"):
            if int(image.stem) >= 3:
                image.unlink()
    before = (run / "export" / "model.int8.onnx").read_bytes()
    line = error_line(dgkit("export", run, "--int8", "--calib-images", "16"))
    assert "--calib-images 16 is too few" in line
    line = error_line(dgkit("export", run, "--int8", "--data", domains_copy, "--no-validate"))
    assert "needs at least 32" in line
    assert (run / "export" / "model.int8.onnx").read_bytes() == before


def _main(monkeypatch, capsys, *args: str | Path) -> tuple[int, str]:
    """Run the CLI in this process (for tests that patch or register something)."""
    from dgkit.cli import main

    monkeypatch.setattr(sys, "argv", ["dgkit", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def test_unexportable_student_names_the_op(tiny_run, tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import save_file

    from dgkit.distill.students import Backbone, Student, register_student

    class Erfinv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.erfinv(torch.tanh(self.conv(x)) * 0.9).mean((2, 3))

    register_student("test_erfinv")(lambda imagenet: Backbone(Erfinv(), 8))
    run = _copy(tiny_run, tmp_path)
    config = json.loads((run / "run.json").read_text())
    config["train"]["student"] = "test_erfinv"
    (run / "run.json").write_text(json.dumps(config))
    spec = json.loads((run / "student.json").read_text())
    (run / "student.json").write_text(json.dumps({**spec, "backbone": "test_erfinv",
                                                  "feature_dim": 8}))
    student = Student(Backbone(Erfinv(), 8), torch.nn.Linear(8, 3))
    save_file(student.state_dict(), str(run / "student.safetensors"))
    code, err = _main(monkeypatch, capsys, "export", run)
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "aten::erfinv" in line
    assert not (run / "export" / "model.onnx").exists()


def test_export_folder_that_is_a_file(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    (run / "export").write_text("mine")
    line = error_line(dgkit("export", run))
    assert "is a file, not a folder" in line
    assert (run / "export").read_text() == "mine"


def test_failed_write_leaves_earlier_artifacts_intact(exported, tmp_path, monkeypatch, capsys):
    """A disk that fills up while the INT8 model is written: the command says so in one line
    and every file from the earlier export is byte-identical, with no temporary file left."""
    run = _copy(exported[0], tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "export").iterdir() if p.is_file()}
    real_save = onnx.save_model

    def save(model, path, *args, **kwargs):
        if Path(path).name.startswith(".model.int8.onnx"):
            Path(path).write_bytes(b"half")
            raise OSError(28, "No space left on device", str(path))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save)
    code, err = _main(monkeypatch, capsys, "export", run, "--fp16", "--int8")
    assert code == 2 and "No space left on device" in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1
    assert "Decoding calibration images" not in err  # the cached calibration set was reused
    after = {p.name: p.read_bytes() for p in (run / "export").iterdir() if p.is_file()}
    assert after == before


@pytest.mark.pacs
def test_pacs_subset_export(tmp_path):
    """Real photos, paintings, cartoons and sketches: a PACS subset (12 images a class and
    domain), an ImageNet-initialised EfficientNet-Lite0 student trained briefly at 64 px."""
    from conftest import PACS

    subset = tmp_path / "pacs"
    for domain in sorted(p for p in PACS.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            (subset / domain.name / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir())[:12]:
                (subset / domain.name / cls.name / image.name).symlink_to(image)
    run = tmp_path / "run"
    dgkit("distill", "--data", subset, "--target", "sketch", "--steps", "30", "--image-size",
          "64", "--batch-size", "21", "--eval-every", "30", "--quiet", "--out", run, check=True)
    proc = dgkit("export", run, "--fp16", "--int8", "--calib-images", "128", *FAST)
    report = json.loads((run / "export" / "report.json").read_text())
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    by_key = {a["key"]: a for a in report["artifacts"]}
    assert by_key["onnx-fp32"]["agreement"] == 100.0
    # 30 steps at 64 px leave small logit margins (the 200-step PACS run in the export report
    # agrees 94 / 96 %): this checks the INT8 models track FP32 far above chance (1 in 7)
    assert by_key["onnx-int8"]["agreement"] >= 60 and by_key["onnx-int8-trt"]["agreement"] >= 60
    assert report["export"]["calibration"]["images"] == 128
    _assert_onnx_matches_torch(run)


# ------------------------------------------------------------------ bench/noise_floor.py


def test_noise_floor_refuses_a_missing_run_in_one_line(tmp_path):
    out = tmp_path / "nf.json"
    proc = bench_script("noise_floor.py", tmp_path / "nope", "--json", out)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert not out.exists()


def test_noise_floor_asks_for_the_export_first(tiny_run, tmp_path):
    out = tmp_path / "nf.json"
    proc = bench_script("noise_floor.py", tiny_run, "--json", out)
    assert proc.returncode == 1
    line = error_line(proc)  # one line, no traceback, naming the file and the fix
    assert str(tiny_run / "export" / "model.onnx") in line and "--int8" in line
    assert not out.exists()


# ------------------------------------------------------------------ bench/int8_error_split.py


def _bench_module(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_split_undoing_both_sides_gives_back_fp32(exported):
    """On the calibration images, which set the ranges, the INT8 graph with both its roundings
    undone computes the FP32 model (up to the top of each symmetric uint8 range, which lies half
    a step below its bound: 127 steps above a zero point of 128); with neither undone it is
    10x off."""
    split = _bench_module("int8_error_split")
    export = exported[0] / "export"
    model = onnx.load(str(export / "model.int8.onnx"))
    floats = split.float_initializers(export / "model.onnx")
    pixels = np.load(export / "calibration.npz")["pixels"][:64]
    reference = _logits(export / "model.onnx", pixels)
    neither = split.exact(split.undo(model, True, floats))(to_model_input(pixels))
    both = split.exact(model)(to_model_input(pixels))
    assert np.abs(neither - reference).max() <= 1e-3
    assert np.abs(both - reference).max() > 5e-3

    def ops(m, op):
        return [n for n in m.graph.node if n.op_type == op]

    weights_only = split.undo(model, True, None)
    activations_only = split.undo(model, False, floats)
    assert ops(model, "QuantizeLinear") and not ops(weights_only, "QuantizeLinear")
    weight_dequantizers = [n for n in ops(model, "DequantizeLinear")
                           if n.input[0].endswith("_quantized")]
    assert len(ops(weights_only, "DequantizeLinear")) == len(weight_dequantizers)
    assert len(ops(activations_only, "QuantizeLinear")) == len(ops(model, "QuantizeLinear"))
    assert not any(n.input[0].endswith("_quantized")
                   for n in ops(activations_only, "DequantizeLinear"))


def test_error_split_rounds_each_output_channel_on_its_own_scale():
    split = _bench_module("int8_error_split")
    weight = np.array([[0.5, -1.27, 0.004], [0.0, 0.0, 0.0], [0.3, 0.1, -0.2]], np.float32)
    scale = 0.3 / 127
    expected = [[0.5, -1.27, 0.0], [0.0, 0.0, 0.0],
                [0.3, round(0.1 / scale) * scale, round(-0.2 / scale) * scale]]
    assert np.allclose(split.round_per_channel(weight, 8), expected, atol=1e-7)


def test_error_split_cli_reports_the_exact_int8_agreement(exported, tmp_path):
    run = exported[0]
    out = tmp_path / "split.json"
    proc = bench_script("int8_error_split.py", run, "--json", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6
    sketches, _ = _images(run, "sketch")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(run / "export" / "model.int8.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    exact = session.run(["logits"], {"image": to_model_input(sketches)})[0].argmax(1)
    fp32 = _logits(run / "export" / "model.onnx", sketches).argmax(1)
    assert rows["int8, exact"]["sketch_agreement"] == round(100 * float((exact == fp32).mean()), 2)


def test_error_split_asks_for_the_int8_export_first(tiny_run, tmp_path):
    proc = bench_script("int8_error_split.py", tiny_run)
    assert proc.returncode == 1
    line = error_line(proc)
    assert str(tiny_run / "export" / "model.onnx") in line and "--int8" in line
    run = _copy(tiny_run, tmp_path)  # exported without --int8: the FP32 model alone
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(b"fp32")
    proc = bench_script("int8_error_split.py", run, "--json", tmp_path / "split.json")
    assert proc.returncode == 1
    line = error_line(proc)
    assert str(run / "export" / "model.int8.onnx") in line and "--int8" in line
    assert (run / "export" / "model.onnx").read_bytes() == b"fp32"
    assert not (tmp_path / "split.json").exists()
