"""The decoded-pixel store: every image decoded, resized and cropped once at training size into a
memory-mapped uint8 file on disk, so training reads batches from disk instead of holding the
whole data set in memory, and later runs over the same data skip decoding.

```
<cache>/dgkit/pixels/<root name>-<size>px-<key>/pixels.u8      N x S x S x 3 uint8, raw
                                               manifest.json  per row: path, size, mtime, hash
                                               .lock          held while a process opens it
```
Decoding is `dgkit.data.decode_one`, the path `decode_samples` takes, so a store's rows equal
`decode_samples`'s pixels byte for byte. Torch-free.

Crash safety: the manifest is written (atomically) as incomplete before `pixels.u8` is touched
and says complete only after every row is flushed, so an interrupted build never looks complete;
the next open resumes it from the rows the manifest records as done. Concurrent runs over the
same data take turns through `.lock`: the first builds the store, the others wait, then reuse it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.atomic import remove_stale_temps, write_json
from dgkit.data import DomainData, content_hash, decode_one
from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec
from dgkit.progress import console, track
from dgkit.text_table import human_bytes

FORMAT = 1
PIXELS = "pixels.u8"
MANIFEST = "manifest.json"
LOCK = ".lock"
CHUNK = 256  # rows decoded per batch of work: bounds the decoded rows held in memory
SAVE_EVERY_S = 30.0  # how often a build records its progress, the most an interruption loses


def pixel_spec(spec: PreprocessSpec) -> dict[str, Any]:
    """The part of `spec` that decides the stored bytes (mean and std live inside the graph)."""
    return {"input_size": spec.input_size, "resize_size": spec.resize_size,
            "interpolation": spec.interpolation}


def store_folder(root: str | Path, spec: PreprocessSpec) -> Path:
    """Where the store of the data under `root` decoded with `spec` lives.

    In the user's cache (`$XDG_CACHE_HOME/dgkit/pixels/`, beside the quickstart's teacher) and
    not in a runs folder: the store depends on the images and preprocessing only, so every run
    over the data, in any runs folder, shares one copy of what may be many gigabytes, and deleting
    runs does not delete it. Keyed by the resolved root and the pixel spec, not by the bytes of
    every image (that would need reading the whole data set to find the store): each row's
    content hash is checked when the store is opened, and only changed images are decoded again.
    """
    from dgkit.rundir import cache_dir

    root = Path(root).expanduser().resolve()
    key = hashlib.sha1(json.dumps([str(root), pixel_spec(spec)]).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name) or "root"
    return cache_dir() / "pixels" / f"{name}-{spec.input_size}px-{key}"


def _note(folder: Path, message: str) -> None:
    console.print(f"pixel store {folder}: {message}", markup=False, highlight=False)


class PixelStore:
    """An open store: `indices`, `hashes` and `bad` mean what they mean in `dgkit.data.Decoded`,
    and `gather(rows)` returns what `Decoded.pixels[rows]` would."""

    def __init__(self, folder: Path, pixels: np.ndarray, indices: np.ndarray,
                 file_rows: np.ndarray, hashes: list[str], bad: list[tuple[Path, str]]) -> None:
        self.folder = folder
        self.indices = indices  # sample indices of the decodable images, in the caller's order
        self.hashes = hashes
        self.bad = bad
        self._pixels = pixels  # read-only memmap of every row of pixels.u8
        self._file_rows = file_rows  # row of pixels.u8 of each of `indices`

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self._pixels.shape[1:])  # type: ignore[return-value]

    def gather(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """B x S x S x 3 uint8 of the images at positions `rows` of `indices`, copied out of
        the file (fancy indexing copies), so the batch outlives the mapping."""
        return np.asarray(self._pixels[self._file_rows[np.asarray(rows, dtype=np.int64)]])


class StoreView:
    """Rows of a `PixelStore` as a read-only N x S x S x 3 uint8 array-like, read only when
    asked for: `x[rows]` (integers or a mask) is another view, `x[a:b]` the images themselves
    (an ndarray). Consumers that go batch by batch hold one batch, not the data set."""

    dtype = np.dtype(np.uint8)

    def __init__(self, store: PixelStore, rows: np.ndarray | None = None) -> None:
        self.store = store
        self.rows = np.arange(len(store)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), *self.store.image_shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.store.gather(self.rows[key])
        if isinstance(key, int | np.integer):
            return self.store.gather(self.rows[[key]])[0]
        picked = np.asarray(key)
        return StoreView(self.store, self.rows[picked if picked.dtype == bool
                                               else picked.astype(np.int64)])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        # Every row in memory at once, what the view is for avoiding: only for numpy callers.
        return np.asarray(self[:], dtype)


# ---------------------------------------------------------------- manifest

def _new_manifest(root: Path, spec: PreprocessSpec) -> dict[str, Any]:
    return {"format": FORMAT, "root": str(Path(root).expanduser().resolve()),
            "spec": pixel_spec(spec), "complete": False, "pixels": None,
            # Per row of pixels.u8; a row is done once it has a hash or a reason it is bad.
            "paths": [], "sizes": [], "mtimes": [], "hashes": [], "bad": []}


def _row_bytes(spec: PreprocessSpec) -> int:
    return spec.input_size * spec.input_size * 3


def _is_done(manifest: dict[str, Any], row: int) -> bool:
    return bool(manifest["hashes"][row] or manifest["bad"][row])


def _stale_reason(folder: Path, manifest: dict[str, Any], spec: PreprocessSpec) -> str | None:
    """Why the store in `folder` with `manifest` cannot be used, or None when it can."""
    try:
        if manifest["format"] != FORMAT or manifest["spec"] != pixel_spec(spec):
            return "its manifest is of another format or preprocessing"
        n = len(manifest["paths"])
        if any(len(manifest[k]) != n for k in ("sizes", "mtimes", "hashes", "bad")):
            return "its manifest is inconsistent"
        recorded = manifest["pixels"]
    except (KeyError, TypeError):
        return "its manifest is not a pixel-store manifest"
    pixels = folder / PIXELS
    if not pixels.is_file():
        return f"{PIXELS} is missing"
    st = pixels.stat()
    expected = n * _row_bytes(spec)
    if st.st_size != expected:
        return (f"{PIXELS} is {st.st_size} bytes, not the {expected} its {n} rows take "
                "(truncated?)")
    if manifest["complete"] and recorded != {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return f"{PIXELS} was modified after the store was built"
    return None


def _read_manifest(folder: Path, spec: PreprocessSpec) -> dict[str, Any] | None:
    """The usable manifest of `folder`; None (the store removed, with one line saying why when
    there was one) when it has none or cannot be used."""
    path = folder / MANIFEST
    if not path.exists():
        (folder / PIXELS).unlink(missing_ok=True)  # rows no manifest vouches for
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        reason = _stale_reason(folder, manifest, spec)
    except (OSError, ValueError) as exc:
        reason = f"its manifest cannot be read ({exc})"
    if reason is None:
        return manifest
    _note(folder, f"{reason}; rebuilding it")
    path.unlink(missing_ok=True)  # manifest first: a crash in between leaves no store, not a
    (folder / PIXELS).unlink(missing_ok=True)  # manifest without its pixels
    return None


# ---------------------------------------------------------------- building

def _check_space(folder: Path, need: int) -> None:
    """Fail before writing anything when the disk under `folder` has less than `need` free."""
    if need <= 0:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DgkitError(f"not enough disk space for the pixel store in {folder}: it needs "
                         f"{human_bytes(need)} ({need} bytes) and {human_bytes(free)} "
                         f"({free} bytes) are free; free some space or set XDG_CACHE_HOME to a "
                         "larger disk")


def _allocate(path: Path, size: int) -> None:
    """Grow `path` to `size` bytes with real blocks, so a full disk fails here with ENOSPC rather
    than later as SIGBUS while writing through the memory map."""
    with open(path, "r+b" if path.exists() else "w+b") as fh:
        have = os.fstat(fh.fileno()).st_size
        if size <= have:
            return
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fh.fileno(), have, size - have)
        else:  # macOS, Windows: sparse, as close as the platform allows
            fh.truncate(size)


def _decode_row(path: Path, spec: PreprocessSpec
                ) -> tuple[tuple[int, int], np.ndarray | None, str, str]:
    """(size, mtime_ns) before reading, then what `decode_one` says; a file changed after the
    stat is caught by its new mtime next time."""
    try:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)
    return (stamp, *decode_one(path, spec))


def build_store(folder: Path, manifest: dict[str, Any], todo: dict[int, Path],
                spec: PreprocessSpec, workers: int = 4,
                progress: str | None = "Building the pixel store") -> None:
    """Decode the rows `todo` (row -> image) into `folder`, growing pixels.u8 to the manifest's
    rows, and mark the store complete. Checks the disk space before writing anything."""
    n, size = len(manifest["paths"]), spec.input_size
    pixels = folder / PIXELS
    need = n * _row_bytes(spec) - (pixels.stat().st_size if pixels.is_file() else 0)
    _check_space(folder, need)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    for row in todo:
        manifest["hashes"][row] = manifest["bad"][row] = ""
    manifest["complete"], manifest["pixels"] = False, None
    write_json(folder / MANIFEST, manifest)  # before pixels.u8 changes: never looks complete
    try:
        _allocate(pixels, n * _row_bytes(spec))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        (folder / MANIFEST).unlink(missing_ok=True)  # the folder stays: it holds the lock
        pixels.unlink(missing_ok=True)
        raise DgkitError(f"not enough disk space for the pixel store in {folder}: it needs "
                         f"{human_bytes(need)} ({need} bytes); the disk filled while allocating it"
                         ) from exc
    rows_map: np.memmap | None = None
    if n:
        rows_map = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    rows = list(todo)

    def save() -> None:
        if rows_map is not None:
            rows_map.flush()  # rows reach the file before the manifest calls them done
        write_json(folder / MANIFEST, manifest)

    with ThreadPoolExecutor(workers) as pool:
        def decoded() -> Iterator[tuple[int, tuple]]:
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start:start + CHUNK]
                results = pool.map(lambda r: _decode_row(todo[r], spec), chunk)
                yield from zip(chunk, results, strict=True)

        last = time.monotonic()
        try:
            for row, (stamp, px, digest, why) in track(decoded(), len(rows), progress):
                if px is not None:
                    rows_map[row] = px  # type: ignore[index]
                manifest["sizes"][row], manifest["mtimes"][row] = stamp
                manifest["hashes"][row], manifest["bad"][row] = digest, why
                if time.monotonic() - last > SAVE_EVERY_S:
                    save()
                    last = time.monotonic()
        finally:
            save()  # also when interrupted: the rows done so far are kept for the resume
    rows_map = None  # unmapped before the final stat: no write can change its mtime later
    st = pixels.stat()
    manifest["complete"], manifest["pixels"] = True, {"size": st.st_size,
                                                      "mtime_ns": st.st_mtime_ns}
    write_json(folder / MANIFEST, manifest)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the store's lock: one process at a time reads, builds or repairs the store, so two
    runs started together build it once; the others wait, saying so, then reuse it. The lock
    goes when its file closes, also when the process holding it dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _note(folder, "another process is building or checking it; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def open_store(data: DomainData, indices: Sequence[int] | np.ndarray, spec: PreprocessSpec,
               folder: str | Path | None = None, workers: int = 4,
               progress: str | None = "Building the pixel store") -> PixelStore:
    """The store of `data.samples[indices]` at `spec`: reused when complete and current; resumed
    when an earlier build was interrupted; rebuilt, with one line saying why, when its files were
    truncated or modified; extended by images it does not hold yet; and with the rows of images
    whose content changed since decoded again, and only those. Other processes opening the same
    store wait until this one is done."""
    folder = Path(folder) if folder is not None else store_folder(data.root, spec)
    paths = [data.samples[int(i)].path for i in indices]
    rel = [p.relative_to(data.root).as_posix() for p in paths]
    if not folder.exists():  # a new store on a disk too small fails before its folder exists
        _check_space(folder, len(dict.fromkeys(rel)) * _row_bytes(spec))
    with _locked(folder):
        manifest = _update(folder, data.root, paths, rel, spec, workers, progress)
        return _open(folder, manifest, spec, indices, paths, rel)


def _update(folder: Path, root: Path, paths: list[Path], rel: list[str], spec: PreprocessSpec,
            workers: int, progress: str | None) -> dict[str, Any]:
    """The manifest of a store that holds `rel` (images `paths`) current, after building what it
    lacks; called with the store's lock held."""
    manifest = _read_manifest(folder, spec)
    if manifest is not None and not manifest["complete"]:
        done = sum(_is_done(manifest, r) for r in range(len(manifest["paths"])))
        _note(folder, f"resuming an interrupted build ({done} of {len(manifest['paths'])} "
                      "images done)")
    manifest = manifest or _new_manifest(root, spec)
    row_of = {p: r for r, p in enumerate(manifest["paths"])}
    for p in dict.fromkeys(rel):
        if p not in row_of:  # new images: rows appended, the others stay where they are
            row_of[p] = len(manifest["paths"])
            for key, empty in (("paths", p), ("sizes", -1), ("mtimes", -1), ("hashes", ""),
                               ("bad", "")):
                manifest[key].append(empty)
    todo: dict[int, Path] = {}
    changed = touched = 0
    for p, path in zip(rel, paths, strict=True):
        row = row_of[p]
        if row in todo:
            continue
        if not _is_done(manifest, row):
            todo[row] = path
            continue
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) == (manifest["sizes"][row], manifest["mtimes"][row]):
                continue
            # Size or time moved: only a new content hash makes the row stale.
            same = content_hash(path.read_bytes()) == manifest["hashes"][row]
        except OSError:
            same = False
        if same:
            manifest["sizes"][row], manifest["mtimes"][row] = st.st_size, st.st_mtime_ns
            touched += 1
        else:
            todo[row] = path
            changed += 1
    if changed:
        _note(folder, f"{changed} image(s) changed since the store was built; decoding them again")
    if todo or not manifest["complete"]:
        build_store(folder, manifest, todo, spec, workers, progress)
    elif touched:  # the new times spare the next open from hashing these files again
        write_json(folder / MANIFEST, manifest)
    return manifest


