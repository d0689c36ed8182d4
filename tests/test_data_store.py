"""`dgkit distill --data-store`: the disk store trains the student memory mode trains, bit for
bit on a CPU, resumes exactly, and `auto` says which it chose."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from cli_helpers import TINY, dgkit, error_line
from safetensors.torch import load_file

from dgkit.records import RunConfig

FIXTURES = Path(__file__).parent / "fixtures" / "run_format1"


def _env(cache: Path) -> dict[str, str]:
    """The stores of a test go to its own cache, not the user's."""
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


def _train(data: Path, out: Path, cache: Path, *extra: str, steps: int = 6):
    return dgkit("distill", "--data", data, "--target", "sketch", "--steps", steps,
                 "--eval-every", "3", "--out", out, *TINY, *extra, env=_env(cache), check=True)


def _stores(cache: Path) -> list[Path]:
    folder = cache / "dgkit" / "pixels"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("images_per_s")
    return rows


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert _metrics(a) == _metrics(b)
    assert json.loads((a / "summary.json").read_text()) == \
        json.loads((b / "summary.json").read_text())


def test_evaluation_batches_are_read_ahead_from_disk_and_equal_memory(tiny_domains, tmp_path):
    """Evaluation reads a disk store in background threads, at most READ_AHEAD batches ahead
    of the one in use, and sees the bytes memory mode sees."""
    import threading

    import numpy as np
    import torch

    from dgkit.data import decode_samples, discover
    from dgkit.distill import data_store
    from dgkit.pixel_store import open_store
    from dgkit.preprocess import PreprocessSpec

    data, spec = discover(tiny_domains), PreprocessSpec(32, 32)
    every = np.random.default_rng(0).permutation(len(data.samples))
    store = open_store(data, every, spec, tmp_path / "store", progress=None)
    memory = torch.from_numpy(decode_samples(data, every, spec, None).pixels
                              ).permute(0, 3, 1, 2).contiguous()
    readers: list[str] = []
    real = store.gather
    store.gather = lambda rows: (readers.append(threading.current_thread().name),
                                 real(rows))[1]
    rows = np.random.default_rng(1).permutation(len(store))[:50]
    streamed = data_store.batches(data_store.DiskPixels(store), rows, 4)
    chunk, first = next(streamed)  # 13 batches in all
    assert len(readers) <= 1 + data_store.READ_AHEAD
    got = [(chunk, first), *streamed]
    assert len(readers) == len(got) == 13
    assert all(name.startswith("dgkit-prefetch") for name in readers)
    want = list(data_store.batches(memory, rows, 4))
    assert all(np.array_equal(a, c) and torch.equal(b, d)
               for (a, b), (c, d) in zip(got, want, strict=True))
    assert np.array_equal(np.concatenate([c for c, _ in got]), rows)
    assert torch.equal(torch.cat([b for _, b in got]), memory[torch.from_numpy(rows)])


@pytest.mark.parametrize("average", [
    [],  # the best-validation student
    ["--average", "swad", "--swad-bn-batches", "3"],  # BatchNorm refreshed on source batches
])
def test_disk_trains_the_student_memory_trains(tiny_domains, tmp_path, average):
    """The same weights, and the same evaluations (metrics.jsonl: every source-validation and
    target accuracy and loss), from memory and from disk."""
    cache = tmp_path / "cache"
    _train(tiny_domains, tmp_path / "memory", cache, "--data-store", "memory", *average)
    assert _stores(cache) == []
    _train(tiny_domains, tmp_path / "disk", cache, "--data-store", "disk", *average)
    (store,) = _stores(cache)
    assert (store / "pixels.u8").stat().st_size == 72 * 32 * 32 * 3
    assert_same_run(tmp_path / "memory", tmp_path / "disk")
    train = json.loads((tmp_path / "disk" / "run.json").read_text())["train"]
    assert (train["data_store"], train["memory_budget"]) == ("disk", None)


