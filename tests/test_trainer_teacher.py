"""The teacher inside the real `Trainer.step`: frozen and gradient-free, its logits 100 e·tᵀ with
the method's own prompts, the augmented view under --teacher-mode online, and SCMD's selection
reaching every term and the gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_averaging import new_run

from dgkit.train_config import TrainConfig


def session(method, tiny_domains, tiny_teacher, tmp_path, **kw):
    from dgkit.distill.trainer import Trainer

    cfg = TrainConfig(data=str(tiny_domains), targets=["sketch"], method=method,
                      teacher=tiny_teacher, student="timm:test_resnet", student_weights="none",
                      batch_size=12, image_size=32, steps=4, **kw)
    trainer = Trainer(cfg, new_run(tmp_path, method), quiet=True)
    return trainer, trainer.setup(trainer.prepare())


def spy(monkeypatch, s) -> dict:
    """Each step's augmented images (leaves that keep their gradient), the student as it was
    before the step, and the batch the method's losses see."""
    import dgkit.distill.trainer as trainer_module

    seen: dict = {}
    augment, losses = trainer_module.augment, s.method.losses

    def leaf_augment(*args, **kwargs):
        seen["student_before"] = copy.deepcopy(s.student).eval()
        seen["images"] = augment(*args, **kwargs).requires_grad_()
        return seen["images"]

    def spy_losses(student, features, logits, batch):
        seen["batch"] = batch
        return losses(student, features, logits, batch)

    monkeypatch.setattr(trainer_module, "augment", leaf_augment)
    monkeypatch.setattr(s.method, "losses", spy_losses)
    return seen


def text_classifier(teacher, template: str, names: list[str]) -> torch.Tensor:
    """Unit text embeddings straight from the open_clip model: one prompt per class."""
    with torch.no_grad():
        tokens = teacher.tokenizer([template.format(n) for n in names])
        return F.normalize(teacher.model.encode_text(tokens).float(), dim=-1)


def test_teacher_is_frozen_and_gets_no_gradient(tiny_domains, tiny_teacher, tmp_path):
    trainer, s = session("kd", tiny_domains, tiny_teacher, tmp_path, teacher_mode="online")
    teacher = s.prep.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for step in range(2):
        trainer.step(s, step)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trained = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert trained == {id(p) for p in s.params}  # student and method, nothing else


@pytest.mark.parametrize(("method", "template"), [("scmd", "this is a photo of a {}"),
                                                  ("vl2v", "a photo of a {}")])
def test_teacher_logits_use_the_method_prompt(method, template, tiny_domains, tiny_teacher,
                                              tmp_path, monkeypatch):
    hparams = {"align_steps": 2, "distill_steps": 2} if method == "vl2v" else {}
    trainer, s = session(method, tiny_domains, tiny_teacher, tmp_path, hparams=hparams)
    seen = spy(monkeypatch, s)
    trainer.step(s, 0)
    batch = seen["batch"]
    text = text_classifier(s.prep.teacher, template, s.prep.prompt_names)
    expected = 100.0 * s.prep.teacher_rows[batch.indices] @ text.T
    torch.testing.assert_close(batch.teacher_logits, expected, atol=1e-3, rtol=1e-4)


def test_online_teacher_sees_the_students_augmented_view(tiny_domains, tiny_teacher, tmp_path,
                                                         monkeypatch):
    trainer, s = session("kd", tiny_domains, tiny_teacher, tmp_path, teacher_mode="online")
    seen = spy(monkeypatch, s)
    fed = []
    encode = s.prep.teacher.encode_images
    monkeypatch.setattr(s.prep.teacher, "encode_images", lambda x: fed.append(x) or encode(x))
    trainer.step(s, 0)
    assert len(fed) == 1 and torch.equal(fed[0].detach(), seen["images"].detach())
    assert not torch.equal(seen["batch"].teacher_embeddings, s.prep.teacher_rows[
        seen["batch"].indices])  # not the cached, un-augmented embedding


def test_scmd_selection_reaches_every_term_and_the_gradient(tiny_domains, tiny_teacher,
                                                            tmp_path, monkeypatch):
    trainer, s = session("scmd", tiny_domains, tiny_teacher, tmp_path,
                         hparams={"select_fraction": 0.25, "select_until": 0.5})
    seen = spy(monkeypatch, s)
    trainer.step(s, 0)  # selecting: steps 0-2 of 4
    images, batch = seen["images"], seen["batch"]
    rows = s.sampler.batch(0)
    with torch.no_grad():  # the hardest quarter by the student's own CE, before the step
        loss = F.cross_entropy(seen["student_before"](images).float(), s.prep.labels[rows],
                               reduction="none")
    hardest = torch.sort(loss, descending=True, stable=True).indices[:3]
    assert torch.equal(batch.indices, torch.as_tensor(rows)[hardest])
    has_grad = images.grad.flatten(1).abs().sum(1) > 0
    assert has_grad.nonzero().flatten().tolist() == sorted(hardest.tolist())
    assert len(batch.labels) == len(batch.teacher_logits) == len(batch.images) == 3
    text = text_classifier(s.prep.teacher, "this is a photo of a {}", s.prep.prompt_names)
    torch.testing.assert_close(batch.teacher_logits,
                               100.0 * s.prep.teacher_rows[batch.indices] @ text.T,
                               atol=1e-3, rtol=1e-4)
    trainer.step(s, 3)  # after selection: every image
    assert (seen["images"].grad.flatten(1).abs().sum(1) > 0).all()
    assert len(seen["batch"].labels) == 12
