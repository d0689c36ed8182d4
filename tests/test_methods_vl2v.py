"""VL2V-ADiP: the loss and prediction by hand, and the two stages driven through the trainer's
hooks with a real optimiser: stage 1 leaves the backbone bit-identical, stage 2 the projector."""

from __future__ import annotations

import pytest
import torch
from method_heads import trained_head
from torch import nn
from torch.testing import assert_close

from dgkit.distill.methods import Batch, MethodContext
from dgkit.distill.methods.vl2v import VL2V
from dgkit.distill.students import Backbone, Student

D = 5


def context(feature_dim: int = 4) -> MethodContext:
    torch.manual_seed(0)
    text = nn.functional.normalize(torch.randn(3, D), dim=-1)
    return MethodContext(num_classes=3, class_names=["a", "b", "c"], source_domains=["x", "y"],
                         total_steps=4, steps_per_epoch=2, num_images=20,
                         feature_dim=feature_dim, text_embeddings=text, teacher=object())


def tiny_student(head: nn.Module, dim: int = 4) -> Student:
    body = nn.Sequential(nn.Conv2d(3, dim, 3), nn.BatchNorm2d(dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Student(Backbone(body, dim), head)


def test_vl2v_loss_and_prediction_match_the_formulas():
    ctx = context(feature_dim=6)
    method = VL2V(VL2V.Hparams(lam=0.3), ctx)
    head = trained_head(method)
    B = 4
    f = torch.randn(B, 6)
    y = torch.tensor([2, 0, 1, 1])
    e_img = nn.functional.normalize(torch.randn(B, D), dim=-1)
    logits = head(f)
    batch = Batch(torch.zeros(B, 3, 4, 4), y, torch.zeros(B, dtype=torch.long), torch.arange(B), 0,
                  e_img, 100.0 * e_img @ ctx.text_embeddings.T)
    terms = method.losses(type("S", (), {"head": head})(), f, logits, batch)

    x = f @ head.proj.weight.T + head.proj.bias
    p = x / x.norm(dim=1, keepdim=True)
    t = ctx.text_embeddings
    assert_close(logits, 100.0 * p @ t.T)
    image = (p * e_img).sum(1).mean()  # both unit: the cosine is the dot product
    text = (p * t[y]).sum(1).mean()
    assert_close(terms["image"], -0.3 * image)
    assert_close(terms["text"], -0.7 * text)
    assert set(terms) == {"image", "text"}
    assert torch.equal(head.text, t)  # the exported head carries t


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_vl2v_stages_freeze_the_right_parts(freeze_bn):
    ctx = context()
    method = VL2V(VL2V.Hparams(align_steps=2, distill_steps=2, freeze_bn=freeze_bn), ctx)
    assert VL2V.total_steps(method.hp) == 4
    student = tiny_student(trained_head(method))
    # as the trainer: one optimiser, built once, over everything that requires grad
    params = [p for p in [*student.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    e_img = nn.functional.normalize(torch.randn(6, D), dim=-1)
    backbone0, proj0 = snapshot(student.backbone), snapshot(student.head.proj)
    for step in range(4):
        if step == 2:
            backbone1, proj1 = snapshot(student.backbone), snapshot(student.head.proj)
        student.train()
        method.train()
        method.set_trainable(student, step)
        assert not student.backbone.training if step < 2 else student.backbone.training
        batch = Batch(images, labels, torch.zeros(6, dtype=torch.long), torch.arange(6), step,
                      e_img, 100.0 * e_img @ ctx.text_embeddings.T)
        features = student.features(batch.images)
        terms = method.losses(student, features, student.head(features), batch)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        method.after_step(step)
    backbone2, proj2 = snapshot(student.backbone), snapshot(student.head.proj)

    assert same(backbone0, backbone1)  # stage 1: weights and BatchNorm statistics untouched
    assert not same(proj0, proj1)
    assert same(proj1, proj2)  # stage 2: the projector is frozen
    assert not torch.equal(backbone1["0.weight"], backbone2["0.weight"])
    bn_moved = not torch.equal(backbone1["1.running_mean"], backbone2["1.running_mean"])
    assert bn_moved is not freeze_bn
