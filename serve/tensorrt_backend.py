"""TensorRT 10 engines (`model.<precision>.plan` plus its `.plan.json` sidecar).

`tensorrt` and cuda-python are imported lazily: the edge box may have neither, and the sidecar
checks below are plain Python so that a mismatched engine fails with one sentence before
TensorRT prints pages of deserialisation errors.
"""

from __future__ import annotations

import json
import threading
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.errors import DgkitError
from dgkit.model_meta import INPUT_NAME, OUTPUT_NAME, ModelMeta


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DgkitError(f"TensorRT engine {engine} has no sidecar {path.name}; export the "
                         "engine again with dgkit export") from exc
    except (OSError, ValueError) as exc:
        raise DgkitError(f"cannot read the sidecar {path} of TensorRT engine {engine} "
                         f"({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("metadata"), dict):
        raise DgkitError(f"the sidecar {path} has no 'metadata' object; export the engine again")
    return info


def check_engine_fits(engine: Path, info: dict[str, Any], tensorrt_version: str,
                      gpu: tuple[str, str]) -> None:
    """Engines only run on the TensorRT version and GPU model that built them."""
    built_with = str(info.get("tensorrt_version"))
    if built_with != tensorrt_version:
        raise DgkitError(f"{engine} was built with TensorRT {built_with} but this machine has "
                         f"TensorRT {tensorrt_version}; rebuild the engine here with dgkit export")
    built_for = (str(info.get("gpu_name")), str(info.get("compute_capability")))
    if built_for != gpu:
        raise DgkitError(f"{engine} was built for a {built_for[0]} (compute capability "
                         f"{built_for[1]}) but this GPU is a {gpu[0]} (compute capability "
                         f"{gpu[1]}); rebuild the engine here with dgkit export")


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def _ok(cudart: Any, result: tuple) -> Any:
    """cuda-python returns (error, value...); turn a failure into one sentence."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1].decode()
        raise DgkitError(f"a CUDA call failed with {name}")
    return values[0] if len(values) == 1 else values


def cuda_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of the current CUDA device, or None without GPU/cuda-python."""
    cudart = _cudart()
    if cudart is None:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return None
    device = _ok(cudart, cudart.cudaGetDevice())
    prop = _ok(cudart, cudart.cudaGetDeviceProperties(device))
    name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}.{prop.minor}"


class TensorRTRunner:
    """One execution context with device buffers sized for the engine's largest batch."""

    name = "tensorrt"

    def __init__(self, path: Path) -> None:
        info = read_sidecar(path)
        self.meta = ModelMeta.from_props(info["metadata"], source=str(path))
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise DgkitError(f"{path} is a TensorRT engine but the tensorrt package is not "
                             "installed; pip install 'dgkit[trt]' or load the .onnx model") from exc
        cudart = _cudart()
        if cudart is None:
            raise DgkitError(f"{path} is a TensorRT engine and needs cuda-python; pip install "
                             "cuda-python or load the .onnx model")
        gpu = cuda_gpu()
        if gpu is None:
            raise DgkitError(f"{path} is a TensorRT engine but no CUDA GPU is visible")
        check_engine_fits(path, info, trt.__version__, gpu)

        self._cudart = cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise DgkitError(f"TensorRT could not deserialize {path} (its log above says why)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise DgkitError(f"{path} has tensors {names}, not the dgkit '{INPUT_NAME}' -> "
                             f"'{OUTPUT_NAME}' contract")
        self._context = self._engine.create_execution_context()

        in_shape = tuple(self._engine.get_tensor_shape(INPUT_NAME))
        self._dynamic = in_shape[0] == -1
        if self._dynamic:  # largest shape of optimisation profile 0
            max_shape = tuple(self._engine.get_tensor_profile_shape(INPUT_NAME, 0)[2])
        else:
            max_shape = in_shape
        self.max_batch = int(max_shape[0])
        self._chw = tuple(int(d) for d in max_shape[1:])
        self._classes = int(self._engine.get_tensor_shape(OUTPUT_NAME)[-1])
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(INPUT_NAME)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(OUTPUT_NAME)))

        self._stream = _ok(cudart, cudart.cudaStreamCreate())
        self._d_in = _ok(cudart, cudart.cudaMalloc(
            self.max_batch * prod(self._chw) * self._in_dtype.itemsize))
        self._d_out = _ok(cudart, cudart.cudaMalloc(
            self.max_batch * self._classes * self._out_dtype.itemsize))
        self._context.set_tensor_address(INPUT_NAME, int(self._d_in))
        self._context.set_tensor_address(OUTPUT_NAME, int(self._d_out))
        self._lock = threading.Lock()  # one context and one set of buffers: one call at a time
        self._path = path

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        out = np.empty((batch.shape[0], self._classes), dtype=self._out_dtype)
        for start in range(0, batch.shape[0], self.max_batch):
            chunk = np.ascontiguousarray(batch[start:start + self.max_batch], dtype=self._in_dtype)
            rows = chunk.shape[0]
            if not self._dynamic and rows < self.max_batch:  # a fixed-batch engine: pad
                pad = np.zeros((self.max_batch - rows, *chunk.shape[1:]), dtype=self._in_dtype)
                chunk = np.concatenate([chunk, pad])
            target = out[start:start + rows]
            with self._lock:
                if self._dynamic and not self._context.set_input_shape(INPUT_NAME, chunk.shape):
                    raise DgkitError(f"{self._path} does not accept input shape {chunk.shape}")
                _ok(cudart, cudart.cudaMemcpyAsync(self._d_in, chunk.ctypes.data, chunk.nbytes,
                                                   h2d, self._stream))
                if not self._context.execute_async_v3(int(self._stream)):
                    raise DgkitError(f"TensorRT failed to run {self._path}")
                _ok(cudart, cudart.cudaMemcpyAsync(target.ctypes.data, self._d_out,
                                                   target.nbytes, d2h, self._stream))
                _ok(cudart, cudart.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free the device buffers; the runner cannot run afterwards."""
        with self._lock:
            if self._d_in:
                self._cudart.cudaFree(self._d_in)
                self._cudart.cudaFree(self._d_out)
                self._cudart.cudaStreamDestroy(self._stream)
                self._d_in = self._d_out = 0
