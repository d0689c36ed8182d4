"""The teacher-embedding cache and the export's calibration images of a `--data-store disk` run
read the pixel store a few batches at a time instead of decoding the data set into memory."""

from __future__ import annotations

import threading

import numpy as np
import torch

from dgkit.data import content_hash, discover
from dgkit.distill import cache
from dgkit.distill.data_store import DiskPixels
from dgkit.distill.teacher import load_teacher
from dgkit.pixel_store import open_store
from dgkit.preprocess import PreprocessSpec, load_prepared
from dgkit.rundir import RunDir


def independent_embeddings(teacher, data, indices) -> torch.Tensor:
    """Every image decoded from its file at the teacher's size and encoded in one batch."""
    spec = PreprocessSpec(teacher.image_size, teacher.image_size)
    pixels = np.stack([load_prepared(data.samples[int(i)].path, spec) for i in indices])
    with torch.no_grad():
        return teacher.encode_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)


def no_decoding(*args, **kwargs):
    raise AssertionError("an image was decoded from its file")


def test_teacher_embeddings_read_the_disk_store_ahead(tiny_domains, tiny_teacher, tmp_path,
                                                      monkeypatch):
    data, teacher = discover(tiny_domains), load_teacher(tiny_teacher)
    every = np.random.default_rng(0).permutation(len(data.samples))
    spec = PreprocessSpec(teacher.image_size, teacher.image_size)
    store = open_store(data, every, spec, tmp_path / "store", progress=None)
    readers: list[str] = []
    real = store.gather
    store.gather = lambda rows: (readers.append(threading.current_thread().name),
                                 real(rows))[1]
    monkeypatch.setattr(cache, "load_prepared", no_decoding)
    got = cache.image_embeddings(teacher, RunDir(tmp_path / "runs" / "a"), data, store.indices,
                                 store.hashes, torch.device("cpu"), batch_size=8,
                                 pixels=DiskPixels(store))
    assert len(readers) == 9 and all(r.startswith("dgkit-prefetch") for r in readers)
    torch.testing.assert_close(got, independent_embeddings(teacher, data, store.indices),
                               rtol=1e-4, atol=1e-5)


def test_teacher_embeddings_decode_a_few_batches_at_a_time(tiny_domains, tiny_teacher,
                                                           tmp_path, monkeypatch):
    """Without the run's pixels (another size), each batch is decoded from the files, at most
    two batches ahead of the one being encoded."""
    data, teacher = discover(tiny_domains), load_teacher(tiny_teacher)
    indices = np.arange(len(data.samples))
    decoded, ahead = [], []
    monkeypatch.setattr(cache, "load_prepared",
                        lambda path, spec: (decoded.append(path), load_prepared(path, spec))[1])
    encode = teacher.encode_images
    monkeypatch.setattr(teacher, "encode_images",
                        lambda x: (ahead.append(len(decoded)), encode(x))[1])
    hashes = [f"h{i}" for i in indices]
    got = cache.image_embeddings(teacher, RunDir(tmp_path / "runs" / "a"), data, indices,
                                 hashes, torch.device("cpu"), batch_size=8)
    assert len(ahead) == 9 and len(decoded) == len(indices)
    assert all(n <= (k + 3) * 8 for k, n in enumerate(ahead))
    torch.testing.assert_close(got, independent_embeddings(teacher, data, indices),
                               rtol=1e-4, atol=1e-5)


def test_a_disk_run_takes_its_teacher_embeddings_from_the_store(tiny_domains, tiny_teacher,
                                                                tmp_path, monkeypatch):
    from dgkit import api
    from dgkit.train_config import TrainConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "load_prepared", no_decoding)
    api.train(TrainConfig(data=str(tiny_domains), targets=["sketch"], steps=2, eval_every=2,
                          image_size=32, student_weights="none", batch_size=12, device="cpu",
                          method="kd", teacher=tiny_teacher, data_store="disk"),
              tmp_path / "run", quiet=True)
    (path,) = (tmp_path / "run" / "cache").glob("image-*.safetensors")
    embeddings, keys = cache._read(path)
    data = discover(tiny_domains)
    by_hash = {content_hash(s.path.read_bytes()): i for i, s in enumerate(data.samples)}
    want = independent_embeddings(load_teacher(tiny_teacher), data, [by_hash[k] for k in keys])
    torch.testing.assert_close(embeddings, want, rtol=1e-4, atol=1e-5)


def test_calibration_images_come_from_the_store_a_disk_run_left(tiny_domains, tmp_path,
                                                                monkeypatch):
    from dgkit import pixel_store
    from dgkit.data import decode_samples, split_sources
    from dgkit.export import images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data, spec = discover(tiny_domains), PreprocessSpec(32, 32)
    sources = ["cartoon", "photo"]
    open_store(data, range(len(data.samples)), spec, progress=None)  # as a disk run leaves it
    monkeypatch.setattr(images, "decode_samples", no_decoding)
    monkeypatch.setattr(pixel_store, "decode_one", no_decoding)
    gathered: list[int] = []
    real = pixel_store.PixelStore.gather
    monkeypatch.setattr(pixel_store.PixelStore, "gather",
                        lambda self, rows: (gathered.append(len(rows)), real(self, rows))[1])
    got, info = images.calibration_pixels(data, sources, 0, 36, spec, tmp_path / "calib.npz")
    monkeypatch.undo()
    assert gathered == [36] and info["images"] == 36  # those rows alone, not the data set
    ids = [data.domains.index(d) for d in sources]
    rows = images.calibration_rows(data, ids, 0, 36)
    assert set(rows) <= set(split_sources(data, ids, 0)[0])
    assert np.array_equal(got, decode_samples(data, rows, spec, None).pixels)


def test_export_of_a_disk_run_reads_the_store(tiny_domains, tmp_path):
    """`dgkit export --int8` of a disk run: the calibration and parity images are read from the
    run's store, none decoded (a memory run leaves no store: its export decodes them)."""
    import os

    from cli_helpers import TINY, dgkit

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = tmp_path / "run"
    dgkit("distill", "--data", tiny_domains, "--target", "sketch", "--steps", "2",
          "--eval-every", "2", "--out", run, "--data-store", "disk", *TINY, env=env, check=True)
    proc = dgkit("export", run, "--int8", "--no-validate", "--calib-images", "36", env=env,
                 check=True)
    read = [line for line in proc.stderr.splitlines() if "read from the pixel store" in line]
    assert [line.split(":")[0] for line in read] == ["validation images", "calibration images"]
    assert "Decoding" not in proc.stderr
    assert (run / "export" / "model.int8.onnx").is_file()
