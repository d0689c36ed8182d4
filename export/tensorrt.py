"""TensorRT engine build from a dgkit ONNX file (FP16, or symmetric-INT8 QDQ), through the
TensorRT Python API, following NVIDIA's "build phase" recipe:

builder -> network (strongly typed: every tensor takes the precision the ONNX graph gives it,
so the FP16 graph runs in FP16 and the QDQ graph in INT8; TensorRT 11 removed the FP16/INT8
builder flags and the implicit calibrators) -> OnnxParser -> builder config with one
optimisation profile (batch 1..max_batch) and a timing cache -> serialized engine.

The engine is written with a sidecar `<engine>.json` that the serve runtime checks before it
deserializes anything: TensorRT version, GPU name and compute capability, and the ONNX metadata.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dgkit.atomic import write_atomic, write_json
from dgkit.errors import DgkitError
from dgkit.model_meta import INPUT_NAME


def unavailable() -> str | None:
    """Why no engine can be built here (one sentence), or None when one can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'dgkit[trt]')"
    from dgkit.serve.tensorrt_backend import cuda_gpu

    if cuda_gpu() is None:
        return "no CUDA GPU is visible (or cuda-python is not installed)"
    return None


def _network_flags(trt: Any) -> tuple[int, bool]:
    """Creation flags, and whether the network is strongly typed. TensorRT 9-10 need the
    STRONGLY_TYPED flag; 11 keeps it (ignored: always strongly typed); 8 has only
    EXPLICIT_BATCH and takes reduced precision from builder flags."""
    flags = trt.NetworkDefinitionCreationFlag
    if hasattr(flags, "STRONGLY_TYPED"):
        return 1 << int(flags.STRONGLY_TYPED), True
    if hasattr(flags, "EXPLICIT_BATCH") and hasattr(trt.BuilderFlag, "INT8"):
        return 1 << int(flags.EXPLICIT_BATCH), False
    return 0, True


def build_engine(onnx_path: Path, engine_path: Path, metadata: dict[str, str], max_batch: int,
                 timing_cache: Path, precision: str) -> dict[str, Any]:
    """Build `engine_path` and its sidecar from `onnx_path`; returns the sidecar."""
    import tensorrt as trt

    from dgkit.serve.tensorrt_backend import cuda_gpu, sidecar_path

    gpu = cuda_gpu()
    if gpu is None:
        raise DgkitError("no CUDA GPU is visible, so no TensorRT engine can be built")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DgkitError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")

    config = builder.create_builder_config()
    if not strongly_typed:  # TensorRT 8: let the QDQ / FP16 graph use its reduced precision
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    shape = tuple(network.get_input(0).shape)  # (-1, 3, S, S)
    chw = tuple(int(d) for d in shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *chw), (max(1, max_batch // 2), *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DgkitError(f"TensorRT could not build an engine from {onnx_path.name} "
                         "(its log above says why)")
    write_atomic(engine_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    updated = config.get_timing_cache()  # the build adds the layers it timed
    write_atomic(timing_cache, lambda tmp: tmp.write_bytes(bytes(updated.serialize())))
    sidecar = {"tensorrt_version": trt.__version__, "gpu_name": gpu[0],
               "compute_capability": gpu[1], "metadata": metadata}
    write_json(sidecar_path(engine_path), sidecar)
    return sidecar