def test_an_interrupted_disk_run_resumes_exactly(tiny_domains, tmp_path, monkeypatch):
    """Interrupted after 4 of 6 steps (a checkpoint at the step boundary, as Ctrl-C makes) and
    resumed: the read-ahead starts again at step 4 and the run ends as an uninterrupted one."""
    from dgkit import api
    from dgkit.distill.trainer import Trainer
    from dgkit.errors import Interrupted
    from dgkit.train_config import TrainConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = dict(data=str(tiny_domains), targets=["sketch"], steps=6, eval_every=3,
                  image_size=32, student_weights="none", batch_size=12, device="cpu",
                  data_store="disk")
    api.train(TrainConfig(**config), tmp_path / "whole", quiet=True)
    real, interrupt = Trainer.step, [True]

    def step(self, s, k):
        if k == 4 and interrupt[0]:
            raise KeyboardInterrupt
        return real(self, s, k)

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(Interrupted, match="interrupted at step 4"):
        api.train(TrainConfig(**config), tmp_path / "resumed", quiet=True)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    interrupt[0] = False
    api.resume(tmp_path / "resumed", quiet=True)
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


def test_a_memory_run_resumes_from_the_disk_store_when_asked(tiny_domains, tmp_path,
                                                              monkeypatch):
    """`dgkit distill --resume RUN --data-store disk` on a run interrupted in memory mode: it
    goes on from a disk store, ends as the uninterrupted run, and its run.json says disk."""
    from dgkit import api
    from dgkit.distill.trainer import Trainer
    from dgkit.errors import Interrupted
    from dgkit.train_config import TrainConfig

    config = dict(data=str(tiny_domains), targets=["sketch"], steps=6, eval_every=3,
                  image_size=32, student_weights="none", batch_size=12, device="cpu")
    api.train(TrainConfig(**config), tmp_path / "whole", quiet=True)
    real = Trainer.step

    def step(self, s, k):
        if k == 4:
            raise KeyboardInterrupt
        return real(self, s, k)

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(Interrupted):
        api.train(TrainConfig(**config), tmp_path / "resumed", quiet=True)
    cache = tmp_path / "cache"
    before = {f: (tmp_path / "resumed" / f).read_bytes() for f in ("run.json", "checkpoint.pt")}
    for bad, says in ((["--data-store", "tape"], "--data-store 'tape' is not one of"),
                      (["--memory-budget", "2"], "--memory-budget applies to --data-store auto")):
        proc = dgkit("distill", "--resume", tmp_path / "resumed", *bad, "--quiet",
                     env=_env(cache))
        assert proc.returncode != 0 and says in error_line(proc)
        assert {f: (tmp_path / "resumed" / f).read_bytes() for f in before} == before
    dgkit("distill", "--resume", tmp_path / "resumed", "--data-store", "disk", "--quiet",
          env=_env(cache), check=True)
    assert len(_stores(cache)) == 1
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")
    train = json.loads((tmp_path / "resumed" / "run.json").read_text())["train"]
    assert (train["data_store"], train["memory_budget"]) == ("disk", None)


def test_auto_picks_disk_past_the_budget_and_memory_within(tiny_domains, tmp_path):
    cache = tmp_path / "cache"
    small = _train(tiny_domains, tmp_path / "small", cache, "--data-store", "auto",
                   "--memory-budget", "0.0001", steps=3)
    line = " ".join(small.stderr.split())
    assert ("data store: disk: the 72 decoded images take 0.000221 GB, more than the budget of "
            "0.0001 GB (--memory-budget)") in line
    assert len(_stores(cache)) == 1
    large = _train(tiny_domains, tmp_path / "large", cache / "other", "--data-store", "auto",
                   "--memory-budget", "1000", steps=3)
    assert "data store: memory: the 72 decoded images take 0.000221 GB, within the budget of " \
           "1000 GB (--memory-budget)" in " ".join(large.stderr.split())
    assert _stores(cache / "other") == []


def test_the_default_budget_is_half_the_available_memory(monkeypatch):
    import torch

    from dgkit.distill import data_store

    monkeypatch.setattr(data_store, "host_available", lambda: 8_000_000_000)
    assert data_store.default_budget(torch.device("cpu")) == (
        4_000_000_000, "50% of the 8 GB of available host memory")
    monkeypatch.setattr(data_store, "host_available", lambda: None)
    assert data_store.default_budget(torch.device("cpu")) == (
        None, "available host memory unknown")


@pytest.mark.parametrize("args, message", [
    (["--data-store", "tape"], "--data-store 'tape' is not one of: memory, disk, auto"),
    (["--data-store", "disk", "--memory-budget", "4"],
     "--memory-budget applies to --data-store auto only, not --data-store disk"),
    (["--data-store", "auto", "--memory-budget", "0"],
     "--memory-budget must be a positive number of GB, got 0"),
])
def test_bad_values_fail_in_one_line(tiny_domains, tmp_path, args, message):
    proc = dgkit("distill", "--data", tiny_domains, "--target", "sketch", *args, "--out",
                 tmp_path / "run", *TINY, env=_env(tmp_path / "cache"))
    assert proc.returncode == 2
    assert re.search(re.escape(message), error_line(proc))
    assert not (tmp_path / "run").exists() and _stores(tmp_path / "cache") == []


