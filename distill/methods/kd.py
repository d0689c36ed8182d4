"""KD: Hinton distillation from the CLIP teacher's zero-shot logits.

loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from dgkit.distill.methods.base import Method, kd_loss, register


@register
class KD(Method):
    name = "kd"
    summary = "cross-entropy plus Hinton KD from the teacher's zero-shot logits"
    needs_teacher = True
    sources = {"temperature": "dgkit: T = 3 as RISE (data/hp_search/PACS.txt) and SCMD "
                              "(hparams_registry.py:100)"}

    @dataclass
    class Hparams:
        temperature: float = 3.0
        kd_weight: float = 1.0
        ce_weight: float = 1.0

    def losses(self, student, features, logits, batch):
        return {
            "ce": self.hp.ce_weight * F.cross_entropy(logits, batch.labels),
            "kd": self.hp.kd_weight * kd_loss(batch.teacher_logits, logits, self.hp.temperature),
        }
