"""Each loss against closed forms of its gradient and its fixed points: a wrong T² factor, KL
direction, softmax axis or normalisation changes a gradient even where the loss value agrees."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from method_heads import trained_head
from torch import nn
from torch.testing import assert_close

from dgkit.distill.methods import Batch, MethodContext
from dgkit.distill.methods.base import kd_loss
from dgkit.distill.methods.psd import PSD
from dgkit.distill.methods.rise import RISE
from dgkit.distill.methods.vl2v import VL2V
from dgkit.distill.students import Backbone, Student

C, D = 3, 6  # classes; embedding width (the student's features are one-hot classes: width C)


class Texts:
    """A teacher's text tower: a fixed random unit vector per prompt (RISE's anchors)."""

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        return F.normalize(torch.randn(len(prompts), D, generator=g), dim=-1)


def context() -> MethodContext:
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    return MethodContext(num_classes=C, class_names=["a", "b", "c"], source_domains=["x", "y"],
                         total_steps=10, steps_per_epoch=5, num_images=10, feature_dim=C,
                         text_embeddings=text, teacher=Texts())


def student_on(method) -> Student:
    return Student(Backbone(nn.Identity(), C), trained_head(method))


def batch(labels: list[int], teacher_embeddings=None, text=None) -> Batch:
    y = torch.tensor(labels)
    n = len(labels)
    logits = None if teacher_embeddings is None else 100.0 * teacher_embeddings @ text.T
    return Batch(torch.zeros(n, 3, 4, 4), y, torch.zeros(n, dtype=torch.long), torch.arange(n),
                 step=0, teacher_embeddings=teacher_embeddings, teacher_logits=logits)


def test_kd_gradient_is_t_times_the_softmax_difference():
    g = torch.Generator().manual_seed(1)
    B, T = 5, 3.0
    z_s = torch.randn(B, 7, generator=g).requires_grad_()
    z_t = 5 * torch.randn(B, 7, generator=g)
    kd_loss(z_t, z_s, T).backward()
    assert_close(z_s.grad, T * (torch.softmax(z_s / T, 1) - torch.softmax(z_t / T, 1)) / B)


def test_rise_distances_vanish_with_zero_gradient_on_the_class_embedding():
    ctx = context()
    method = RISE(RISE.Hparams(), ctx)
    student = student_on(method)
    k = torch.tensor([2.0, 0.5, 3.0])
    with torch.no_grad():  # proj(onehot(c)) = k_c t_c
        student.head.proj.weight.copy_((k[:, None] * ctx.text_embeddings).T)
    y = [0, 1, 2, 1]
    features = F.one_hot(torch.tensor(y), C).float()
    terms = method.losses(student, features, student.head(features),
                          batch(y, ctx.text_embeddings[y], ctx.text_embeddings))
    assert terms["ad"].item() < 1e-6 and terms["rd"].item() < 1e-10
    (terms["ad"] + terms["rd"]).backward()
    assert student.head.proj.weight.grad.abs().max() < 1e-6


def test_rise_one_step_from_a_perturbed_start_turns_the_feature_to_its_class():
    ctx = context()
    method = RISE(RISE.Hparams(), ctx)
    student = student_on(method)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        student.head.proj.weight.copy_(ctx.text_embeddings.T + 0.5 * torch.randn(D, C,
                                                                                 generator=g))
    y = torch.tensor([0, 1, 2])
    features = F.one_hot(y, C).float()

    def cosines():
        return F.cosine_similarity(student.head.proj(features), ctx.text_embeddings[y], dim=-1)

    before = cosines().detach()
    seen = []  # x_p as the loss computes it
    student.head.proj.register_forward_hook(lambda m, i, out: seen.append(out))
    terms = method.losses(student, features, student.head(features),
                          batch(y.tolist(), ctx.text_embeddings[y], ctx.text_embeddings))
    x_p = seen[-1]
    grad, = torch.autograd.grad(terms["ad"], x_p, retain_graph=True)
    assert_close((grad * x_p).sum(-1), torch.zeros(3), atol=1e-6, rtol=0)  # scale-invariant
    (terms["ad"] + terms["rd"]).backward()
    with torch.no_grad():
        student.head.proj.weight -= 0.1 * student.head.proj.weight.grad
    assert (cosines() > before).all()


def test_vl2v_loss_is_minus_one_with_zero_gradient_where_all_three_agree():
    ctx = context()
    method = VL2V(VL2V.Hparams(), ctx)
    student = student_on(method)
    with torch.no_grad():  # P onehot(c) = 2 t_c, so p = norm(P f) = t_c
        student.head.proj.weight.copy_(2 * ctx.text_embeddings.T)
        student.head.proj.bias.zero_()
    y = [2, 0, 1]
    features = F.one_hot(torch.tensor(y), C).float()
    terms = method.losses(student, features, student.head(features),
                          batch(y, ctx.text_embeddings[y], ctx.text_embeddings))
    total = sum(terms.values())
    assert_close(total, torch.tensor(-1.0))
    total.backward()
    assert student.head.proj.weight.grad.abs().max() < 1e-6


def test_psd_gradient_is_softmax_minus_target_over_the_batch():
    ctx = context()
    method = PSD(PSD.Hparams(weight=0.7), ctx)
    g = torch.Generator().manual_seed(3)
    b = batch([0, 2, 1, 1])
    b.step = 7  # a later epoch, images seen before: targets mix the stored predictions
    method.remember(b.indices, torch.softmax(torch.randn(4, C, generator=g), dim=-1))
    target = method.soft_targets(b)
    assert not torch.equal(target, F.one_hot(b.labels, C).float())
    logits = torch.randn(4, C, generator=g).requires_grad_()
    method.losses(None, None, logits, b)["psd"].backward()
    assert_close(logits.grad, 0.7 * (torch.softmax(logits.detach(), -1) - target) / 4)
