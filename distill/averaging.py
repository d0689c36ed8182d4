"""Weight averaging any method can use: SMA and SWAD (EMA and SWA are torch's AveragedModel).

SMA is SCMD's `MovingAvg` (SeanLeng1/SCMD, DomainBed/domainbed/algorithms.py): up to the step
`start` the averaged network is the current one; from there on it is the uniform average of every
step's weights, seeded, as theirs is, with the weights of the step before `start`.

SWAD is Cha et al., NeurIPS 2021 (khanrc/swad, domainbed/swad.py `LossValley`, trainer.py): every
step's weights go into a segment that each evaluation closes with the validation loss of the
current network; `LossValley` picks the contiguous run of segments to average from those losses
only, and the BatchNorm statistics of the average are recomputed afterwards (`update_bn`).

Their code reaches its window through queues of segment averages; `LossValley` here states the
window as a rule (its docstring) and counts each segment in it once, the paper's uniform average
over [t_s, t_e]. Checked against their class on random loss sequences, the windows agree except
where their queues miscount: they count the minimum-loss segment twice when n_tolerance >
n_converge and leave it out when n_tolerance <= n_converge (adding the n_converge - n_tolerance
segments after it unconditionally when n_tolerance < n_converge); a convergence within the first
n_tolerance evaluations, or training that ends within n_tolerance - n_converge evaluations of the
convergence, re-adds queued segments, some from before the window. The average also weighs every
step alike, so a shorter last segment weighs less (they average segment means, all of one length
in their runs).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

State = dict[str, torch.Tensor]


def _snapshot(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _blend(mean: State, new: Mapping[str, torch.Tensor], weight: float) -> None:
    """mean <- mean + weight * (new - mean) for floating tensors; the others take `new`."""
    with torch.no_grad():
        floats = [k for k, t in mean.items() if t.is_floating_point() and weight != 1.0]
        if floats:  # one fused call per step rather than one kernel per tensor
            torch._foreach_lerp_([mean[k] for k in floats],
                                 [new[k].to(mean[k].dtype) for k in floats], weight)
        for k in mean.keys() - set(floats):
            mean[k].copy_(new[k])


@dataclass
class Mean:
    """The uniform mean of the weights after steps first..last (`count` of them)."""

    state: State
    count: int
    first: int
    last: int

    def add(self, state: Mapping[str, torch.Tensor], count: int, first: int, last: int) -> None:
        self.count += count
        _blend(self.state, state, count / self.count)
        self.first, self.last = min(self.first, first), max(self.last, last)

    def merge(self, other: Mean) -> None:
        self.add(other.state, other.count, other.first, other.last)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "count": self.count, "first": self.first,
                "last": self.last}


class SMA:
    """SCMD's MovingAvg. After optimiser step t (1-based): for t < start the network is the
    current one; for t >= start it is the mean of the weights after steps start-1, ..., t
    (after steps 0..t when start <= 1). Parameters and float buffers (BatchNorm statistics
    included) are averaged, as theirs are; no BatchNorm refresh."""

    def __init__(self, model: nn.Module, start: int) -> None:
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.start = start
        self.count = 1  # MovingAvg's copy of the initial network

    def update(self, model: nn.Module, step: int) -> None:
        """After the optimiser step with 0-based index `step` (weights after step + 1 steps)."""
        state = self.module.state_dict()
        if step + 1 < self.start:
            self.count = 1
            _blend(state, model.state_dict(), 1.0)
        else:
            self.count += 1
            _blend(state, model.state_dict(), 1.0 / self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "count": self.count}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.module.load_state_dict(payload["module"])
        self.count = payload["count"]


@dataclass
class LossValley:
    """SWAD's window from the validation losses alone, fed one loss per evaluation; evaluation
    i closes segment i (the steps since evaluation i-1) and l_i is the loss at its end.

    - Convergence: c is the first i with l_i <= l_{i+1}, ..., l_{i+n_converge-1} (known n_converge-1
      evaluations later); threshold T = (1 + tolerance_ratio) * mean(l_c..l_{c+n_converge-1}).
    - Start: segment j < c joins when j >= c - (n_tolerance - n_converge) + 1, j >= 1, and the
      losses l_{j-1}..l_{c-1} (from the loss at its beginning on) are all <= T.
    - End: segments after c join while the loss returns to <= T within n_tolerance evaluations:
      the last segment is the last one with l <= T; n_tolerance losses > T in a row end the valley
      ("dead": training may stop) and a run of losses > T still open at the end is left out.
    - Never converged: the last segment alone, as `get_final_model` returns.
    """

    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    losses: list[float] = field(default_factory=list)
    converged: int | None = None  # c
    threshold: float | None = None
    start: int | None = None
    end: int | None = None
    pending: list[int] = field(default_factory=list)  # losses > T since `end`
    dead: bool = False

    def observe(self, loss: float) -> list[int]:
        """Record the loss closing the next segment; return the segments that join the average."""
        i = len(self.losses)
        self.losses.append(float(loss))
        if self.dead:
            return []
        if self.threshold is None:
            c = i - self.n_converge + 1
            if c < 0 or self.losses[c] > min(self.losses[c:]):
                return []
            return self._converge(c, i)
        return self._follow(i)

    def _converge(self, c: int, i: int) -> list[int]:
        ls = self.losses
        self.converged = c
        self.threshold = th = (1.0 + self.tolerance_ratio) * sum(ls[c:i + 1]) / (i + 1 - c)
        lowest = max(1, c - (self.n_tolerance - self.n_converge) + 1)
        start = c
        while start - 1 >= lowest and ls[start - 2] <= th and ls[start - 1] <= th:
            start -= 1
        self.start, self.end = start, c
        joined = list(range(start, c + 1))
        for j in range(c + 1, i + 1):
            joined += self._follow(j)
        return joined

    def _follow(self, j: int) -> list[int]:
        if self.losses[j] <= self.threshold:
            joined, self.pending, self.end = [*self.pending, j], [], j
            return joined
        self.pending.append(j)
        if len(self.pending) >= self.n_tolerance:
            self.dead, self.pending = True, []
        return []

    def first_needed(self) -> int:
        """The oldest segment that may still join: older ones can be forgotten."""
        i = len(self.losses) - 1
        if self.dead:
            return i + 1
        if self.threshold is None:  # the next convergence's look-back; keep the newest
            return max(0, min(i, i - self.n_tolerance + 3, i - self.n_converge + 2))
        return self.pending[0] if self.pending else i + 1

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("losses", "converged", "threshold", "start", "end",
                                               "pending", "dead")}


class SWAD:
    """Dense averaging of every step's weights over the window `LossValley` chooses."""

    def __init__(self, valley: LossValley) -> None:
        self.valley = valley
        self.segment: Mean | None = None  # the steps since the last evaluation
        self.closed: dict[int, Mean] = {}  # segments not yet decided, by index
        self.window: Mean | None = None
        self.batchnorm: list[str] = []  # BatchNorm layers in training mode at the last step

    @property
    def dead(self) -> bool:
        return self.valley.dead

    def update(self, model: nn.Module, step: int) -> None:
        """After the optimiser step with 0-based index `step`."""
        if self.segment is None:
            self.segment = Mean(_snapshot(model), 1, step + 1, step + 1)
        else:
            self.segment.add(model.state_dict(), 1, step + 1, step + 1)
        self.batchnorm = [n for n, m in model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def evaluated(self, loss: float) -> None:
        """An evaluation closed the current segment with this validation loss."""
        if self.segment is None:
            raise RuntimeError("SWAD: an evaluation closed an empty segment")
        self.closed[len(self.valley.losses)] = self.segment
        self.segment = None
        for j in self.valley.observe(loss):
            part = self.closed.pop(j)
            if self.window is None:
                self.window = part
            else:
                self.window.merge(part)
        keep = self.valley.first_needed()
        self.closed = {j: m for j, m in self.closed.items() if j >= keep}

    def result(self) -> Mean:
        """The average to deploy: the window's, or the last segment's if the loss never
        converged."""
        if self.window is not None:
            return self.window
        if not self.closed:
            raise RuntimeError("SWAD: no evaluation closed a segment")
        return self.closed[max(self.closed)]

    def state_dict(self) -> dict[str, Any]:
        return {"valley": self.valley.to_dict(),
                "segment": self.segment.to_dict() if self.segment else None,
                "closed": [[j, m.to_dict()] for j, m in sorted(self.closed.items())],
                "window": self.window.to_dict() if self.window else None,
                "batchnorm": list(self.batchnorm)}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        for k, v in payload["valley"].items():
            setattr(self.valley, k, v)
        self.segment = Mean(**payload["segment"]) if payload["segment"] else None
        self.closed = {j: Mean(**m) for j, m in payload["closed"]}
        self.window = Mean(**payload["window"]) if payload["window"] else None
        self.batchnorm = list(payload["batchnorm"])


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                      names: Collection[str]) -> None:
    """The authors' `update_bn` (torch.optim.swa_utils.update_bn): the running statistics of
    the BatchNorm layers named in `names` restart and become the plain average over `batches`
    (momentum None), the model in training mode; other BatchNorm layers (frozen by the method)
    keep theirs and stay in eval mode."""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    refresh = {n: m for n, m in layers.items() if n in names and m.track_running_stats}
    if not refresh:
        return
    was_training = model.training
    model.train()
    momenta = {}
    for name, m in layers.items():
        if name in refresh:
            m.reset_running_stats()
            momenta[name], m.momentum = m.momentum, None
        else:
            m.eval()
    for x in batches:
        model(x)
    for name, momentum in momenta.items():
        refresh[name].momentum = momentum
    model.train(was_training)
