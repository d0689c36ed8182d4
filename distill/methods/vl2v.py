"""VL2V-ADiP: align, then distill, the teacher's image and text embeddings (Addepalli et al.,
CVPR 2024).

Follows the official code (github.com/val-iisc/VL2V-ADiP, `domainbed/algorithms/
distill_clip.py`: DFC_STAGE1 then DFC_STAGE2, whose stage 2 starts from stage 1's projector).

    p = norm(P f),  P = Linear(d, D)
    L = lam * (-mean_i cos(p_i, e_img_i)) + (1 - lam) * (-mean_i cos(p_i, t_{y_i})),  lam = 0.5
    predict: 100 * p . t^T  (the teacher's zero-shot text classifier, prompt "a photo of a {}")

Stage 1 (align, --align-steps): only P trains; the backbone is frozen and kept in eval mode so
its BatchNorm statistics do not move. Stage 2 (distill, --distill-steps): P is frozen, the
backbone trains, starting from stage 1's best-validation weights with a fresh optimiser (the
official trainer loads stage 1's `TE{env}_best.pth`); stage 2 alone is selected and, with
--average, averaged, so the exported student is always a stage-2 model. One `dgkit distill
--method vl2v` runs both; the run is their sum of steps. The head holds t as a buffer, so the
exported student is one module.

--freeze-bn (default true) keeps BatchNorm in eval mode in stage 2 too, as the official
DomainBed ResNet featurizer does; --freeze-bn false lets the statistics adapt (dgkit's erm/kd).

Deviations: D is the teacher's embedding width (the code's table: 512 for ViT-B/16); the
CutMix branch (off by default there) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.distill.methods.base import Method, register
from dgkit.distill.methods.scmd import freeze_batchnorm
from dgkit.errors import DgkitError


@register
class VL2V(Method):
    name = "vl2v"
    summary = ("two stages: align a projector to the teacher's image and text embeddings, then "
               "distill into the backbone; predicts with the teacher's text classifier")
    needs_teacher = True
    head = "text"
    templates = ("a photo of a {}",)
    sources = {
        "lam": "val-iisc/VL2V-ADiP train_all.py:84",
        "align_steps": "val-iisc/VL2V-ADiP domainbed/datasets/datasets.py:62 (N_STEPS 5001), "
                       "train_all.py:225-231; scripts/*/run_stage1.sh pass no --steps",
        "distill_steps": "val-iisc/VL2V-ADiP domainbed/datasets/datasets.py:62, "
                         "scripts/*/run_stage2.sh",
        "freeze_bn": "val-iisc/VL2V-ADiP domainbed/hparams_registry.py:26, "
                     "domainbed/networks/networks.py:87-92",
    }

    @dataclass
    class Hparams:
        lam: float = 0.5  # weight of the image term; 1 - lam on the text term
        align_steps: int = 5001  # stage 1
        distill_steps: int = 5001  # stage 2
        freeze_bn: bool = True

        def __post_init__(self) -> None:
            if self.align_steps < 0 or self.distill_steps < 0 or (
                    self.align_steps + self.distill_steps < 1):
                raise DgkitError("--align-steps and --distill-steps must be >= 0 with a "
                                 "positive sum")
            if not 0.0 <= self.lam <= 1.0:
                raise DgkitError(f"--lam must be in [0, 1], got {self.lam}")

    @classmethod
    def total_steps(cls, hparams: Hparams) -> int:
        return hparams.align_steps + hparams.distill_steps

    def init_head(self, head: nn.Module) -> None:
        with torch.no_grad():
            head.text.copy_(self.ctx.text_embeddings)

    def stage_starts(self) -> list[int]:
        hp = self.hp
        return [0, hp.align_steps] if hp.align_steps and hp.distill_steps else [0]

    def stage(self, step: int) -> int:
        return 1 if step < self.hp.align_steps else 2

    def set_trainable(self, student, step):
        align = self.stage(step) == 1
        student.backbone.requires_grad_(not align)
        student.head.proj.requires_grad_(align)
        if align:
            student.backbone.eval()
        elif self.hp.freeze_bn:
            freeze_batchnorm(student.backbone)

    def losses(self, student, features, logits, batch):
        p = student.head.embed(features).float()
        image = F.cosine_similarity(p, batch.teacher_embeddings, dim=-1).mean()
        text = F.cosine_similarity(p, student.head.text[batch.labels], dim=-1).mean()
        return {"image": -self.hp.lam * image, "text": -(1.0 - self.hp.lam) * text}
