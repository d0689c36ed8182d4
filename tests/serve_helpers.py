"""Fixtures for the dgkit.serve tests: a tiny real ONNX classifier built without torch, its numpy
twin, odd images, and a stand-alone CLI that wires `dgkit.serve.commands.register`.

Run as a script (`python tests/serve_helpers.py serve MODEL ...`) it is that CLI, so the server
tests work whether or not the main `dgkit` CLI exists yet.
"""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dgkit.errors import DgkitError
from dgkit.model_meta import ModelMeta
from dgkit.preprocess import PreprocessSpec
from dgkit.serve.bench import free_port  # noqa: F401  (the tests' one free-port helper)

# The import names of the 'serve' extra (fastapi, uvicorn, python-multipart, prometheus_client).
SERVE_EXTRA = ("fastapi", "uvicorn", "multipart", "prometheus_client")
SERVE_EXTRA_MISSING = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
needs_serve_extra = pytest.mark.skipif(
    bool(SERVE_EXTRA_MISSING),
    reason=f"needs the 'serve' extra ({', '.join(SERVE_EXTRA_MISSING)} not installed): "
           "pip install 'dgkit[serve]'")

CLASSES = ["bird", "cat", "dog", "fish", "horse"]
SPEC = PreprocessSpec(input_size=32, resize_size=36)
HIDDEN = 8


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "mean": np.array(SPEC.mean, np.float32).reshape(1, 3, 1, 1),
        "std": np.array(SPEC.std, np.float32).reshape(1, 3, 1, 1),
        "conv_w": rng.normal(0, 0.5, (HIDDEN, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(0, 0.1, HIDDEN).astype(np.float32),
        "fc_w": rng.normal(0, 2.0, (len(CLASSES), HIDDEN)).astype(np.float32),
    }
    # ReLU features rise together with contrast; rows summing to zero and logits centred on a
    # mid-grey image keep that common rise from making one class win for every picture.
    w["fc_w"] -= w["fc_w"].mean(axis=1, keepdims=True)
    grey = features(np.full((1, 3, SPEC.input_size, SPEC.input_size), 0.5), w)
    w["fc_b"] = (-grey @ w["fc_w"].T.astype(np.float64))[0].astype(np.float32)
    return w


def make_model(path: Path, weights: dict[str, np.ndarray] | None = None, meta: bool = True,
               precision: str = "fp32") -> dict[str, np.ndarray]:
    """image [N,3,32,32] -> (x-mean)/std -> Conv3x3 -> Relu -> GAP -> Flatten -> Gemm -> logits."""
    w = weights or make_weights()
    size = SPEC.input_size
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Conv", ["normed", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_dgkit",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime dgkit supports
    if meta:
        props = ModelMeta(classes=CLASSES, prompt_names=[c.title() for c in CLASSES],
                          preprocess=SPEC, precision=precision, student="tiny").to_props()
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def reference_logits(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The same graph in float64 numpy: NCHW [0,1] -> logits."""
    return features(x, w) @ w["fc_w"].T.astype(np.float64) + w["fc_b"]


def features(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """Normalise, Conv3x3, ReLU, global average pool: [N, HIDDEN] in float64."""
    x = (x.astype(np.float64) - w["mean"]) / w["std"]
    n, _, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, HIDDEN, h, wd))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + wd],
                              w["conv_w"][:, :, i, j].astype(np.float64))
    conv += w["conv_b"][None, :, None, None]
    return np.maximum(conv, 0).mean(axis=(2, 3))


def photo(seed: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A smooth random RGB image (smooth so that JPEG and resizing keep it recognisable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path: Path, side: int = 20000) -> None:
    """A valid side x side 1-bit PNG written row by row: ~50 KB on disk, no big allocation."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed black pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))


def cli_app() -> typer.Typer:
    """The serve commands on a fresh Typer app, as the main CLI wires them."""
    from dgkit.serve.commands import register

    app, bench = typer.Typer(), typer.Typer()
    register(app, bench)
    app.add_typer(bench, name="bench")
    return app


def main() -> None:
    try:
        cli_app()()
    except DgkitError as exc:  # what the main CLI does with user errors
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
