"""INT8 for the CPU it will run on: `dgkit export --cpu`, the flavour in the model's metadata,
the Predictor's check at load, and the arithmetic each flavour relies on, on this machine's CPU.

conftest.py makes every test see an AVX2-only CPU; these tests pretend to other CPUs through
dgkit.cpu.FAKE_ENV, and the arithmetic tests read the real one."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import TINY, dgkit, error_line
from onnx import numpy_helper
from test_export import _qdq_layer

from dgkit import cpu
from dgkit.export.formats import cpu_flavour_of
from dgkit.export.rounding import QUANTIZED_SUFFIX
from dgkit.serve.predictor import Predictor, WrongCpu

LOOSE = ["--max-drop", "100", "--max-source-drop", "100", "--min-agreement", "0",
         "--latency-runs", "0"]
VNNI = {**os.environ, cpu.FAKE_ENV: "avx2 avx512_vnni"}


def _real_features(monkeypatch) -> frozenset[str]:
    monkeypatch.delenv(cpu.FAKE_ENV, raising=False)
    return cpu.features()


@pytest.fixture(scope="module")
def vnni_run(tiny_domains, tmp_path_factory) -> Path:
    """A tiny run exported with --int8 --cpu vnni on a CPU that pretends to have AVX2 alone."""
    out = tmp_path_factory.mktemp("vnni") / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "4", "--out", out,
          *TINY, check=True)
    proc = dgkit("export", out, "--int8", "--cpu", "vnni", *LOOSE)
    assert proc.returncode == 0, proc.stderr
    return out


def test_cpu_vnni_writes_a_model_that_names_its_flavour(vnni_run):
    export = vnni_run / "export"
    assert (export / "model.int8-vnni.onnx").is_file()
    assert (export / "model.int8-trt.onnx").is_file()
    assert not (export / "model.int8.onnx").exists()  # the avx2 flavour was not asked for
    model = onnx.load(str(export / "model.int8-vnni.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["precision"] == "int8-vnni"
    assert cpu_flavour_of(props["precision"]) == "vnni"


def test_the_vnni_flavour_uses_all_8_bits_where_avx2_cannot(vnni_run):
    """1x1 and classifier weights beyond 7 bits, and pairs of input channels whose levels sum
    past the AVX2 pair budget: only a 32-bit accumulator adds those up exactly."""
    model = onnx.load(str(vnni_run / "export" / "model.int8-vnni.onnx"))
    levels = [numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name.endswith(QUANTIZED_SUFFIX) and i.data_type == onnx.TensorProto.INT8]
    matrices = [w.reshape(len(w), -1) for w in levels if w.ndim == 2 or w.shape[2:] == (1, 1)]
    assert matrices and max(int(np.abs(w).max()) for w in matrices) == 127
    pair_sums = [np.abs(w[:, 0:-1:2].astype(int)) + np.abs(w[:, 1::2].astype(int))
                 for w in matrices if w.shape[1] > 1]
    assert max(int(s.max()) for s in pair_sums) > 128


def _stem_is_int8(model: Path) -> bool:
    """Whether the graph's first Conv reads its weight through a DequantizeLinear."""
    graph = onnx.load(str(model)).graph
    producer = {out: node for node in graph.node for out in node.output}
    first = next(node for node in graph.node if node.op_type == "Conv")
    weight = producer.get(first.input[1])
    return weight is not None and weight.op_type == "DequantizeLinear"


def test_the_vnni_flavour_quantizes_a_stem_of_one_convolution(vnni_run, tiny_domains, tmp_path):
    """EfficientNet-Lite0's stem (six convolutions before the first residual connection) stays
    FP32; ResNet-18's (its 7x7 convolution alone) is INT8 in the vnni flavour, FP32 in avx2."""
    assert not _stem_is_int8(vnni_run / "export" / "model.int8-vnni.onnx")
    run = tmp_path / "resnet18"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "2",
          "--student", "resnet18", "--out", run, *TINY, check=True)
    for flavour, file, int8 in (("vnni", "model.int8-vnni.onnx", True),
                                ("avx2", "model.int8.onnx", False)):
        dgkit("export", run, "--int8", "--cpu", flavour, "--no-validate", check=True)
        assert _stem_is_int8(run / "export" / file) == int8


def test_validation_on_a_cpu_without_vnni_runs_the_vnni_flavour_exactly(vnni_run):
    report = json.loads((vnni_run / "export" / "report.json").read_text())
    row = next(a for a in report["artifacts"] if a["file"] == "model.int8-vnni.onnx")
    assert row["runtime"] == "ort-cpu-qdq-reference"
    assert "(avx2)" in report["device"]  # the instruction set validation ran on


def test_the_predictor_refuses_a_vnni_model_on_an_avx2_cpu_unless_forced(vnni_run, caplog):
    model = vnni_run / "export" / "model.int8-vnni.onnx"
    with pytest.raises(WrongCpu) as refused:
        Predictor(model)
    message = str(refused.value)
    assert "model.int8-vnni.onnx" in message and "avx2" in message
    assert "--cpu avx2" in message and "--any-cpu" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="dgkit.serve"):
        forced = Predictor(model, any_cpu=True)
    assert any("should not run on this CPU" in r.message for r in caplog.records)
    assert forced.meta.precision == "int8-vnni"


