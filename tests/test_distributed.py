"""torchrun with 2 gloo processes on CPU: one run directory, a teacher cache sharded by rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cli_helpers import TINY
from safetensors.torch import load_file


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
    assert load_file(str(image_cache))["embeddings"].shape == (72, 32)  # both shards gathered
    assert not list(tmp_path.glob("runs/*/checkpoint.pt"))
