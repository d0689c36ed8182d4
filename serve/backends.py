"""Inference backends: onnxruntime (CPU, CUDA or TensorRT provider), OpenVINO (CPU, the
`openvino` extra) and plain TensorRT engines.

Each runner turns a float32 NCHW batch into float32 logits [N, C]; everything else (decoding,
softmax, top-k) lives in the predictor so that every backend sees the same inputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from dgkit.errors import DgkitError
from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME, ModelMeta

log = logging.getLogger("dgkit.serve")

BACKENDS = ("auto", "tensorrt", "ort-trt", "ort-cuda", "ort-cpu", "openvino")
_PROVIDER = {
    "ort-trt": "TensorrtExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-cpu": "CPUExecutionProvider",
}


class Runner(Protocol):
    name: str  # the backend that actually runs, e.g. "ort-cpu"
    meta: ModelMeta

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads share one core's arithmetic units."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
            cores.add(topo.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    count = len(cores)
    try:  # a container's CPU quota (cgroup v2), e.g. "200000 100000" = 2 cores
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def both_onnxruntimes() -> bool:
    """True when pip installed the CPU and the GPU onnxruntime side by side (dgkit[gpu] adds
    the second beside the first): one package directory, and no CUDA provider."""
    import importlib.metadata

    found = 0
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
            found += 1
        except importlib.metadata.PackageNotFoundError:
            pass
    return found == 2


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise DgkitError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    return backend


def check_contract(path: Path, meta: ModelMeta, inputs: list[str], outputs: list[str],
                   hw: list) -> None:
    """Refuse a model whose input and output names, or whose fixed input height and width (`hw`:
    ints where fixed), break the dgkit contract its metadata `meta` states."""
    if inputs[:1] != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise DgkitError(f"{path} has inputs {inputs} and outputs {outputs}, not the dgkit "
                         f"'{INPUT_NAME}' -> '{OUTPUT_NAME}' contract")
    size = meta.preprocess.input_size
    if all(isinstance(d, int) for d in hw) and list(hw) != [size, size]:
        raise DgkitError(f"{path} takes {hw[0]}x{hw[1]} images but its metadata says "
                         f"input_size {size}")


def onnx_runner(path: Path, backend: str, threads: int | None = None) -> Runner:
    """The runner for an ONNX file: OpenVINO only when asked for by name (faster for INT8 on an
    idle CPU, up to 4x slower on a busy one: BENCHMARKS.md, "CPU runtimes"), else onnxruntime
    (`auto`: its CUDA provider when it has one, else the CPU)."""
    if backend == "openvino":
        from dgkit.serve.openvino_backend import OpenVINORunner

        return OpenVINORunner(path, threads)
    return OrtRunner(path, backend, threads)


class OrtRunner:
    """An onnxruntime session; `InferenceSession.run` is thread-safe, so no lock is needed."""

    def __init__(self, path: Path, backend: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        if backend == "openvino":  # a caller that should have asked onnx_runner
            raise DgkitError("backend 'openvino' is run by OpenVINORunner, not onnxruntime "
                             "(dgkit.serve.backends.onnx_runner picks the runner)")
        available = ort.get_available_providers()
        if backend == "auto":
            # The CUDA provider starts in seconds; the TensorRT provider builds an engine first,
            # which can take minutes, so it is used only when asked for by name.
            backend = "ort-cuda" if "CUDAExecutionProvider" in available else "ort-cpu"
            asked = False
        else:
            asked = True
        provider = _PROVIDER[backend]
        if provider not in available:
            if both_onnxruntimes():
                raise DgkitError(f"backend '{backend}' needs onnxruntime's {provider}, but "
                                 "onnxruntime and onnxruntime-gpu are both installed, and "
                                 "together they offer only the CPU (microsoft/onnxruntime"
                                 "#26996); keep one: pip uninstall -y onnxruntime "
                                 "onnxruntime-gpu && pip install onnxruntime-gpu")
            raise DgkitError(f"backend '{backend}' needs onnxruntime's {provider}, which this "
                             f"onnxruntime lacks (install dgkit[gpu]); it has: "
                             f"{', '.join(available)}")
        providers: list = [provider]
        if backend == "ort-trt":
            cache = Path.home() / ".cache" / "dgkit" / "ort-trt"
            providers = [(provider, {"trt_engine_cache_enable": True,
                                     "trt_engine_cache_path": str(cache)}),
                         "CUDAExecutionProvider"]
        if backend != "ort-cpu":
            providers.append("CPUExecutionProvider")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would keep cores busy between calls and slow the image decoding that
        # runs between them (on a 2-core box it doubled predict's batch-1 time).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # provider fallbacks are reported below, in one line
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:<reason>"
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = text.split(" : ")[-1].split("failed:", 1)[-1].strip().rstrip(".")[:200]
            raise DgkitError(f"{path} is not a loadable ONNX model ({reason})") from exc

        used = self.session.get_providers()[0]
        if used != provider:
            if asked:
                raise DgkitError(f"backend '{backend}' was asked for but onnxruntime could not "
                                 f"start {provider} (no usable GPU or CUDA libraries?)")
            log.warning("onnxruntime could not start %s; running on the CPU", provider)
            backend = "ort-cpu"
        self.name = backend
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = ModelMeta.from_props(props, source=str(path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        check_contract(path, self.meta, [i.name for i in inputs], [o.name for o in outputs],
                       inputs[0].shape[2:])
        self._half = inputs[0].type == "tensor(float16)"  # fp16 export without float32 IO
        self._outputs = [OUTPUT_NAME]

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._half:
            batch = batch.astype(np.float16)
        logits = self.session.run(self._outputs, {INPUT_NAME: batch})[0]
        return logits.astype(np.float32, copy=False)
