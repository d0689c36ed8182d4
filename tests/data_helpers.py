"""Domain datasets with chosen image counts: `<root>/<domain>/<class>/<n>.png`, 2 px each."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

Counts = dict[str, dict[str, int]]  # domain -> class -> images written


def write_dataset(root: Path, counts: Counts) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 60)).save(buf, format="PNG")
    for domain, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(buf.getvalue())
    return root
