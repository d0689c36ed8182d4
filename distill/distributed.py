"""Data parallelism under torchrun: NCCL on GPU, gloo on CPU.

Every rank draws the same global batch (sampling depends only on seed and step) and trains on
its slice; gradients are averaged by hand, which also covers method-owned modules (a projector)
that live outside the student. Rank 0 alone evaluates and writes to the run directory.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard() -> slice:
    """This rank's part of each global batch: every world()-th image, from its rank on."""
    return slice(rank(), None, world())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    if world() == 1:
        return
    for p in params:
        if not p.requires_grad:  # frozen this step (a staged method), on every rank alike
            continue
        if p.grad is None:  # every rank must join every all_reduce
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world())


def sync_buffers(module: torch.nn.Module) -> None:
    """BatchNorm statistics from rank 0, as DistributedDataParallel does."""
    if world() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