def _open(folder: Path, manifest: dict[str, Any], spec: PreprocessSpec,
          indices: Sequence[int] | np.ndarray, paths: list[Path], rel: list[str]
          ) -> PixelStore:
    n, size = len(manifest["paths"]), spec.input_size
    pixels = (np.memmap(folder / PIXELS, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
              if n else np.empty((0, size, size, 3), np.uint8))
    row_of = {p: r for r, p in enumerate(manifest["paths"])}
    good, file_rows, hashes, bad = [], [], [], []
    for i, path, p in zip(indices, paths, rel, strict=True):
        row = row_of[p]
        if manifest["bad"][row]:
            bad.append((path, manifest["bad"][row]))
        else:
            good.append(int(i))
            file_rows.append(row)
            hashes.append(manifest["hashes"][row])
    return PixelStore(folder, pixels, np.asarray(good, dtype=np.int64),
                      np.asarray(file_rows, dtype=np.int64), hashes, bad)


# ---------------------------------------------------------------- streaming

class Prefetcher:
    """Yields `gather(rows)` for each of `batches`, in order, gathered by background threads at
    most `depth` batches ahead of the one in use: memory stays bounded whatever the data size.

    Use as an iterator; `close()` (or leaving a `with` block) stops the threads early."""

    def __init__(self, gather: Callable[[np.ndarray], Any], batches: Iterable[np.ndarray],
                 depth: int = 4, workers: int = 2) -> None:
        if depth < 1 or workers < 1:
            raise ValueError("depth and workers must be at least 1")
        self._gather = gather
        self._batches = iter(batches)
        self._depth = depth
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dgkit-prefetch")
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            rows = next(self._batches, None)
            if rows is None:
                return
            self._pending.append(self._pool.submit(self._gather, rows))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return batch

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
