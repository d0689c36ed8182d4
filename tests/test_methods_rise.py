"""RISE: every loss term recomputed by hand from the formulas, the head's initialisation, the
anchor prompts, and a head rebuilt without the teacher."""

from __future__ import annotations

import zlib

import pytest
import torch
from method_heads import trained_head
from torch.testing import assert_close

from dgkit.distill.methods import Batch, MethodContext
from dgkit.distill.methods.rise import RISE
from dgkit.errors import DgkitError

CLASSES = ["cat", "dog", "owl"]
DOMAINS = ["photo", "art_painting"]
D = 5


class FakeTeacher:
    """encode_texts: a fixed random unit vector per prompt; records what it was asked."""

    def __init__(self, dim: int) -> None:
        self.dim, self.asked = dim, []

    def vector(self, text: str) -> torch.Tensor:
        seed = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        v = torch.randn(self.dim, generator=seed)
        return v / v.norm()

    def encode_texts(self, texts):
        self.asked.extend(texts)
        return torch.stack([self.vector(t) for t in texts])


def context(teacher=None, text=None, feature_dim: int = 6) -> MethodContext:
    return MethodContext(num_classes=3, class_names=CLASSES, source_domains=DOMAINS,
                         total_steps=10, steps_per_epoch=2, num_images=8,
                         feature_dim=feature_dim, text_embeddings=text, teacher=teacher)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_rise_terms_match_the_formulas():
    torch.manual_seed(0)
    B, d, T = 4, 6, 3.0
    text = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    teacher = FakeTeacher(D)
    method = RISE(RISE.Hparams(), context(teacher, text, d))
    head = trained_head(method)
    assert torch.equal(head.fc.weight, text) and torch.equal(head.fc.bias, torch.zeros(3))
    with torch.no_grad():  # a projector far from its N(0, 0.01) start, so every term matters
        head.proj.weight.normal_()
        head.proj.bias.normal_()

    f = torch.randn(B, d)
    y = torch.tensor([0, 2, 1, 2])
    e_img = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    z_t = 100.0 * e_img @ text.T
    logits = head(f)
    batch = Batch(torch.zeros(B, 3, 4, 4), y, torch.zeros(B, dtype=torch.long), torch.arange(B), 0,
                  e_img, z_t)
    terms = method.losses(type("S", (), {"head": head})(), f, logits, batch)

    x = f @ head.proj.weight.T + head.proj.bias
    z = x @ text.T
    assert_close(logits, z)
    p_t = torch.exp(z_t / T) / torch.exp(z_t / T).sum(1, keepdim=True)
    log_p_s = z / T - torch.log(torch.exp(z / T).sum(1, keepdim=True))
    kd = T * T * (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()
    ce = -(z - torch.log(torch.exp(z).sum(1, keepdim=True)))[torch.arange(B), y].mean()
    ad = (1 - cos(x, text[y])).mean()
    anchors = torch.stack([torch.stack([teacher.vector(f"a {dom} of a {c}") for dom in DOMAINS])
                           for c in CLASSES])  # [C, J, D]
    a = anchors[y]
    s_student = torch.exp(cos(x[:, None, :], a))
    s_teacher = torch.exp(cos(text[y][:, None, :], a))
    s_student = s_student / s_student.sum(1, keepdim=True)
    s_teacher = s_teacher / s_teacher.sum(1, keepdim=True)
    rd = 10.0 * ((s_student - s_teacher) ** 2).mean()
    expected = {"kd": 0.9 * kd, "ce": 0.1 * ce, "ad": 1.0 * ad, "rd": 1.0 * rd}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert_close(terms[name], value, msg=name)
    assert terms["rd"] > 0 and terms["ad"] > 0


def test_rise_anchor_options():
    text = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    teacher = FakeTeacher(D)
    RISE(RISE.Hparams(), context(teacher, text))
    assert teacher.asked == [f"a {dom} of a {c}" for c in CLASSES for dom in DOMAINS]
    teacher = FakeTeacher(D)
    method = RISE(RISE.Hparams(anchors="quality"), context(teacher, text))
    assert teacher.asked[:4] == ["a bright photo of a cat", "a corrupted photo of a cat",
                                 "a dark photo of a cat", "a good photo of a cat"]
    assert method.anchors.shape == (3, 4, D)
    teacher = FakeTeacher(D)
    RISE(RISE.Hparams(anchors="sunny photo, foggy photo"), context(teacher, text))
    assert teacher.asked[:2] == ["a sunny photo of a cat", "a foggy photo of a cat"]
    with pytest.raises(DgkitError, match="--anchors"):
        RISE.Hparams(anchors=" , ")


def test_rise_head_rebuilt_from_its_spec_without_the_teacher():
    """Export rebuilds the head from student.json's sizes and the weights: same outputs."""
    from dgkit.distill.students import build_head
    from dgkit.records import StudentSpec

    torch.manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    trained = trained_head(RISE(RISE.Hparams(), context(FakeTeacher(D), text)))
    spec = StudentSpec("test", "projected", 6, 3, D, 8, (0.0,) * 3, (1.0,) * 3)
    rebuilt = build_head(spec)
    rebuilt.load_state_dict(trained.state_dict())
    f = torch.randn(2, 6)
    assert rebuilt.proj.weight.shape == (D, 6) and rebuilt.fc.in_features == D
    assert_close(rebuilt(f), trained(f))
    assert_close(trained(f), (f @ trained.proj.weight.T + trained.proj.bias) @ text.T)
