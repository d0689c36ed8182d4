"""The bounds `dgkit serve` puts on a request: bytes, decoded pixels, pixels in flight, time.

Light to import (the standard library and dgkit.errors): `dgkit.serve.commands`, which every CLI
start imports, takes its option defaults from `ServeLimits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from dgkit.errors import DgkitError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost. A decoded RGB image takes about 8 bytes a pixel at its peak
    (up to 20 with alpha), whatever its compressed size: a one-colour 8000x8000 PNG is 200 KB
    on the wire and half a gigabyte in memory, so pixels are counted from the headers before
    anything is decoded."""

    max_request_mb: float = 10.0
    # The model sees ~224 px, so more pixels only cost memory and time; 24 MP still takes a
    # 6000x4000 camera frame whole, and a JPEG decodes at 1/8 scale when that is enough.
    max_image_megapixels: float = 24.0
    # Four full-size frames per request: a few seconds of one core's time (decoding and
    # resizing take ~20 ms a megapixel for RGB, ~40 with alpha).
    max_request_megapixels: float = 96.0
    # Two full-size frames decoding at once across all requests: ~400 MB at the peak for RGB.
    max_inflight_megapixels: float = 48.0
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        from dgkit.preprocess import MAX_PIXELS  # numpy and PIL: not at CLI start

        for field in fields(self):
            value = getattr(self, field.name)
            if not (value > 0 and math.isfinite(value)):
                raise DgkitError(f"{flag(field.name)} must be a positive number, not {value}")
        image, inflight = flag("max_image_megapixels"), flag("max_inflight_megapixels")
        if self.max_image_megapixels > MAX_PIXELS / 1e6:
            raise DgkitError(f"{image} must be at most {MAX_PIXELS / 1e6:g} (the decoder's own "
                             f"limit), not {self.max_image_megapixels}")
        if self.max_inflight_megapixels < self.max_image_megapixels:
            raise DgkitError(f"{inflight} ({self.max_inflight_megapixels:g}) must be at least "
                             f"{image} ({self.max_image_megapixels:g}), or an image within the "
                             "limit could never be decoded")

    @property
    def max_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def image_pixels(self) -> int:
        return int(self.max_image_megapixels * 1e6)

    @property
    def request_pixels(self) -> int:
        return int(self.max_request_megapixels * 1e6)

    @property
    def inflight_pixels(self) -> int:
        return int(self.max_inflight_megapixels * 1e6)

    def to_dict(self) -> dict[str, Any]:
        """What `GET /model` reports under "limits"."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


def flag(name: str) -> str:
    """The `dgkit serve` option that sets field `name`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: requests that arrive within `max_delay_ms` of the first one waiting
    share one model call of up to `max_batch` images. 0 ms still batches the requests that
    queue while a call runs; `max_batch` 1 turns batching off."""

    max_batch: int = 32
    max_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise DgkitError(f"{flag('max_batch')} must be at least 1, not {self.max_batch}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise DgkitError(f"{flag('max_delay_ms')} must be between 0 and 10000, not "
                             f"{self.max_delay_ms}")

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}
