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


def test_a_store_view_reads_only_the_rows_asked_for(tiny_domains, tmp_path):
    from dgkit import pixel_store
    from dgkit.data import decode_samples
    from dgkit.export.images import read_batches

    data, spec = discover(tiny_domains), PreprocessSpec(32, 32)
    store = open_store(data, range(len(data.samples)), spec, tmp_path / "store", progress=None)
    view = pixel_store.StoreView(store)
    assert len(view) == len(store) and view.shape == (len(store), 32, 32, 3)
    assert view.dtype == np.uint8

    def decoded(rows) -> np.ndarray:
        return decode_samples(data, store.indices[rows], spec, None).pixels

    picked = view[[5, 2, 7]][np.array([2, 0])]  # composed: rows 7 and 5, nothing read yet
    assert isinstance(picked, pixel_store.StoreView) and len(picked) == 2
    assert np.array_equal(picked[:], decoded([7, 5]))
    assert np.array_equal(view[3], decoded([3])[0])
    every_third = view[np.arange(len(view)) % 3 == 0]
    assert np.array_equal(np.asarray(every_third), decoded(slice(0, None, 3)))
    readers: list[str] = []
    real = store.gather
    store.gather = lambda rows: (readers.append(threading.current_thread().name), real(rows))[1]
    got = list(read_batches(view[np.arange(len(view))[::-1]], 5))
    assert [len(b) for b in got] == [5] * 14 + [2]
    assert len(readers) == 15 and all(r.startswith("dgkit-prefetch") for r in readers)
    assert np.array_equal(np.concatenate(got), decoded(slice(None, None, -1)))


def test_validation_of_a_disk_run_streams_the_store(tiny_domains, tiny_teacher, tmp_path,
                                                    monkeypatch):
    """`dgkit export` of a disk run validates on its pixel store a batch at a time, never
    holding every validation image at once, and reports what validation without a store does."""
    from dgkit import api, pixel_store
    from dgkit.export import images
    from dgkit.export import validate as validation
    from dgkit.export.exporter import ExportOptions
    from dgkit.train_config import TrainConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    api.train(TrainConfig(data=str(tiny_domains), targets=["sketch"], steps=2, eval_every=2,
                          image_size=32, student_weights="none", batch_size=12, device="cpu",
                          method="kd", teacher=tiny_teacher, data_store="disk"), run, quiet=True)
    reads: list[tuple[int, str]] = []
    real = pixel_store.PixelStore.gather
    with monkeypatch.context() as m:
        m.setattr(validation, "EVAL_BATCH", 8)
        m.setattr(images, "decode_samples", no_decoding)
        m.setattr(pixel_store, "decode_one", no_decoding)
        m.setattr(pixel_store.PixelStore, "gather", lambda self, rows: (
            reads.append((len(rows), threading.current_thread().name)), real(self, rows))[1])
        streamed = api.export(run, ExportOptions(latency_runs=0))["report"]
    total = sum(streamed.images.values())
    ran = [r.key for r in streamed.artifacts if r.accuracy]
    batches = [n for n, thread in reads if thread.startswith("dgkit-prefetch")]
    assert total > 8 and len(ran) == 2  # torch FP32 and the FP32 ONNX
    assert max(n for n, _ in reads) < total  # the parity and latency images alone, or a batch
    assert max(batches) == 8 and sum(batches) == len(ran) * total

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-store"))  # decoded from the files
    decoded = api.validate(run, latency_runs=0)
    assert decoded.images == streamed.images
    for a, b in zip(streamed.artifacts, decoded.artifacts, strict=True):
        assert a.accuracy and (a.key, a.accuracy) == (b.key, b.accuracy)
        assert (a.agreement, a.agreement_by_set) == (b.agreement, b.agreement_by_set)
