"""The head the trainer gives a method's student: built by kind from the context's sizes, then
initialised by the method (as `Trainer.build` does)."""

from __future__ import annotations

from torch import nn

from dgkit.distill.students import build_head
from dgkit.records import StudentSpec


def trained_head(method) -> nn.Module:
    ctx, kind = method.ctx, method.head_kind()
    width = None if kind == "linear" else ctx.text_embeddings.shape[1]
    spec = StudentSpec(backbone="test", head=kind, feature_dim=ctx.feature_dim,
                       num_classes=ctx.num_classes, embed_dim=width, input_size=8,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    head = build_head(spec)
    method.init_head(head)
    return head
