"""ERM: plain cross-entropy on the source domains (DomainBed's baseline)."""

from __future__ import annotations

import torch.nn.functional as F

from dgkit.distill.methods.base import Method, register


@register
class ERM(Method):
    name = "erm"
    summary = "cross-entropy on the source domains; no teacher"

    def losses(self, student, features, logits, batch):
        return {"ce": F.cross_entropy(logits, batch.labels)}