def test_the_predictor_loads_a_vnni_model_on_a_vnni_cpu(vnni_run, monkeypatch, caplog):
    monkeypatch.setenv(cpu.FAKE_ENV, "avx2 avx512_vnni")
    with caplog.at_level(logging.WARNING, logger="dgkit.serve"):
        predictor = Predictor(vnni_run / "export" / "model.int8-vnni.onnx")
    assert predictor.backend == "ort-cpu" and not caplog.records
    monkeypatch.setenv(cpu.FAKE_ENV, "asimddp")  # an ARM64 CPU with the dot-product instructions
    Predictor(vnni_run / "export" / "model.int8-vnni.onnx")


def test_predict_refuses_in_one_line_and_runs_with_any_cpu(vnni_run, tiny_domains):
    model = vnni_run / "export" / "model.int8-vnni.onnx"
    image = next((tiny_domains / "sketch").rglob("*.png"))
    line = error_line(dgkit("predict", model, image))
    assert "should not run on this CPU" in line and "--cpu avx2" in line
    forced = dgkit("predict", model, image, "--any-cpu", "--format", "json")
    assert forced.returncode == 0, forced.stderr
    assert "should not run on this CPU" in forced.stderr
    assert json.loads(forced.stdout.splitlines()[0])["path"] == str(image)
    on_vnni = dgkit("predict", model, image, "--format", "json", env=VNNI)
    assert on_vnni.returncode == 0 and "should not run" not in on_vnni.stderr


def test_cpu_auto_exports_this_machines_flavour(vnni_run, tmp_path):
    run = Path(shutil.copytree(vnni_run, tmp_path / "run"))
    shutil.rmtree(run / "export")
    proc = dgkit("export", run, "--int8", "--no-validate", env=VNNI)
    assert proc.returncode == 0, proc.stderr
    assert "--cpu auto chose vnni" in proc.stdout + proc.stderr
    assert (run / "export" / "model.int8-vnni.onnx").is_file()
    assert not (run / "export" / "model.int8.onnx").exists()
    avx2 = dgkit("export", run, "--int8", "--no-validate")  # conftest's CPU: AVX2 alone
    assert "--cpu auto chose avx2" in avx2.stdout + avx2.stderr
    assert (run / "export" / "model.int8.onnx").is_file()


def test_an_unknown_cpu_is_refused_in_one_line(vnni_run, tmp_path):
    run = Path(shutil.copytree(vnni_run, tmp_path / "run"))
    before = sorted(p.name for p in (run / "export").iterdir())
    line = error_line(dgkit("export", run, "--int8", "--cpu", "avx512"))
    assert "--cpu 'avx512'" in line and "avx2" in line and "vnni" in line
    assert sorted(p.name for p in (run / "export").iterdir()) == before


def test_faked_features_decide_the_flavour(monkeypatch):
    for flags, flavour in (("avx2", "avx2"), ("avx2 avx_vnni", "vnni"), ("amx_int8", "vnni"),
                           ("asimddp", "vnni"), ("", "avx2")):
        monkeypatch.setenv(cpu.FAKE_ENV, flags)
        assert cpu.native_flavour() == flavour
        assert (cpu.mismatch("int8-vnni") is None) == (flavour == "vnni")
        assert cpu.mismatch("int8") is None and cpu.mismatch("fp32") is None


def _fused_and_exact(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One QDQ 1x1 Conv with int8 weights `levels` on inputs of 255: onnxruntime's fused int8
    kernel on this CPU, and the same graph computed exactly (graph optimisations off)."""
    model, shape = _qdq_layer(levels, "Conv")
    x = np.full(shape, 255.0, np.float32)
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            .run(None, {"x": x})[0][0, :, 0, 0] for options in (None, exact)]
    return runs[0], runs[1]


def test_8_bit_weights_are_exact_on_this_cpu_when_it_has_vnni(monkeypatch):
    """The vnni flavour's premise, on real hardware: weights of 127 on input channels 0 and 1
    with inputs of 255 need 17 bits per pair, which a 32-bit accumulator holds."""
    features = _real_features(monkeypatch)
    if not features & set(cpu.DOT_32BIT):
        pytest.skip(f"this CPU ({'/'.join(sorted(features)) or 'no int8 flags'}) has no VNNI, "
                    "AMX or dot-product instructions")
    levels = np.full((8, 16), 127, np.int8)
    fused, exact = _fused_and_exact(levels)
    np.testing.assert_array_equal(fused, exact)
    assert exact[0] == np.round(127 * 16 * 255 / 8192) * 8192


def test_8_bit_weights_saturate_on_this_cpu_when_it_has_avx2_alone(monkeypatch):
    """Why the avx2 flavour exists, on real hardware: the same layer comes out wrong."""
    features = _real_features(monkeypatch)
    if features & set(cpu.DOT_32BIT) or "avx2" not in features:
        pytest.skip(f"this CPU has {'/'.join(sorted(features)) or 'no int8 flags'}, not AVX2 "
                    "alone")
    fused, exact = _fused_and_exact(np.full((8, 16), 127, np.int8))
    assert (fused < exact).all()



def test_the_openvino_backend_is_checked_too(vnni_run):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    with pytest.raises(WrongCpu):
        Predictor(vnni_run / "export" / "model.int8-vnni.onnx", backend="openvino")
