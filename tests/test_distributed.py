"""torchrun with 2 gloo processes on CPU: one run directory, a teacher cache sharded by rank."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import torch
from cli_helpers import TINY
from safetensors import safe_open
from safetensors.torch import load_file

from dgkit.distill.teacher import load_teacher
from dgkit.preprocess import PreprocessSpec, load_prepared


def test_two_gloo_ranks_train_one_run(tiny_domains, tiny_teacher, tmp_path):
    out = tmp_path / "runs" / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dgkit", "distill", "--data", str(tiny_domains),
         "--target", "sketch", "--method", "kd", "--teacher", tiny_teacher, "--steps", "4",
         "--eval-every", "2", "--out", str(out), "--device", "cpu", *TINY],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # written once, by rank 0
    assert json.loads((out / "summary.json").read_text())["finished"]
    (image_cache,) = (out / "cache").glob("image-*.safetensors")
    embeddings = load_file(str(image_cache))["embeddings"]
    assert embeddings.shape == (72, 32)  # both shards gathered
    assert not list(tmp_path.glob("runs/*/checkpoint.pt"))

    # Every row is the teacher's embedding of the image whose content hash keys it, computed
    # here in one process: a shard gathered into the wrong rows or left as zeros would show.
    with safe_open(str(image_cache), framework="pt") as fh:
        keys = json.loads(fh.metadata()["keys"])
    files = {hashlib.sha1(p.read_bytes()).hexdigest()[:20]: p
             for p in sorted(tiny_domains.rglob("*.png"))}
    assert sorted(keys) == sorted(files)
    teacher = load_teacher(tiny_teacher)
    spec = PreprocessSpec(teacher.image_size, teacher.image_size)
    pixels = np.stack([load_prepared(files[k], spec) for k in keys])
    with torch.no_grad():
        want = teacher.encode_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(embeddings, want.float(), rtol=1e-4, atol=1e-5)
