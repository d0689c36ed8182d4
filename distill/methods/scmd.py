"""SCMD: selective cross-modality distillation (Leng, Li and Wang, TMLR 2024).

Follows the official code (github.com/SeanLeng1/SCMD, class SCMD in
`DomainBed/domainbed/algorithms.py`).

    loss = CE(z_s, y) + l1 * KD_T(z_t, z_s) + l2 * KD_T(z_t, exp(s) * norm(P f) . t^T)
    T = 3, l1 = l2 = 0.5, P = Linear(d, D, bias=False), s = log(1 / 0.07) learned,
    clamped to [0, log 100] after every step; t from the prompt "this is a photo of a {}".

Hard-sample selection: while step <= int(select_until * total_steps) (the official
`step <= int(5000 * (1 - last_k_epoch))`), the per-sample CE is computed without gradient and
only the top int(select_fraction * batch) samples by that loss (at least one) are used for the
whole update; afterwards the full batch. The selection forward runs in eval mode: the official
student's BatchNorm is frozen (eval) and its dropout is 0, and eval mode here leaves no trace
(running statistics, dropout draws) of the extra forward pass.

--freeze-bn (default true) keeps the student's BatchNorm layers in eval mode during training, as
the official ResNet student does; --freeze-bn false lets them adapt (dgkit's erm/kd).

P and s belong to the method: they are trained and checkpointed, not exported.

s trains in its own optimiser group at --logit-scale-lr (the official 1e-4) without weight
decay, scaled by the run's schedule.

Deviations: D is the teacher's embedding width; under torchrun each rank keeps the top fraction
of its own slice of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.distill.methods.base import Batch, Method, MethodContext, kd_loss, register
from dgkit.errors import DgkitError

MAX_LOGIT_SCALE = math.log(100.0)
_REGISTRY = "SeanLeng1/SCMD DomainBed/domainbed/hparams_registry.py"


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics fixed, still trainable)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register
class SCMD(Method):
    name = "scmd"
    summary = ("CE + KD + cross-modal KD through a projector onto the text embeddings, on the "
               "hardest samples of each batch for most of training")
    needs_teacher = True
    templates = ("this is a photo of a {}",)
    sources = {
        "temperature": f"{_REGISTRY}:100",
        "kd_weight": f"{_REGISTRY}:96",
        "cm_weight": f"{_REGISTRY}:97",
        "select_fraction": f"{_REGISTRY}:99 (worst_case_p)",
        "select_until": f"{_REGISTRY}:98 (1 - last_k_epoch), algorithms.py:1281",
        "freeze_bn": "SeanLeng1/SCMD DomainBed/domainbed/networks.py:176-190",
        "logit_scale_lr": "SeanLeng1/SCMD DomainBed/domainbed/algorithms.py:1255",
    }

    @dataclass
    class Hparams:
        temperature: float = 3.0
        kd_weight: float = 0.5  # lambda1
        cm_weight: float = 0.5  # lambda2, on the cross-modal term
        select_fraction: float = 0.2  # worst_case_p
        select_until: float = 0.75  # 1 - last_k_epoch
        freeze_bn: bool = True
        logit_scale_lr: float = 1e-4

        def __post_init__(self) -> None:
            if not 0.0 < self.select_fraction <= 1.0:
                raise DgkitError(f"--select-fraction must be in (0, 1], got "
                                 f"{self.select_fraction}")
            if not 0.0 <= self.select_until <= 1.0:
                raise DgkitError(f"--select-until must be in [0, 1], got {self.select_until}")

    def __init__(self, hparams: Hparams, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        text = ctx.text_embeddings.detach().float().clone()
        self.register_buffer("text", text, persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        # Trained with the student but not part of it: the deployed head is the linear one.
        self.projector = nn.Linear(ctx.feature_dim, text.shape[1], bias=False)

    def selecting(self, step: int) -> bool:
        return step <= int(self.hp.select_until * self.ctx.total_steps)

    def select(self, student: nn.Module, batch: Batch) -> Batch:
        if not self.selecting(batch.step):
            return batch
        keep = max(1, int(len(batch.labels) * self.hp.select_fraction))
        modes = [(m, m.training) for m in student.modules()]
        student.eval()
        try:
            with torch.no_grad():
                loss = F.cross_entropy(student(batch.images).float(), batch.labels,
                                       reduction="none")
        finally:
            for m, mode in modes:
                m.training = mode
        order = torch.sort(loss, descending=True, stable=True).indices
        return batch.subset(order[:keep])

    def param_groups(self):
        return [{"params": [self.logit_scale], "lr": self.hp.logit_scale_lr,
                 "weight_decay": 0.0}]

    def set_trainable(self, student, step):
        if self.hp.freeze_bn:
            freeze_batchnorm(student)

    def cross_modal_logits(self, features: torch.Tensor) -> torch.Tensor:
        """exp(s) * norm(P f) . t^T"""
        p = F.normalize(self.projector(features).float(), dim=-1)
        return self.logit_scale.exp() * p @ self.text.t()

    def losses(self, student, features, logits, batch):
        hp, z_t = self.hp, batch.teacher_logits
        return {
            "ce": F.cross_entropy(logits, batch.labels),
            "kd": hp.kd_weight * kd_loss(z_t, logits, hp.temperature),
            "cm": hp.cm_weight * kd_loss(z_t, self.cross_modal_logits(features),
                                         hp.temperature),
        }

    def after_step(self, step):
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