def test_a_run_json_without_the_options_loads_with_memory(tmp_path):
    """run.json files written before --data-store take the default."""
    raw = json.loads((FIXTURES / "erm" / "run.json").read_text())
    config = RunConfig.from_dict(raw, "run.json")
    assert (config.train.data_store, config.train.memory_budget) == ("memory", None)
    written = config.to_dict()
    for key in ("data_store", "memory_budget"):
        del written["train"][key]
    assert RunConfig.from_dict(written, "run.json").train.data_store == "memory"


def test_a_disk_too_full_stops_before_training(tiny_domains, tmp_path, monkeypatch):
    """--data-store disk on a disk without room for the store: one sentence with the space
    needed and free, before any step, and neither the store nor the run's weights written."""
    from collections import namedtuple

    from dgkit import api, pixel_store
    from dgkit.distill.trainer import Trainer
    from dgkit.errors import DgkitError
    from dgkit.train_config import TrainConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pixel_store.shutil, "disk_usage", lambda path: usage(10**9, 0, 5000))
    monkeypatch.setattr(Trainer, "step", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(DgkitError) as err:
        api.train(TrainConfig(data=str(tiny_domains), targets=["sketch"], steps=2,
                              image_size=32, student_weights="none", batch_size=12,
                              device="cpu", data_store="disk"), tmp_path / "run", quiet=True)
    message = str(err.value)
    assert "\n" not in message and "not enough disk space for the pixel store" in message
    assert f"({72 * 32 * 32 * 3} bytes) and 5.0 KB (5000 bytes) are free" in message
    assert _stores(tmp_path / "cache") == []
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_a_rank_reads_only_its_shard_of_each_batch(tiny_domains, tmp_path):
    """Under torchrun a rank's feed reads the rows of its slice of each global batch and no
    other; the batch comes back whole, its slice equal to memory's, zeros elsewhere."""
    import numpy as np
    import torch

    from dgkit.data import decode_samples, discover
    from dgkit.distill.data_store import BatchFeed, DiskPixels
    from dgkit.pixel_store import open_store
    from dgkit.preprocess import PreprocessSpec

    data, spec = discover(tiny_domains), PreprocessSpec(32, 32)
    every = np.arange(len(data.samples))
    store = open_store(data, every, spec, tmp_path / "store", progress=None)
    memory = torch.from_numpy(decode_samples(data, every, spec, None).pixels
                              ).permute(0, 3, 1, 2).contiguous()
    gathered: list[np.ndarray] = []
    real = store.gather
    store.gather = lambda rows: (gathered.append(np.array(rows)), real(rows))[1]

    def batch(step: int) -> np.ndarray:
        return np.random.default_rng(step).permutation(len(store))[:12]

    feed = BatchFeed(DiskPixels(store), batch, slice(1, None, 2))
    for step in (0, 1, 5):  # 5: a jump, as a resume makes, restarts the read-ahead there
        got, rows = feed(step), batch(step)
        assert got.shape == (12, 3, 32, 32)
        assert torch.equal(got[1::2], memory[rows[1::2]]) and not got[0::2].any()
    feed.close()
    shards = [batch(k)[1::2] for k in range(12)]
    assert gathered and all(any(np.array_equal(g, s) for s in shards) for g in gathered)


def test_two_ranks_train_from_disk_what_they_train_from_memory(tiny_domains, tmp_path):
    """torchrun, 2 gloo ranks: each reads its shard of every batch from the store, and the run
    (with SWAD's BatchNorm refresh on rank 0, which reads whole batches) equals memory's."""
    import subprocess
    import sys

    runs = {}
    for store in ("memory", "disk"):
        runs[store] = tmp_path / store
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "dgkit", "distill", "--data", str(tiny_domains), "--target", "sketch",
             "--steps", "6", "--eval-every", "3", "--average", "swad", "--swad-bn-batches",
             "2", "--out", str(runs[store]), "--device", "cpu", "--data-store", store, *TINY],
            capture_output=True, text=True, timeout=300,
            env={**_env(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_stores(tmp_path / "cache")) == 1
    assert_same_run(runs["memory"], runs["disk"])
