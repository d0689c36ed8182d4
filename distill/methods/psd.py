"""Progressive self-distillation: the model's own earlier predictions soften its targets.

Andonian et al. (CVPR 2022) use it for CLIP pre-training; the classifier form is PS-KD (Kim et
al., ICCV 2021, github.com/lgcnsai/PS-KD-Pytorch):

    target = (1 - a_t) * onehot(y) + a_t * p_prev(x),   a_t = a_T * (epoch + 1) / E,  a_T = 0.8
    loss   = -sum_c target_c * log softmax(z_s)_c        (soft-target cross-entropy)

epoch = step // steps_per_epoch and E = ceil(total_steps / steps_per_epoch). With --previous
epoch (PS-KD), p_prev(x) is the softmax the model gave image x (its augmented view, in train
mode, as PS-KD) when it last trained on it, kept per image in a buffer so that a resumed run is
exact and, under torchrun, gathered from every rank; where the model has not seen the
image yet, p_prev is the one-hot label, as PS-KD does in its first epoch. dgkit's balanced
sampler walks each domain at its own pace, so "the previous epoch" is "the previous visit".
With --previous ema, p_prev(x) is the softmax of an exponential moving average of the student
(decay --previous-decay, eval mode) on the current batch.

No teacher is needed: with --base none (default) this is the one method whose accuracy means
something without CLIP weights. --base kd|rise|scmd|vl2v adds that method's loss terms (with its
authors' defaults), head, sample selection and stages; the soft-target term is added to them
(the base's own hard-label CE stays). The base then reads the run's prompts (--templates,
default RISE's ensemble) rather than its own, and needs --teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.distill import distributed
from dgkit.distill.methods.base import (
    Batch,
    Method,
    MethodContext,
    get_method,
    method_names,
    register,
)
from dgkit.errors import DgkitError


@register
class PSD(Method):
    name = "psd"
    summary = ("progressive self-distillation (PS-KD): targets mix the label with the model's "
               "own earlier prediction; no teacher; --base adds a CLIP method's terms")
    needs_teacher = False
    sources = {"alpha": "lgcnsai/PS-KD-Pytorch main.py:69 (alpha_T), :323 (the ramp)",
               "previous": "lgcnsai/PS-KD-Pytorch main.py:420-432 (the last epoch's "
                           "prediction of each image)"}

    @dataclass
    class Hparams:
        alpha: float = 0.8  # a_T
        previous: str = "epoch"  # epoch (PS-KD: the last prediction per image) or ema
        previous_decay: float = 0.999  # of the EMA copy (--previous ema)
        base: str = "none"  # none or a method to combine with (kd, rise, scmd, vl2v)
        weight: float = 1.0  # of the soft-target term

        def __post_init__(self) -> None:
            if self.previous not in ("epoch", "ema"):
                raise DgkitError(f"--previous must be epoch or ema, got '{self.previous}'")
            bases = [n for n in method_names() if n != "psd"]
            if self.base != "none" and self.base not in bases:
                raise DgkitError(f"--base '{self.base}' is not one of: none, {', '.join(bases)}")
            if not 0.0 <= self.alpha <= 1.0:
                raise DgkitError(f"--alpha must be in [0, 1], got {self.alpha}")

    def __init__(self, hparams: Hparams, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        base = None
        if hparams.base != "none":
            cls = get_method(hparams.base)
            if cls.needs_teacher and ctx.teacher is None:
                raise DgkitError(f"--method psd --base {hparams.base} needs the CLIP teacher: "
                                 "pass --teacher (e.g. ViT-B-32:openai)")
            base = cls(cls.Hparams(), ctx)
        self.base = base
        rows = ctx.num_images if hparams.previous == "epoch" else 0
        self.register_buffer("previous", torch.zeros(rows, ctx.num_classes))
        # Images visited before: the rest get one-hot targets, also under --previous ema.
        self.register_buffer("seen", torch.zeros(ctx.num_images, dtype=torch.bool))
        self.ema: nn.Module | None = None  # --previous ema: a copy of the student, made lazily
        self._pending_ema: dict[str, torch.Tensor] | None = None

    @classmethod
    def total_steps(cls, hparams: Hparams) -> int | None:
        if hparams.base == "none":
            return None
        base = get_method(hparams.base)
        return base.total_steps(base.Hparams())

    def stage_starts(self) -> list[int]:
        return [0] if self.base is None else self.base.stage_starts()

    def param_groups(self):
        return [] if self.base is None else self.base.param_groups()

    def head_kind(self) -> str:
        return self.head if self.base is None else self.base.head_kind()

    def init_head(self, head: nn.Module) -> None:
        if self.base is not None:
            self.base.init_head(head)

    def alpha_at(self, step: int) -> float:
        """a_t = a_T * (epoch + 1) / E."""
        per_epoch = self.ctx.steps_per_epoch
        epochs = max(1, math.ceil(self.ctx.total_steps / per_epoch))
        return self.hp.alpha * (step // per_epoch + 1) / epochs

    def soft_targets(self, batch: Batch) -> torch.Tensor:
        """(1 - a_t) * onehot(y) + a_t * p_prev(x); rows sum to one."""
        onehot = F.one_hot(batch.labels, self.ctx.num_classes).float()
        seen = self.seen[batch.indices].unsqueeze(1)
        if self.hp.previous == "ema":
            with torch.no_grad():
                previous = F.softmax(self.ema.eval()(batch.images).float(), dim=-1)
        else:
            previous = self.previous[batch.indices]
        previous = torch.where(seen, previous, onehot)
        a = self.alpha_at(batch.step)
        return (1.0 - a) * onehot + a * previous

    def select(self, student, batch):
        return batch if self.base is None else self.base.select(student, batch)

    def set_trainable(self, student, step):
        if self.base is not None:
            self.base.set_trainable(student, step)
        if self.hp.previous != "ema":
            return
        if self.ema is None:
            self.ema = copy.deepcopy(student).requires_grad_(False)
            if self._pending_ema is not None:  # resumed: the checkpoint's average
                self.ema.load_state_dict(self._pending_ema)
                self._pending_ema = None
        if step > 0:  # average in the weights of the previous step
            with torch.no_grad():
                for avg, now in zip(self.ema.parameters(), student.parameters(), strict=True):
                    avg.lerp_(now, 1.0 - self.hp.previous_decay)
                for avg, now in zip(self.ema.buffers(), student.buffers(), strict=True):
                    avg.copy_(now)

    def losses(self, student, features, logits, batch):
        terms = {} if self.base is None else dict(
            self.base.losses(student, features, logits, batch))
        target = self.soft_targets(batch)
        soft_ce = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        terms["psd"] = self.hp.weight * soft_ce
        self.remember(batch.indices, F.softmax(logits.detach().float(), dim=-1))
        return terms

    @torch.no_grad()
    def remember(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        """Mark the images seen and store this step's predictions; under torchrun every rank
        stores every rank's slice, so the tables stay identical (rank 0's checkpoint holds
        them all)."""
        if distributed.world() > 1:
            parts = distributed.all_gather_object((indices.cpu(), probs.cpu()))
            indices = torch.cat([i for i, _ in parts]).to(self.previous.device)
            probs = torch.cat([p for _, p in parts]).to(self.previous.device)
        if self.hp.previous == "epoch":
            self.previous[indices] = probs
        self.seen[indices] = True

    def after_step(self, step):
        if self.base is not None:
            self.base.after_step(step)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The EMA copy is made at the first step; keep its stored weights until then."""
        if self.ema is None:
            ema = {k[4:]: v for k, v in state_dict.items() if k.startswith("ema.")}
            self._pending_ema = ema or None
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("ema.")}
        return super().load_state_dict(state_dict, strict, assign)
