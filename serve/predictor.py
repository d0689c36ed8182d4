"""Predictor: a dgkit model (ONNX or TensorRT engine) plus the preprocessing its metadata names.

Preprocessing always goes through `dgkit.preprocess`, read from the model's own metadata, so the
edge runtime cannot drift from training. No per-call state is kept on the instance, which makes
`predict` safe to call from several threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dgkit.errors import DgkitError
from dgkit.model_meta import ModelMeta
from dgkit.preprocess import MAX_PIXELS, ImageSource, load_prepared, open_image, to_model_input
from dgkit.serve.backends import Runner, check_backend, onnx_runner

log = logging.getLogger("dgkit.serve")


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most likely first."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    indices: tuple[int, ...]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def to_dict(self) -> dict[str, Any]:
        pairs = zip(self.labels, self.probs, strict=True)
        return {"label": self.label, "prob": self.prob,
                "top_k": [{"label": lab, "prob": p} for lab, p in pairs]}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so that probabilities sum to 1 to float precision."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_predictions(probs: np.ndarray, k: int, classes: list[str]) -> list[Prediction]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [Prediction(labels=tuple(classes[i] for i in row),
                       probs=tuple(float(p) for p in probs[n, row]),
                       indices=tuple(int(i) for i in row))
            for n, row in enumerate(order)]


def _as_list(images: ImageSource | Iterable[ImageSource]) -> list[ImageSource]:
    if isinstance(images, (str, Path, bytes, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]  # NHWC batch or one image
    return list(images)


class WrongCpu(DgkitError):
    """An INT8 model made for another kind of CPU, whose answers would be wrong on this one."""

    def __init__(self, message: str, meta: ModelMeta) -> None:
        super().__init__(message)
        self.meta = meta


def _check_cpu(path: Path, meta: ModelMeta, any_cpu: bool) -> None:
    from dgkit.cpu import mismatch, native_flavour

    reason = mismatch(meta.precision)
    if reason is None:
        return
    sentence = (f"{path.name} should not run on this CPU: {reason}; export one for it with "
                f"dgkit export RUN --int8 --cpu {native_flavour()}")
    if not any_cpu:
        raise WrongCpu(f"{sentence} (or pass --any-cpu to run it anyway)", meta)
    log.warning(sentence)


class Predictor:
    """Load a dgkit `.onnx` or TensorRT `.plan` and classify images with it.

    backend: auto | tensorrt | ort-trt | ort-cuda | ort-cpu | openvino. `auto` takes TensorRT for
    a `.plan`, else onnxruntime's CUDA provider when onnxruntime-gpu is present, else the CPU
    (OpenVINO only by name); the choice is in `self.backend` and logged. `threads` sets the
    runtime's threads (default: the physical cores). An INT8 model made for another kind of
    CPU than this one (`dgkit export --cpu`), whose answers would be wrong here, is refused
    unless `any_cpu`, which runs it with a warning.
    """

    def __init__(self, path: str | Path, backend: str = "auto", threads: int | None = None,
                 any_cpu: bool = False):
        check_backend(backend)
        path = Path(path).expanduser()
        if not path.exists():
            raise DgkitError(f"model file {path} does not exist")
        if not path.is_file():
            raise DgkitError(f"model path {path} is not a file")
        runner: Runner
        if path.suffix == ".plan":
            if backend not in ("auto", "tensorrt"):
                raise DgkitError(f"{path} is a TensorRT engine, which only the 'tensorrt' backend "
                                 f"runs, not '{backend}'")
            from dgkit.serve.tensorrt_backend import TensorRTRunner

            runner = TensorRTRunner(path)
        else:
            if backend == "tensorrt":
                raise DgkitError(f"backend 'tensorrt' runs TensorRT engines (.plan) and {path} is "
                                 "not one; build an engine with dgkit export or use 'ort-trt'")
            runner = onnx_runner(path, backend, threads)
        if runner.name in ("ort-cpu", "openvino"):  # both CPU int8 kernels
            _check_cpu(path, runner.meta, any_cpu)
        self.path = path
        self.meta = runner.meta
        self.spec = runner.meta.preprocess
        self.classes = list(runner.meta.classes)
        self.backend = runner.name
        self._runner = runner
        log.info("%s runs on backend %s", path.name, self.backend)

    def prepare(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        """Decode, resize and crop one image to HxWx3 uint8, as training did; errors name `name`
        (default: the path)."""
        return load_prepared(source, self.spec, name)

    def decoded_pixels(self, data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                       limit_hint: str = "") -> int:
        """The pixels `prepare` would decode, read from the file's header alone.

        Raises ImageTooLarge over `max_pixels`, ImageError for a broken file; both name `name`.
        """
        img = open_image(data, self.spec.draft_size, max_pixels, limit_hint, name)
        return img.width * img.height

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] in [0, 1] -> float32 logits [N, C]."""
        return self._runner.run(batch)

    def predict_prepared(self, images: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """NxHxWx3 uint8 images (from `prepare`) -> top-k predictions."""
        return self.top_k(self.run_batch(to_model_input(images)), top_k)

    def top_k(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Logits [N, C] from `run_batch` -> top-k predictions."""
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise DgkitError(f"{self.path} returned logits of shape {logits.shape} but its "
                             f"metadata lists {len(self.classes)} classes")
        k = max(1, min(top_k, len(self.classes)))
        return top_predictions(softmax(logits), k, self.classes)

    def predict(self, images: ImageSource | Iterable[ImageSource], top_k: int = 5,
                batch_size: int = 32) -> list[Prediction]:
        """Classify paths, bytes, PIL images or HxWx3 uint8 arrays; always returns a list.

        Raises ImageError (naming the image) for one that cannot be decoded.
        """
        if top_k < 1 or batch_size < 1:
            raise DgkitError(f"top_k ({top_k}) and batch_size ({batch_size}) must be at least 1")
        items = _as_list(images)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            prepared = [self.prepare(s) for s in items[start:start + batch_size]]
            batch = prepared[0][None] if len(prepared) == 1 else np.stack(prepared)
            results.extend(self.predict_prepared(batch, top_k))
        return results

    def describe(self) -> dict[str, Any]:
        """What `GET /model` reports."""
        m = self.meta
        return {"model": self.path.name, "backend": self.backend, "precision": m.precision,
                "classes": m.classes, "prompt_names": m.prompt_names,
                "input_size": self.spec.input_size, "resize_size": self.spec.resize_size,
                "interpolation": self.spec.interpolation, "student": m.student,
                "method": m.method, "run_id": m.run_id, "target_domains": list(m.target_domains)}
