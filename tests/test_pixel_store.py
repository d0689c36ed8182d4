"""The decoded-pixel store: rows equal decode_samples's, reuse, rebuilds, resume, disk space,
and the bounded prefetcher."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgkit import pixel_store
from dgkit.data import decode_samples, discover
from dgkit.errors import DgkitError
from dgkit.pixel_store import MANIFEST, PIXELS, Prefetcher, open_store, store_folder
from dgkit.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=24, resize_size=28)


@pytest.fixture
def decode_calls(monkeypatch) -> list[Path]:
    """Every image the store decodes, in call order (the real decoding still runs)."""
    calls: list[Path] = []
    real = pixel_store.decode_one

    def counting(path, spec):
        calls.append(path)
        return real(path, spec)

    monkeypatch.setattr(pixel_store, "decode_one", counting)
    return calls


def shuffled(n: int) -> np.ndarray:
    """A caller's order that is not the files' order, as the trainer's train+val+target is."""
    return np.random.default_rng(3).permutation(n)


def assert_matches_decode(store, data, indices) -> None:
    """The store says what an independent decode_samples says, byte for byte."""
    decoded = decode_samples(data, indices, SPEC, None)
    assert store.indices.tolist() == decoded.indices.tolist()
    assert store.hashes == decoded.hashes
    assert store.bad == decoded.bad
    rows = np.arange(len(decoded.indices))
    assert np.array_equal(store.gather(rows), decoded.pixels)
    some = rows[::-3]  # any subset in any order, as a batch is
    assert np.array_equal(store.gather(some), decoded.pixels[some])


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_rows_equal_decode_samples_and_bad_images_listed(domains_copy, tmp_path):
    broken = domains_copy / "photo" / "square" / "002.png"
    broken.write_bytes(b"not a png")
    data = discover(domains_copy)
    indices = shuffled(len(data.samples))
    store = open_store(data, indices, SPEC, tmp_path / "store", workers=3, progress=None)
    assert [p for p, _ in store.bad] == [broken]
    assert len(store) == len(data.samples) - 1
    assert (tmp_path / "store" / PIXELS).stat().st_size == len(data.samples) * 24 * 24 * 3
    assert manifest_of(tmp_path / "store")["complete"] is True
    assert_matches_decode(store, data, indices)


def test_second_open_decodes_nothing_and_writes_nothing(tiny_domains, tmp_path, decode_calls):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    assert len(decode_calls) == len(data.samples)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    decode_calls.clear()
    # Another run over the same data, with another split order: the same store serves it.
    indices = shuffled(len(data.samples))
    store = open_store(data, indices, SPEC, folder, progress=None)
    assert decode_calls == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert_matches_decode(store, data, indices)


