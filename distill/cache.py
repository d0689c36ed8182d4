"""Teacher embedding caches (safetensors) keyed by teacher id and image content hash.

A run keeps its cache in `RUN/cache/`; entries already computed by sibling runs (the other
folders beside it, such as an earlier method on the same data) are reused instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgkit.atomic import atomic_path
from dgkit.data import DomainData
from dgkit.distill import distributed
from dgkit.distill.data_store import DiskPixels, batches
from dgkit.pixel_store import Prefetcher
from dgkit.preprocess import PreprocessSpec, load_prepared
from dgkit.progress import track
from dgkit.rundir import RunDir


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _read(path: Path) -> tuple[torch.Tensor, list[str]]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("embeddings"), json.loads(fh.metadata()["keys"])


def _write(path: Path, embeddings: torch.Tensor, keys: list[str]) -> None:
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                  metadata={"keys": json.dumps(keys)})


def cached_rows(run: RunDir, name: str, keys: Sequence[str],
                compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Rows for `keys`, computing only those in no cache file called `name` (this run's first,
    then its siblings'); `compute(positions)` returns the rows for those positions of `keys`."""
    table: dict[str, torch.Tensor] = {}
    for path in [run.cache / name, *sorted(run.path.parent.glob(f"*/cache/{name}"))]:
        if path.is_file():
            emb, stored = _read(path)
            table.update({k: emb[i] for i, k in enumerate(stored) if k not in table})
    missing = [i for i, k in enumerate(keys) if k not in table]
    if missing:
        # Under torchrun each rank computes a shard; every rank ends with all rows.
        mine = missing[distributed.rank()::distributed.world()]
        shards = distributed.all_gather_object((mine, compute(mine).float().cpu()
                                                if mine else None))
        for positions, rows in shards:
            table.update({keys[i]: rows[j] for j, i in enumerate(positions)})
    ordered = list(dict.fromkeys(keys))
    out = torch.stack([table[k] for k in keys])
    own = run.cache / name
    if distributed.is_main() and (missing or not own.is_file()):
        _write(own, torch.stack([table[k] for k in ordered]), ordered)
    return out


def text_embeddings(teacher, run: RunDir, names: Sequence[str],
                    templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class text embeddings from the prompt ensemble, cached per teacher and prompts."""
    digest = hashlib.sha1(json.dumps([list(names), list(templates)]).encode()).hexdigest()[:12]
    name = f"text-{_slug(teacher.spec.cache_id())}-{digest}.safetensors"
    return cached_rows(run, name, [f"{n}" for n in names],
                       lambda pos: teacher.class_embeddings([names[i] for i in pos], templates))


def image_embeddings(teacher, run: RunDir, data: DomainData, indices: Sequence[int],
                     hashes: Sequence[str], device: torch.device, batch_size: int = 64,
                     pixels: torch.Tensor | DiskPixels | None = None) -> torch.Tensor:
    """[N, D] unit teacher embeddings of un-augmented images at the teacher's own resolution.

    `pixels`: the run's decoded images (row p is `indices[p]`) when they are at that resolution,
    read from there (memory, or the disk store read ahead) instead of decoded again; without
    them, each batch is decoded from the files in background threads. Either way a few batches
    are held at a time, never the data set."""
    spec = PreprocessSpec(input_size=teacher.image_size, resize_size=teacher.image_size)
    name = f"image-{_slug(teacher.spec.cache_id())}-{teacher.image_size}px.safetensors"

    def decode(chunk: np.ndarray) -> torch.Tensor:
        stack = np.stack([load_prepared(data.samples[indices[p]].path, spec) for p in chunk])
        return torch.from_numpy(stack).permute(0, 3, 1, 2)

    def compute(positions: list[int]) -> torch.Tensor:
        rows = np.asarray(positions, dtype=np.int64)
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        ahead = (Prefetcher(decode, chunks, depth=2) if pixels is None else
                 (x for _, x in batches(pixels, rows, batch_size)))
        out = []
        with closing(ahead):  # stops the reading threads also when encoding fails
            for images in track(ahead, len(chunks), "Teacher embeddings"):
                x = images.to(device).float() / 255.0
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    out.append(teacher.encode_images(x).float().cpu())
        return torch.cat(out)

    return cached_rows(run, name, list(hashes), compute)
