"""The `openvino` backend: its logits match onnxruntime's on the same FP32 and QDQ INT8 files,
it keeps the dgkit contract, and runs when asked for by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serve_helpers import CLASSES, make_model, reference_logits

from dgkit.errors import DgkitError
from dgkit.serve.backends import OrtRunner, onnx_runner
from dgkit.serve.openvino_backend import openvino_installed

needs_openvino = pytest.mark.skipif(
    not openvino_installed(),
    reason="needs the 'openvino' extra (openvino not installed): pip install 'dgkit[openvino]'")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("ov") / "model.onnx"
    return path, make_model(path)


@pytest.fixture(scope="module")
def int8(fp32: tuple[Path, dict]) -> Path:
    """Plain quantize_static QDQ (uint8 activations, int8 per-channel weights), metadata kept."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from dgkit.model_meta import INPUT_NAME

    rng = np.random.default_rng(1)

    class Reader:
        def __init__(self) -> None:
            self.left = 4

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            return {INPUT_NAME: rng.random((8, 3, 32, 32), dtype=np.float32)} \
                if self.left >= 0 else None

    out = fp32[0].with_name("model.int8.onnx")
    quantize_static(str(fp32[0]), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    model, source = onnx.load(str(out)), onnx.load(str(fp32[0]))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(out))
    return out


@needs_openvino
def test_fp32_logits_match_onnxruntime(fp32: tuple[Path, dict]) -> None:
    from dgkit.serve.openvino_backend import OpenVINORunner

    ov, ort = OpenVINORunner(fp32[0], threads=1), OrtRunner(fp32[0], "ort-cpu", threads=1)
    assert ov.name == "openvino" and ov.meta == ort.meta and ov.meta.classes == CLASSES
    for n in (1, 3):  # the batch is dynamic
        x = np.random.default_rng(n).random((n, 3, 32, 32), dtype=np.float32)
        got = ov.run(x)
        assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
        np.testing.assert_allclose(got, ort.run(x), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, reference_logits(x, fp32[1]), rtol=1e-4, atol=1e-4)


@needs_openvino
def test_int8_logits_match_onnxruntime(int8: Path) -> None:
    """The same QDQ file: both runtimes compute int8 products exactly (32-bit sums on this
    tiny 27-input convolution), so they differ by requantization rounding alone."""
    from dgkit.serve.openvino_backend import OpenVINORunner

    x = np.random.default_rng(7).random((16, 3, 32, 32), dtype=np.float32)
    ov = OpenVINORunner(int8, threads=1).run(x)
    ort = OrtRunner(int8, "ort-cpu", threads=1).run(x)
    spread = float(ort.max() - ort.min())
    assert np.abs(ov - ort).max() <= 0.02 * spread
    assert (ov.argmax(1) == ort.argmax(1)).mean() >= 0.9


@needs_openvino
def test_openvino_runs_when_asked_and_auto_stays_onnxruntime(fp32: tuple[Path, dict]) -> None:
    import onnxruntime as ort

    from dgkit.serve.predictor import Predictor

    asked = Predictor(fp32[0], backend="openvino", threads=1)
    assert asked.backend == "openvino" and asked.meta.precision == "fp32"
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert Predictor(fp32[0], threads=1).backend == ("ort-cuda" if gpu else "ort-cpu")


@needs_openvino
def test_not_a_dgkit_model(tmp_path: Path) -> None:
    from dgkit.serve.openvino_backend import OpenVINORunner

    bare = tmp_path / "bare.onnx"
    make_model(bare, meta=False)
    with pytest.raises(DgkitError, match="not a dgkit model"):
        OpenVINORunner(bare)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(DgkitError, match="not a loadable ONNX model"):
        OpenVINORunner(broken)


def test_without_openvino_asking_for_it_names_the_extra(fp32: tuple[Path, dict],
                                                         monkeypatch) -> None:
    from dgkit.serve import openvino_backend

    monkeypatch.setattr(openvino_backend, "openvino_installed", lambda: False)
    with pytest.raises(DgkitError, match=r"pip install 'dgkit\[openvino\]'"):
        onnx_runner(fp32[0], "openvino")
