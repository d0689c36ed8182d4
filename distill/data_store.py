"""Where the trainer's decoded images live (`--data-store`): all in memory on the device, or in
the memory-mapped store of `dgkit.pixel_store`, gathered batch by batch onto the device.

`DiskPixels[rows]` returns what indexing the in-memory uint8 [N, 3, S, S] tensor would, byte for
byte, so the trainer indexes either the same way and a run trains the same weights in both modes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dgkit.data import DomainData, decode_samples
from dgkit.distill import distributed
from dgkit.distill.augment import to_device
from dgkit.pixel_store import PixelStore, Prefetcher, open_store
from dgkit.preprocess import PreprocessSpec
from dgkit.progress import console
from dgkit.train_config import TrainConfig

# Of the available memory: decoding holds the images twice at its peak, and training needs room.
BUDGET_FRACTION = 0.5
READ_AHEAD = 4  # batches gathered from disk ahead of the one in use


def _gb(n: float) -> str:
    gb = n / 1e9
    return f"{gb:.3g} GB" if gb < 100 else f"{gb:.0f} GB"  # 0.000221 GB, 11.4 GB, 1000 GB


def host_available() -> int | None:
    """This process's share, in bytes, of the host memory available (MemAvailable), divided
    among the torchrun ranks on the host; None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
        free = kb * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_budget(device: torch.device) -> tuple[int | None, str]:
    """--memory-budget's default in bytes and what it is, in words: BUDGET_FRACTION of the
    available host memory, or of the free GPU memory when that is less."""
    host = host_available()
    share = f"{BUDGET_FRACTION:.0%}"
    if device.type == "cuda":
        gpu, _ = torch.cuda.mem_get_info(device)
        if host is None or gpu < host:
            return int(gpu * BUDGET_FRACTION), f"{share} of the {_gb(gpu)} of free GPU memory"
    if host is None:
        return None, "available host memory unknown"
    return int(host * BUDGET_FRACTION), f"{share} of the {_gb(host)} of available host memory"


def choose(config: TrainConfig, images: int, device: torch.device) -> str:
    """Where `images` decoded images live, `memory` or `disk`; --data-store auto prints one line
    saying which and why. Rank 0 decides for every rank under torchrun."""
    if config.data_store != "auto":
        return config.data_store
    choice = None
    if distributed.is_main():
        need = images * config.image_size * config.image_size * 3
        if config.memory_budget is not None:
            budget, what = int(config.memory_budget * 1e9), "--memory-budget"
        else:
            budget, what = default_budget(device)
        fits = budget is None or need <= budget  # unknown: the default mode, memory
        choice = "memory" if fits else "disk"
        why = (f"{what}; pass --memory-budget" if budget is None else
               f"{'within' if fits else 'more than'} the budget of {_gb(budget)} ({what})")
        console.print(f"data store: {choice}: the {images} decoded images take {_gb(need)}, "
                      f"{why}", markup=False, highlight=False, soft_wrap=True)
    return distributed.broadcast_object(choice)


class DiskPixels:
    """The uint8 [N, 3, S, S] pixels of a `PixelStore`, indexed like the in-memory tensor:
    `[rows]` reads those rows from disk onto `device`."""

    def __init__(self, store: PixelStore, device: torch.device | str = "cpu") -> None:
        self.store = store
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.store)

    def to(self, device: torch.device | str) -> DiskPixels:
        return DiskPixels(self.store, device)

    def host(self, rows: np.ndarray) -> torch.Tensor:
        """The rows on the host, in the layout the in-memory tensor has (contiguous NCHW).
        Transposed by numpy: on the read-ahead threads a torch copy would start a team of
        OpenMP threads per thread, which spin against the training threads for the cores."""
        return torch.from_numpy(np.ascontiguousarray(self.store.gather(rows).transpose(0, 3, 1, 2)))

    def __getitem__(self, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        elif isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        return to_device(self.host(np.asarray(rows, dtype=np.int64)), self.device)


def batches(pixels: torch.Tensor | DiskPixels, rows: np.ndarray, size: int
            ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows, their pixels on the pixels' device) for `rows` in consecutive batches of `size`,
    as evaluation reads them: from a disk store read ahead by a `Prefetcher`, as training
    batches are."""
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    if not isinstance(pixels, DiskPixels):
        for chunk in chunks:
            yield chunk, pixels[torch.from_numpy(chunk).to(pixels.device)]
        return
    with Prefetcher(pixels.host, chunks, depth=READ_AHEAD) as ahead:
        for chunk, host in zip(chunks, ahead, strict=True):
            yield chunk, to_device(host, pixels.device)


class BatchFeed:
    """The pixels of each training step's batch, gathered from disk by a `Prefetcher` up to
    READ_AHEAD steps ahead. Asked for a step other than the next (the first, a resume, SWAD's
    jump to a stage end), it starts reading ahead from there; the batches themselves are
    `batch(step)`, drawn on the caller's thread (the sampler is not thread-safe).

    With `part` (a torchrun rank's shard of each batch) only those rows are read from disk;
    the batch comes back whole, with zeros in the rows of the other ranks."""

    def __init__(self, pixels: DiskPixels, batch: Callable[[int], np.ndarray],
                 part: slice = slice(None)) -> None:
        self.pixels = pixels
        self.batch = batch
        self.part = part
        self._next: int | None = None
        self._ahead: Prefetcher | None = None

    def _read(self, rows: np.ndarray) -> tuple[int, torch.Tensor]:
        return len(rows), self.pixels.host(rows[self.part])

    def __call__(self, step: int) -> torch.Tensor:
        if step != self._next or self._ahead is None:
            self.close()
            self._ahead = Prefetcher(self._read, map(self.batch, itertools.count(step)),
                                     depth=READ_AHEAD)
        self._next = step + 1
        n, host = next(self._ahead)
        mine = to_device(host, self.pixels.device)
        if len(mine) == n:
            return mine
        whole = mine.new_zeros((n, *mine.shape[1:]))
        whole[self.part] = mine
        return whole

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


@dataclass
class Loaded:
    """The decoded images of a run: `pixels` indexed by row, and per row the sample index and
    content hash (`dgkit.data.Decoded`'s meanings), with the images that failed."""

    pixels: torch.Tensor | DiskPixels  # on the host; the trainer moves it with .to(device)
    indices: np.ndarray
    hashes: list[str]
    bad: list[tuple[Path, str]]


def load(config: TrainConfig, data: DomainData, indices: np.ndarray, spec: PreprocessSpec,
         device: torch.device, quiet: bool) -> Loaded:
    """Decode `data.samples[indices]` into memory, or open (building it if need be) their
    disk store, as `choose` says."""
    if choose(config, len(indices), device) == "memory":
        decoded = decode_samples(data, indices, spec,
                                 None if quiet else f"Decoding {len(indices)} images")
        pixels = torch.from_numpy(decoded.pixels).permute(0, 3, 1, 2).contiguous()
        return Loaded(pixels, decoded.indices, decoded.hashes, decoded.bad)
    # Rank 0 builds the store; the other ranks open it once it is complete.
    if not distributed.is_main():
        distributed.broadcast_object(None)
    store = open_store(data, indices, spec, progress=None if quiet else
                       f"Building the pixel store of {len(indices)} images")
    if distributed.is_main():
        distributed.broadcast_object(None)
    return Loaded(DiskPixels(store), store.indices, store.hashes, store.bad)