def test_store_folder_keyed_by_root_and_pixel_spec(tiny_domains, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    here = store_folder(tiny_domains, SPEC)
    assert here.parent == tmp_path / "xdg" / "dgkit" / "pixels"
    assert store_folder(Path(str(tiny_domains) + "/."), SPEC) == here
    # Mean and std are applied inside the graph: the stored bytes, and the store, are the same.
    assert store_folder(tiny_domains, PreprocessSpec(24, 28, mean=(0.5,) * 3)) == here
    others = {store_folder(tiny_domains, PreprocessSpec(24, 24)),
              store_folder(tiny_domains, PreprocessSpec(24, 28, interpolation="bicubic")),
              store_folder(tmp_path / "elsewhere", SPEC)}
    assert here not in others and len(others) == 3


def test_truncated_pixels_are_detected_and_rebuilt(tiny_domains, tmp_path, capsys,
                                                   decode_calls):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    every = range(len(data.samples))
    open_store(data, every, SPEC, folder, progress=None)
    full = (folder / PIXELS).stat().st_size
    with open(folder / PIXELS, "r+b") as fh:
        fh.truncate(full // 2)
    decode_calls.clear()
    capsys.readouterr()
    store = open_store(data, every, SPEC, folder, progress=None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"is {full // 2} bytes, not the {full}" in lines[0] and "rebuilding" in lines[0]
    assert len(decode_calls) == len(data.samples)
    assert_matches_decode(store, data, every)


def test_pixels_modified_in_place_are_detected_and_rebuilt(tiny_domains, tmp_path, capsys):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    every = range(len(data.samples))
    open_store(data, every, SPEC, folder, progress=None)
    with open(folder / PIXELS, "r+b") as fh:  # same size, other bytes
        fh.seek(100)
        fh.write(b"\xff" * 50)
    st = (folder / PIXELS).stat()
    os.utime(folder / PIXELS, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    store = open_store(data, every, SPEC, folder, progress=None)
    assert "modified after the store was built; rebuilding" in capsys.readouterr().err
    assert_matches_decode(store, data, every)


def test_changed_image_alone_is_decoded_again(domains_copy, tmp_path, capsys, decode_calls):
    data = discover(domains_copy)
    folder = tmp_path / "store"
    every = range(len(data.samples))
    open_store(data, every, SPEC, folder, progress=None)
    changed = domains_copy / "sketch" / "circle" / "004.png"
    Image.open(changed).transpose(Image.Transpose.ROTATE_90).save(changed)
    touched = domains_copy / "cartoon" / "square" / "001.png"  # new time, same bytes
    for path in (changed, touched):
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    decode_calls.clear()
    capsys.readouterr()
    store = open_store(data, every, SPEC, folder, progress=None)
    assert decode_calls == [changed]
    assert "1 image(s) changed since the store was built" in capsys.readouterr().err
    assert_matches_decode(store, data, every)
    decode_calls.clear()
    open_store(data, every, SPEC, folder, progress=None)  # the touched file is not hashed again
    assert decode_calls == []
    row = manifest_of(folder)["paths"].index("cartoon/square/001.png")
    assert manifest_of(folder)["mtimes"][row] == touched.stat().st_mtime_ns


def test_new_images_are_appended(domains_copy, tmp_path, decode_calls):
    data = discover(domains_copy)
    folder = tmp_path / "store"
    open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    added = domains_copy / "photo" / "circle" / "zzz.png"
    shutil.copy(domains_copy / "photo" / "square" / "000.png", added)
    data = discover(domains_copy)
    decode_calls.clear()
    store = open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    assert decode_calls == [added]
    assert_matches_decode(store, data, range(len(data.samples)))


def test_deleted_images_leave_their_rows_unused(domains_copy, tmp_path, decode_calls):
    """An image deleted from the data: its row stays in the file (rows never move, so a run
    reading the store meanwhile is not disturbed), nothing is decoded again, and the store
    serves the images that remain."""
    data = discover(domains_copy)
    folder = tmp_path / "store"
    open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    size = (folder / PIXELS).stat().st_size
    (domains_copy / "photo" / "square" / "003.png").unlink()
    data = discover(domains_copy)
    decode_calls.clear()
    store = open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    assert decode_calls == [] and (folder / PIXELS).stat().st_size == size
    assert_matches_decode(store, data, range(len(data.samples)))


def test_unreadable_manifest_is_rebuilt_with_one_line(tiny_domains, tmp_path, capsys):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    open_store(data, range(5), SPEC, folder, progress=None)
    (folder / MANIFEST).write_text('{"format": 1, "paths": [')
    capsys.readouterr()
    store = open_store(data, range(5), SPEC, folder, progress=None)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "its manifest cannot be read" in line and line.endswith("rebuilding it")
    assert_matches_decode(store, data, range(5))


def test_interrupted_build_never_looks_complete_and_resumes(tiny_domains, tmp_path,
                                                            monkeypatch, capsys):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    every = range(len(data.samples))
    real, calls = pixel_store.decode_one, []

    def dies_midway(path, spec):
        calls.append(path)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(path, spec)

    monkeypatch.setattr(pixel_store, "decode_one", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        open_store(data, every, SPEC, folder, workers=1, progress=None)
    manifest = manifest_of(folder)
    assert manifest["complete"] is False and manifest["pixels"] is None
    done = [p for p, h in zip(manifest["paths"], manifest["hashes"], strict=True) if h]
    assert 0 < len(done) < len(data.samples)

    calls.clear()
    monkeypatch.setattr(pixel_store, "decode_one", lambda path, spec: (calls.append(path),
                                                                       real(path, spec))[1])
    capsys.readouterr()
    store = open_store(data, every, SPEC, folder, progress=None)
    assert f"resuming an interrupted build ({len(done)} of {len(data.samples)}" in (
        capsys.readouterr().err)
    assert sorted(calls) == sorted(data.samples[i].path for i in every
                                   if data.samples[i].path.relative_to(tiny_domains).as_posix()
                                   not in done)
    assert manifest_of(folder)["complete"] is True
    assert_matches_decode(store, data, every)


def test_manifest_without_pixels_is_not_a_store(tiny_domains, tmp_path, capsys):
    data = discover(tiny_domains)
    folder = tmp_path / "store"
    open_store(data, range(5), SPEC, folder, progress=None)
    (folder / PIXELS).unlink()
    capsys.readouterr()
    store = open_store(data, range(5), SPEC, folder, progress=None)
    assert f"{PIXELS} is missing; rebuilding" in capsys.readouterr().err
    assert_matches_decode(store, data, range(5))


def test_disk_too_full_fails_before_writing(tiny_domains, tmp_path, monkeypatch):
    data = discover(tiny_domains)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pixel_store.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 999,
                                                                              999))
    folder = tmp_path / "cache" / "store"
    with pytest.raises(DgkitError) as err:
        open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    need = len(data.samples) * 24 * 24 * 3
    message = str(err.value)
    assert "\n" not in message
    assert f"({need} bytes)" in message and "(999 bytes) are free" in message
    assert not (tmp_path / "cache").exists()


# One process opening a store: it prints "decoding" at its first decode and, with "hold", waits
# there for a line on stdin; at the end it prints how many images it decoded and the sha256 of
# every row it reads back.
OPENER = """
import hashlib, json, sys
import numpy as np
from dgkit import pixel_store
from dgkit.data import discover
from dgkit.preprocess import PreprocessSpec

root, folder, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"
real, calls = pixel_store.decode_one, []

def decode(path, spec):
    if not calls:
        print("decoding", flush=True)
        if hold:
            sys.stdin.readline()
    calls.append(path)
    return real(path, spec)

pixel_store.decode_one = decode
data = discover(root)
store = pixel_store.open_store(data, range(len(data.samples)), PreprocessSpec(24, 28), folder,
                               workers=1, progress=None)
rows = store.gather(np.arange(len(store)))
print(json.dumps({"decoded": len(calls), "sha": hashlib.sha256(rows.tobytes()).hexdigest()}))
"""


def test_two_processes_build_one_store_and_read_the_same_bytes(tiny_domains, tmp_path):
    folder = tmp_path / "store"

    def opener(hold: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", OPENER, str(tiny_domains), str(folder),
                                 "hold" if hold else "go"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = opener(hold=True)
    assert first.stdout.readline() == "decoding\n"  # it holds the lock, building
    second = opener(hold=False)
    # The second says in one line that it waits, while the first is still held mid-build.
    waiting = second.stderr.readline()
    assert "another process is building or checking it; waiting for it" in waiting
    assert first.poll() is None
    first.stdin.write("go\n")
    first.stdin.flush()
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    data = discover(tiny_domains)
    assert [r["decoded"] for r in results] == [len(data.samples), 0]  # built once
    decoded = decode_samples(data, range(len(data.samples)), SPEC, None)
    want = hashlib.sha256(decoded.pixels.tobytes()).hexdigest()
    assert [r["sha"] for r in results] == [want, want]
    assert manifest_of(folder)["complete"] is True


def test_disk_filling_while_allocating_leaves_no_store(tiny_domains, tmp_path, monkeypatch):
    """The free space was enough when checked, then the disk filled (another writer): the
    allocation fails with ENOSPC before any row is written, in one line, and neither manifest
    nor pixels remain; once there is room, the store builds."""
    import errno

    data = discover(tiny_domains)
    folder = tmp_path / "store"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pixel_store.os, "posix_fallocate", full, raising=False)
    with pytest.raises(DgkitError) as err:
        open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    assert "\n" not in str(err.value) and "the disk filled while allocating it" in str(err.value)
    assert not (folder / MANIFEST).exists() and not (folder / PIXELS).exists()
    monkeypatch.undo()
    store = open_store(data, range(len(data.samples)), SPEC, folder, progress=None)
    assert_matches_decode(store, data, range(len(data.samples)))


def test_prefetcher_yields_batches_in_order_and_bounded(tiny_domains):
    batches = [np.array([i, i + 1]) for i in range(20)]
    started: list[int] = []
    lock = threading.Lock()

    def gather(rows: np.ndarray) -> np.ndarray:
        with lock:
            started.append(int(rows[0]))
        time.sleep(0.001 * (int(rows[0]) % 3))  # finish out of order
        return rows * 10

    depth, got = 3, []
    with Prefetcher(gather, iter(batches), depth=depth, workers=3) as batches_ahead:
        for batch in batches_ahead:
            time.sleep(0.01)  # a slow consumer: an unbounded prefetcher would run far ahead
            with lock:
                assert len(started) <= len(got) + 1 + depth
            got.append(batch)
    assert [b.tolist() for b in got] == [(b * 10).tolist() for b in batches]


def test_prefetcher_raises_the_gather_error_and_stops(tiny_domains):
    def gather(rows: np.ndarray) -> np.ndarray:
        if rows[0] == 2:
            raise OSError("read failed")
        return rows

    fetcher = Prefetcher(gather, ([i] for i in range(100)), depth=2)
    assert next(fetcher) == [0] and next(fetcher) == [1]
    with pytest.raises(OSError, match="read failed"):
        next(fetcher)
    with pytest.raises(StopIteration):
        next(fetcher)


def test_prefetcher_gathers_from_the_store(tiny_domains, tmp_path):
    data = discover(tiny_domains)
    store = open_store(data, range(len(data.samples)), SPEC, tmp_path / "store", progress=None)
    decoded = decode_samples(data, range(len(data.samples)), SPEC, None)
    batches = [np.random.default_rng(s).choice(len(store), 8) for s in range(6)]
    got = list(Prefetcher(store.gather, batches, depth=2))
    assert all(np.array_equal(g, decoded.pixels[b]) for g, b in zip(got, batches, strict=True))
