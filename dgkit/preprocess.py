"""Image decoding and the preprocessing spec shared by training, validation and the edge runtime.

Imports no torch: `dgkit.serve` runs on a box that only has numpy, pillow and onnxruntime.
Normalisation lives inside each exported graph, so this module only decodes, resizes and crops.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dgkit.errors import DgkitError

# Largest image we decode; beyond it PIL would allocate gigabytes (20000x20000 RGB is 1.2 GB).
MAX_PIXELS = 80_000_000
# The files every stage treats as images (training data, serve folders, demo examples).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff"})

# Largest input or resize size a model may ask for; beyond it the metadata is broken.
MAX_SIZE = 4096

ImageSource = str | Path | bytes | Image.Image | np.ndarray


class ImageError(DgkitError):
    """An image that cannot be decoded; the message says which one and why."""


class ImageTooLarge(ImageError):
    """An image whose decoded size is over a pixel limit; the message gives size and limit."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`, scale to [0, 1]."""

    input_size: int = 224
    resize_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def draft_size(self) -> int:
        """The size a large JPEG may be decoded down to: the resize needs no more."""
        return self.resize_size

    def to_metadata(self) -> dict[str, str]:
        return {
            "input_size": str(self.input_size),
            "resize_size": str(self.resize_size),
            "resize": "shorter_side_then_center_crop",
            "interpolation": self.interpolation,
            "input_range": "float32 RGB in [0, 1], NCHW; normalisation is inside the graph",
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> PreprocessSpec:
        """The spec an exported model carries; `source` names the model in messages."""
        try:
            spec = cls(
                input_size=int(meta["input_size"]),
                resize_size=int(meta["resize_size"]),
                interpolation=meta.get("interpolation", "bilinear"),
                mean=tuple(json.loads(meta["mean"])),
                std=tuple(json.loads(meta["std"])),
            )
        except KeyError as exc:
            raise DgkitError(f"{source} has broken dgkit metadata (no {exc})") from exc
        except (TypeError, ValueError) as exc:
            raise DgkitError(f"{source} has broken dgkit metadata ({exc})") from exc
        if spec.interpolation not in _RESAMPLE:
            raise DgkitError(f"{source} has broken dgkit metadata: interpolation "
                             f"'{spec.interpolation}' is not one of: {', '.join(_RESAMPLE)}")
        for name in ("input_size", "resize_size"):
            if not 1 <= getattr(spec, name) <= MAX_SIZE:
                raise DgkitError(f"{source} has broken dgkit metadata: {name} "
                                 f"{getattr(spec, name)} is not between 1 and {MAX_SIZE}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (grayscale, 16-bit, CMYK, palette, alpha) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, as on the page the image was drawn for.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(source: ImageSource, draft_size: int | None = None,
                 name: str | None = None) -> Image.Image:
    """Decode a path, bytes, PIL image or HxW[x3|4] uint8 array into an RGB PIL image.

    `draft_size` lets JPEG decode at a reduced scale when the image is far larger than needed;
    `name` stands for the image in error messages (default: its path).
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or min(source.shape[:2]) < 1:
            raise ImageError(f"array of shape {source.shape} and dtype {source.dtype} is not an "
                             "HxW or HxWxC uint8 image")
        return _to_rgb(Image.fromarray(source))
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source) or source)
    name = name or _name(source)
    img = open_image(source, draft_size, name=name)
    with _decoding(name):
        img.load()
        img = ImageOps.exif_transpose(img) or img
    return _to_rgb(img)


def open_image(source: str | Path | bytes, draft_size: int | None = None,
               max_pixels: int = MAX_PIXELS, limit_hint: str = "",
               name: str | None = None) -> Image.Image:
    """Read an image file's header only: the result knows its format and the size it will decode
    to (a JPEG's reduced by `draft_size`) and holds no pixels yet.

    Raises ImageTooLarge when that size is over `max_pixels` (`limit_hint` ends the message),
    ImageError when the file is unreadable or not an image; both name `name` (default: the path).
    """
    name = name or _name(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    limit = f"the {max_pixels / 1e6:g}-megapixel limit{limit_hint}"
    try:
        with _decoding(name), warnings.catch_warnings():
            # PIL warns from the header size, before a JPEG draft shrinks it; the check below is
            # on the size actually decoded, and stricter than PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
    except ImageTooLarge as exc:  # over twice PIL's limit: PIL refuses to open it at all
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise ImageTooLarge(f"{name} is too large: over {bomb:.0f} megapixels, above {limit}"
                            ) from exc
    if img.width * img.height > max_pixels:
        decoded = f" (decoded at {img.width}x{img.height})" if img.size != (width, height) else ""
        raise ImageTooLarge(f"{name} is {width}x{height} pixels{decoded}, "
                            f"{img.width * img.height / 1e6:.1f} megapixels, over {limit}")
    return img


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turn what PIL raises for a broken or oversized file into one ImageError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name} is too large to decode safely ({exc})") from exc
    except Exception as exc:  # broken files raise OSError, EOFError, struct.error, IndexError...
        reason = "not an image" if isinstance(exc, Image.UnidentifiedImageError) else (
            str(exc) or type(exc).__name__)
        raise ImageError(f"{name} cannot be decoded: {reason}") from exc


def prepare(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side, centre-crop, and return HxWx3 uint8."""
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(spec.input_size, round(w * scale)), max(spec.input_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    left, top = (new_w - spec.input_size) // 2, (new_h - spec.input_size) // 2
    img = img.crop((left, top, left + spec.input_size, top + spec.input_size))
    return np.asarray(img, dtype=np.uint8)


def load_prepared(source: ImageSource, spec: PreprocessSpec, name: str | None = None
                  ) -> np.ndarray:
    """Decode and prepare one image: the single preprocessing path of train, validate and serve."""
    return prepare(decode_image(source, draft_size=spec.draft_size, name=name), spec)


def to_model_input(batch: np.ndarray) -> np.ndarray:
    """NxHxWx3 uint8 to Nx3xHxW float32 in [0, 1], the exported models' input."""
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
