"""dgkit.serve: the torch-free edge runtime (numpy, pillow, onnxruntime; TensorRT if present).

`Predictor` is imported lazily so that `dgkit.serve.commands`, which every CLI start imports,
does not pull in numpy or onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "Prediction", "Predictor"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "Prediction"):
        from dgkit.serve import predictor

        return getattr(predictor, name)
    if name == "BACKENDS":
        from dgkit.serve.backends import BACKENDS

        return BACKENDS
    raise AttributeError(f"module 'dgkit.serve' has no attribute '{name}'")
