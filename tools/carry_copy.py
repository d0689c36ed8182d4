"""A copy of a domain dataset small enough to carry to a lent GPU machine, in parts.

Images whose three channels are equal (PACS's sketches) become lossless greyscale PNG; the
others JPEG at --quality. --size resizes (the 128 px copy); without it the resolution stays.
Whole domains are then packed into parts of at most --part-mb megabytes each (largest first,
first part that fits), one folder per part: DEST/part0/NAME/<domain>/<class>/<image>, ...
Each part travels in its own call; copied into one folder on the machine, they are the dataset.

    python tools/carry_copy.py ../shared/datasets/PACS gpu_data --quality 85 --part-mb 45
"""

from __future__ import annotations

import argparse
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.data import discover  # noqa: E402
from dgkit.errors import DgkitError  # noqa: E402


def encode(job: tuple[Path, Path, int, int | None]) -> int:
    """Write one image; returns its size in bytes."""
    source, out, quality, size = job
    try:
        image = Image.open(source).convert("RGB")
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DgkitError(f"{source} cannot be read as an image ({exc})") from None
    if size:
        image = image.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (pixels == pixels[..., :1]).all():
        out = out.with_suffix(".png")
        image.convert("L").save(out, optimize=True)
    else:
        out = out.with_suffix(".jpg")
        image.save(out, quality=quality)
    return out.stat().st_size


def pack(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Domains into parts of at most `limit` bytes: largest first, into the first that fits."""
    parts: list[list[str]] = []
    room: list[int] = []
    for domain in sorted(sizes, key=sizes.get, reverse=True):
        if sizes[domain] > limit:
            raise DgkitError(f"domain {domain} alone is {sizes[domain] / 1e6:.3g} MB, over "
                             f"--part-mb {limit / 1e6:g}; lower --quality or pass --size")
        fit = next((i for i, r in enumerate(room) if r >= sizes[domain]), None)
        if fit is None:
            parts.append([])
            room.append(limit)
            fit = len(parts) - 1
        parts[fit].append(domain)
        room[fit] -= sizes[domain]
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="dataset root: <domain>/<class>/<image>")
    parser.add_argument("dest", type=Path, help="new folder for the parts")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    parser.add_argument("--size", type=int, help="resize to SIZE x SIZE (default: keep)")
    parser.add_argument("--part-mb", type=float, default=45.0,
                        help="most megabytes per part (default 45)")
    args = parser.parse_args()
    if args.dest.exists():
        print(f"error: {args.dest} already exists; pass a new folder", file=sys.stderr)
        return 1
    try:
        data = discover(args.source)
        staging = args.dest / "all" / args.source.resolve().name
        jobs = [(s.path, staging / s.path.relative_to(data.root), args.quality, args.size)
                for s in data.samples]
        with ProcessPoolExecutor() as pool:
            written = list(pool.map(encode, jobs, chunksize=64))
        sizes: dict[str, int] = {}
        for sample, n in zip(data.samples, written, strict=True):
            domain = data.domains[sample.domain]
            sizes[domain] = sizes.get(domain, 0) + n
        parts = pack(sizes, int(args.part_mb * 1e6))
    except DgkitError as exc:
        shutil.rmtree(args.dest, ignore_errors=True)  # made by this run, half written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for i, domains in enumerate(parts):
        for domain in domains:
            target = args.dest / f"part{i}" / staging.name / domain
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging / domain, target)
        total = sum(sizes[d] for d in domains) / 1e6
        print(f"{args.dest / f'part{i}'}: {', '.join(domains)} ({total:.1f} MB)")
    shutil.rmtree(args.dest / "all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
