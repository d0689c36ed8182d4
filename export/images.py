"""The images export and validate use: validation sets (target domains and the source-validation
split, decoded once) and calibration images (source-domain training split only), all through
`dgkit.data` / `dgkit.preprocess`, the one preprocessing path of train, validate and serve.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape

from dgkit.atomic import atomic_path
from dgkit.data import Decoded, DomainData, decode_samples, discover, split_sources
from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec
from dgkit.progress import console

if TYPE_CHECKING:  # dgkit.pixel_store needs fcntl: imported where a store is used
    from dgkit.pixel_store import PixelStore, StoreView

SOURCE_VAL = "source_val"
MIN_CALIB_IMAGES = 32


@dataclass
class EvalSet:
    name: str  # a target domain, or "source_val"
    is_target: bool
    # N x S x S x 3 uint8, prepared: in memory, or read from the data's pixel store batch by
    # batch (a held-out domain of a large data set may not fit in memory).
    pixels: np.ndarray | StoreView
    labels: np.ndarray  # class indices in the model's class order


def load_data(root: str | Path, domains: Sequence[str], classes: Sequence[str]) -> DomainData:
    """Discover `root` and check that it has `domains` and only classes the model knows."""
    data = discover(root)
    missing = [d for d in domains if d not in data.domains]
    if missing:
        raise DgkitError(f"domain '{missing[0]}' is absent from the data at {data.root} "
                         f"(its domains are: {', '.join(data.domains)}); pass --data with the "
                         "data the run was trained on")
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise DgkitError(f"class '{unknown[0]}' of {data.root} is not one of the model's classes "
                         f"({', '.join(classes)})")
    return data


def _subsample(rows: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, limit, replace=False))


def eval_sets(data: DomainData, classes: Sequence[str], targets: Sequence[str],
              sources: Sequence[str], seed: int, spec: PreprocessSpec,
              max_images: int | None = None) -> list[EvalSet]:
    """Each target domain in full and the sources' validation split (DomainBed, the seed of the
    run); `max_images` caps each set (a seeded subsample). Decoded once, in one pass; where a
    `--data-store disk` run left a pixel store, the sets are views of it, read when used."""
    groups: list[tuple[str, bool, np.ndarray]] = []
    for name in targets:
        d = data.domains.index(name)
        rows = np.array([i for i, s in enumerate(data.samples) if s.domain == d], dtype=np.int64)
        groups.append((name, True, _subsample(rows, max_images)))
    if sources:
        _, val = split_sources(data, [data.domains.index(s) for s in sources], seed)
        groups.append((SOURCE_VAL, False, _subsample(val, max_images)))
    groups = [g for g in groups if len(g[2])]
    if not groups:
        raise DgkitError(f"no validation images found under {data.root}")
    everything = np.concatenate([rows for _, _, rows in groups])
    store = _store_of(data, everything, spec, "validation images")
    if store is None:
        decoded = decode_samples(data, everything, spec, "Decoding validation images")
        indices, bad, pixels = decoded.indices, decoded.bad, decoded.pixels
    else:
        from dgkit.pixel_store import StoreView

        indices, bad, pixels = store.indices, store.bad, StoreView(store)
    for path, reason in bad[:5]:
        console.print(f"[yellow]warning: skipped {escape(str(path))}: {escape(reason)}")
    row_of = {int(i): k for k, i in enumerate(indices)}
    label_map = np.array([list(classes).index(c) for c in data.classes], dtype=np.int64)
    sets = []
    for name, is_target, rows in groups:
        keep = [row_of[int(i)] for i in rows if int(i) in row_of]
        labels = label_map[[data.samples[int(indices[k])].label for k in keep]]
        sets.append(EvalSet(name, is_target, pixels[keep], labels))
    return sets


def gather_rows(sets: Sequence[EvalSet], rows: np.ndarray) -> np.ndarray:
    """The images at `rows` of the sets laid end to end, in memory; a store's sets read only
    those rows."""
    out, start = [], 0
    for s in sets:
        mine = rows[(rows >= start) & (rows < start + len(s.pixels))] - start
        if len(mine):
            out.append(s.pixels[mine][:])
        start += len(s.pixels)
    return np.concatenate(out) if out else sets[0].pixels[:0]


def read_batches(pixels: np.ndarray | StoreView, size: int, depth: int = 4
                 ) -> Iterator[np.ndarray]:
    """`pixels` in consecutive batches of `size` images; a store's are read by a `Prefetcher`
    up to `depth` batches ahead of the one the caller works on."""
    starts = range(0, len(pixels), size)
    if isinstance(pixels, np.ndarray):
        for i in starts:
            yield pixels[i:i + size]
        return
    from dgkit.pixel_store import Prefetcher

    with Prefetcher(pixels.store.gather, [pixels.rows[i:i + size] for i in starts],
                    depth) as ahead:
        yield from ahead


def calibration_rows(data: DomainData, source_ids: Sequence[int], seed: int,
                     count: int) -> np.ndarray:
    """Up to `count` images of the sources' training split, balanced over (domain, class) cells:
    every cell gets an equal share, and what a small cell cannot fill goes to the others."""
    train, _ = split_sources(data, source_ids, seed)
    rng = np.random.default_rng(seed)
    cells: dict[tuple[int, int], list[int]] = {}
    for i in train:
        s = data.samples[int(i)]
        cells.setdefault((s.domain, s.label), []).append(int(i))
    pools = [rng.permutation(cells[k]) for k in sorted(cells)]
    quota = [0] * len(pools)
    left = min(count, len(train))
    while left > 0:
        open_cells = [k for k, p in enumerate(pools) if quota[k] < len(p)]
        share = max(1, left // len(open_cells))
        for k in open_cells:
            take = min(share, len(pools[k]) - quota[k], left)
            quota[k] += take
            left -= take
            if left == 0:
                break
    return np.sort(np.concatenate([p[:q] for p, q in zip(pools, quota, strict=True)]
                                  ).astype(np.int64))


def _cache_key(data: DomainData, rows: np.ndarray, spec: PreprocessSpec) -> str:
    """Changes whenever the images chosen, their files, or the preprocessing change."""
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for i in rows:
        path = data.samples[int(i)].path
        st = path.stat()
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def calibration_pixels(data: DomainData, source_names: Sequence[str], seed: int, count: int,
                       spec: PreprocessSpec, cache: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The calibration images (N x S x S x 3 uint8), read from `cache` when the run's split,
    the count and the preprocessing have not changed, else decoded and cached."""
    if count < MIN_CALIB_IMAGES:
        raise DgkitError(f"--calib-images {count} is too few: INT8 calibration needs at least "
                         f"{MIN_CALIB_IMAGES} images")
    source_ids = [data.domains.index(s) for s in source_names]
    rows = calibration_rows(data, source_ids, seed, count)
    if len(rows) < MIN_CALIB_IMAGES:
        raise DgkitError(f"the source domains' training split has only {len(rows)} images; "
                         f"INT8 calibration needs at least {MIN_CALIB_IMAGES}")
    if len(rows) < count:
        console.print(f"[yellow]warning: INT8 calibration takes {count} images (--calib-images), "
                      f"but the source domains' training split has only {len(rows)} images; "
                      "using all of them")
    key = _cache_key(data, rows, spec)
    info = {"images": int(len(rows)), "domains": list(source_names), "cached": False}
    if cache.is_file():
        try:
            with np.load(cache) as stored:
                if str(stored["key"]) == key:
                    return stored["pixels"], {**info, "cached": True}
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rebuilt
    decoded = read_or_decode(data, rows, spec, "calibration images")
    if decoded.bad:
        path, reason = decoded.bad[0]
        console.print(f"[yellow]warning: {len(decoded.bad)} calibration images skipped, e.g. "
                      f"{path}: {reason}")
    buf = io.BytesIO()
    np.savez(buf, pixels=decoded.pixels, key=np.array(key))
    with atomic_path(cache) as tmp:
        tmp.write_bytes(buf.getvalue())
    return decoded.pixels, info


def read_or_decode(data: DomainData, rows: np.ndarray, spec: PreprocessSpec, what: str
                   ) -> Decoded:
    """`decode_samples(data, rows, spec)`, read from the data's pixel store where a
    `--data-store disk` run left one (the same bytes, checked current; only these rows read),
    else decoded from the files."""
    store = _store_of(data, rows, spec, what)
    if store is None:
        return decode_samples(data, rows, spec, f"Decoding {what}")
    return Decoded(store.indices, store.gather(np.arange(len(store))), store.hashes, store.bad)


def _store_of(data: DomainData, rows: np.ndarray, spec: PreprocessSpec, what: str
              ) -> PixelStore | None:
    """The pixel store a `--data-store disk` run left for the data, opened for `rows` (checked
    current, images it lacks decoded into it), or None where there is none."""
    from dgkit.pixel_store import MANIFEST, open_store, store_folder

    folder = store_folder(data.root, spec)
    if not (folder / MANIFEST).is_file():
        return None
    store = open_store(data, rows, spec, folder, progress=f"Decoding {what} into the pixel store")
    console.print(f"{what}: read from the pixel store {folder}", markup=False, highlight=False)
    return store
