"""The `openvino` backend: OpenVINO's CPU runtime on a dgkit ONNX file (the `openvino` extra).

It reads the same files as onnxruntime, FP32 and QDQ INT8, and runs their int8 layers faster on
x86 CPUs (BENCHMARKS.md, "CPU runtimes"). Inference precision is pinned to f32: OpenVINO's
default on CPUs with AVX512-BF16 or AMX is bf16, which changes a few percent of the top-1
answers of an FP32 model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from dgkit.errors import DgkitError
from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME, ModelMeta


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def read_meta(path: Path) -> ModelMeta:
    """The dgkit metadata of an ONNX file (OpenVINO does not keep ONNX metadata_props)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise DgkitError(f"{path} is not a loadable ONNX model ({str(exc)[:200]})") from exc
    props = dict(session.get_modelmeta().custom_metadata_map)
    return ModelMeta.from_props(props, source=str(path))


class OpenVINORunner:
    """A model compiled for OpenVINO's CPU device: `threads` threads (default: the physical
    cores), one stream, the latency hint, f32 precision. One infer request behind a lock."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        if not openvino_installed():
            raise DgkitError("backend 'openvino' needs OpenVINO: pip install 'dgkit[openvino]'")
        import openvino as ov

        from dgkit.serve.backends import check_contract, physical_cores

        self.name = "openvino"
        self.meta = read_meta(path)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            text = (str(exc).strip().splitlines() or ["unknown error"])[-1][:200]
            raise DgkitError(f"OpenVINO cannot read {path} ({text})") from exc
        check_contract(path, self.meta, [i.get_any_name() for i in model.inputs],
                       [name for o in model.outputs for name in o.get_names()],
                       [d.get_length() if d.is_static else None
                        for d in model.inputs[0].get_partial_shape()[2:]])
        self._half = model.inputs[0].get_element_type() == ov.Type.f16
        config = {"INFERENCE_NUM_THREADS": threads or physical_cores(), "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        compiled = core.compile_model(model, "CPU", config)
        self._request = compiled.create_infer_request()
        self._output = compiled.output(OUTPUT_NAME)
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._half:
            batch = batch.astype(np.float16)
        with self._lock:
            self._request.infer({INPUT_NAME: batch})
            logits = self._request.get_tensor(self._output).data.copy()
        return logits.astype(np.float32, copy=False)
