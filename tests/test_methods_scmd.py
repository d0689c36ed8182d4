"""SCMD: loss terms by hand, hard-sample selection (exactly the top-k, until the right step, no
side effects on the student) and the clamped logit scale."""

from __future__ import annotations

import math

import pytest
import torch
from method_heads import trained_head
from torch import nn
from torch.testing import assert_close

from dgkit.distill.methods import Batch, MethodContext
from dgkit.distill.methods.scmd import SCMD
from dgkit.distill.students import Backbone, Student
from dgkit.errors import DgkitError

D = 5


def context(total_steps: int = 8, feature_dim: int = 4) -> MethodContext:
    torch.manual_seed(0)
    text = nn.functional.normalize(torch.randn(3, D), dim=-1)
    return MethodContext(num_classes=3, class_names=["a", "b", "c"], source_domains=["x", "y"],
                         total_steps=total_steps, steps_per_epoch=2, num_images=20,
                         feature_dim=feature_dim, text_embeddings=text, teacher=object())


def tiny_student(head: nn.Module, dim: int = 4) -> Student:
    body = nn.Sequential(nn.Conv2d(3, dim, 3), nn.BatchNorm2d(dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Student(Backbone(body, dim), head)


def kl_by_hand(a: torch.Tensor, b: torch.Tensor, T: float) -> torch.Tensor:
    p = torch.exp(a / T) / torch.exp(a / T).sum(1, keepdim=True)
    q = torch.exp(b / T) / torch.exp(b / T).sum(1, keepdim=True)
    return T * T * (p * (torch.log(p) - torch.log(q))).sum(1).mean()


def test_scmd_terms_match_the_formulas():
    ctx = context(feature_dim=6)
    method = SCMD(SCMD.Hparams(), ctx)
    head = trained_head(method)
    assert method.projector.weight.shape == (D, 6) and method.projector.bias is None
    assert_close(method.logit_scale, torch.tensor([math.log(1 / 0.07)]))
    with torch.no_grad():
        method.logit_scale.fill_(2.5)
    B, T = 5, 3.0
    f = torch.randn(B, 6)
    y = torch.tensor([0, 1, 2, 2, 1])
    e_img = nn.functional.normalize(torch.randn(B, D), dim=-1)
    z_t = 100.0 * e_img @ ctx.text_embeddings.T
    logits = head(f)
    batch = Batch(torch.zeros(B, 3, 4, 4), y, torch.zeros(B, dtype=torch.long), torch.arange(B), 0,
                  e_img, z_t)
    terms = method.losses(None, f, logits, batch)

    ce = -(logits - torch.log(torch.exp(logits).sum(1, keepdim=True)))[torch.arange(B), y].mean()
    pf = f @ method.projector.weight.T
    cm_logits = math.exp(2.5) * (pf / pf.norm(dim=1, keepdim=True)) @ ctx.text_embeddings.T
    expected = {"ce": ce, "kd": 0.5 * kl_by_hand(z_t, logits, T),
                "cm": 0.5 * kl_by_hand(z_t, cm_logits, T)}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert_close(terms[name], value, msg=name)


def test_scmd_keeps_exactly_the_top_k_until_the_right_step():
    ctx = context(total_steps=8)
    method = SCMD(SCMD.Hparams(select_fraction=0.3, freeze_bn=False), ctx)
    student = tiny_student(trained_head(method))
    student.train()
    images = torch.rand(10, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    batch = Batch(images, labels, torch.zeros(10, dtype=torch.long), torch.arange(100, 110), 0)
    bn = student.backbone[1]
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())

    chosen = method.select(student, batch)

    student.eval()
    with torch.no_grad():
        logp = torch.log_softmax(student(images), dim=1)
    per_sample = -logp[torch.arange(10), labels]
    top3 = sorted(per_sample.tolist(), reverse=True)[:3]
    expected = [100 + per_sample.tolist().index(v) for v in top3]
    assert chosen.indices.tolist() == expected
    assert torch.equal(chosen.images, images[chosen.indices - 100])
    assert torch.equal(chosen.labels, labels[chosen.indices - 100])
    # the selection pass leaves no trace: modes and BatchNorm statistics are as they were
    student.train()
    assert all(m.training for m in student.modules())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    # selection while step <= int(0.75 * 8) = 6, the full batch afterwards
    assert [method.selecting(s) for s in range(8)] == [True] * 7 + [False]
    late = Batch(images, labels, batch.domains, batch.indices, 7)
    assert method.select(student, late) is late
    last = Batch(images, labels, batch.domains, batch.indices, 6)
    assert method.select(student, last).labels.numel() == 3
    # at least one sample, however small the fraction
    tiny = SCMD(SCMD.Hparams(select_fraction=0.01), ctx)
    assert tiny.select(student, batch).labels.numel() == 1
    with pytest.raises(DgkitError, match=r"--select-fraction .* got 0\.0"):
        SCMD.Hparams(select_fraction=0.0)


def test_scmd_freeze_bn_keeps_batchnorm_in_eval():
    method = SCMD(SCMD.Hparams(), context())
    student = tiny_student(trained_head(method))
    student.train()
    method.set_trainable(student, 0)
    assert not student.backbone[1].training and student.backbone[0].training


def test_scmd_logit_scale_is_clamped_after_each_step():
    method = SCMD(SCMD.Hparams(), context())
    for value, expected in [(10.0, math.log(100.0)), (-1.0, 0.0), (2.0, 2.0)]:
        with torch.no_grad():
            method.logit_scale.fill_(value)
        method.after_step(0)
        assert_close(method.logit_scale, torch.tensor([expected]))
