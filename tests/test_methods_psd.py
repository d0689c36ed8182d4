"""Progressive self-distillation: the a_t schedule, the soft targets and loss by hand, the
per-image table, the EMA option, composition with a CLIP method, and an exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from dgkit.distill.methods import Batch, MethodContext
from dgkit.distill.methods.psd import PSD
from dgkit.distill.students import Backbone, Student
from dgkit.errors import DgkitError


def context(teacher=None, num_images: int = 8) -> MethodContext:
    return MethodContext(num_classes=3, class_names=["a", "b", "c"], source_domains=["x", "y"],
                         total_steps=10, steps_per_epoch=3, num_images=num_images,
                         feature_dim=4, teacher=teacher)


def batch(labels, indices, step: int, teacher_logits=None) -> Batch:
    n = len(labels)
    return Batch(torch.zeros(n, 3, 4, 4), torch.tensor(labels), torch.zeros(n, dtype=torch.long),
                 torch.tensor(indices), step, None, teacher_logits)


def soft_ce(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    log_p = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -(target * log_p).sum(1).mean()


def test_alpha_follows_the_epoch_schedule():
    method = PSD(PSD.Hparams(), context())  # 10 steps of 3 per epoch: E = 4
    assert [method.alpha_at(s) for s in range(10)] == pytest.approx(
        [0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.8])


def test_targets_and_loss_use_the_previous_prediction():
    torch.manual_seed(0)
    method = PSD(PSD.Hparams(), context())
    onehot = torch.eye(3)
    # first visit: no previous prediction, the target is the label
    logits1 = torch.randn(3, 3)
    b1 = batch([0, 2, 1], [4, 5, 6], step=0)
    assert_close(method.soft_targets(b1), onehot[[0, 2, 1]])
    terms = method.losses(None, None, logits1, b1)
    assert set(terms) == {"psd"}
    assert_close(terms["psd"], soft_ce(onehot[[0, 2, 1]], logits1))
    # images 5 and 6 again, with image 7 never seen, in epoch 1 (a_t = 0.4)
    logits2 = torch.randn(3, 3)
    b2 = batch([2, 1, 0], [5, 6, 7], step=4)
    prev = torch.softmax(logits1[1:], dim=1)
    expected = torch.stack([0.6 * onehot[2] + 0.4 * prev[0], 0.6 * onehot[1] + 0.4 * prev[1],
                            onehot[0]])
    target = method.soft_targets(b2)
    assert_close(target, expected)
    assert_close(target.sum(1), torch.ones(3))
    assert_close(method.losses(None, None, logits2, b2)["psd"], soft_ce(expected, logits2))
    assert_close(method.previous[[5, 6, 7]], torch.softmax(logits2, dim=1))
    assert method.seen.tolist() == [False] * 4 + [True] * 4


def tiny_student(dim: int = 4) -> Student:
    body = nn.Sequential(nn.Conv2d(3, dim, 3), nn.BatchNorm2d(dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Student(Backbone(body, dim), nn.Linear(dim, 3))


def test_ema_targets_average_the_student_and_survive_a_checkpoint():
    torch.manual_seed(0)
    hp = PSD.Hparams(previous="ema", previous_decay=0.9)
    method = PSD(hp, context())
    student = tiny_student()
    method.set_trainable(student, 0)
    assert all(torch.equal(a, b) for a, b in zip(method.ema.parameters(), student.parameters(),
                                                 strict=True))
    before = [p.detach().clone() for p in method.ema.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.set_trainable(student, 1)
    for avg, old, now in zip(method.ema.parameters(), before, student.parameters(),
                                 strict=True):
        assert_close(avg, 0.9 * old + 0.1 * now)
    b = batch([0, 1], [0, 1], step=5)
    b.images = torch.rand(2, 3, 8, 8)
    onehot = torch.eye(3)[[0, 1]]
    assert torch.equal(method.soft_targets(b), onehot)  # first visit: the label alone, as PS-KD
    method.losses(student, None, student(b.images), b)  # the visit marks them seen
    with torch.no_grad():
        p = torch.softmax(method.ema.eval()(b.images), dim=1)
    a = method.alpha_at(5)
    assert_close(method.soft_targets(b), (1 - a) * onehot + a * p)
    # a resumed method gets the stored average back when it makes its copy
    resumed = PSD(hp, context())
    resumed.load_state_dict(method.state_dict())
    resumed.set_trainable(student, 2)
    method.set_trainable(student, 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.state_dict().values(),
                                                 method.ema.state_dict().values(),
                                                 strict=True))


def test_base_method_terms_are_added():
    torch.manual_seed(0)
    method = PSD(PSD.Hparams(base="kd", weight=0.5), context(teacher=object()))
    logits, z_t = torch.randn(2, 3), 10 * torch.randn(2, 3)
    terms = method.losses(None, None, logits, batch([0, 2], [0, 1], 0, z_t))
    assert set(terms) == {"ce", "kd", "psd"}
    p, q = torch.softmax(z_t / 3, dim=1), torch.softmax(logits / 3, dim=1)
    assert_close(terms["kd"], 9 * (p * (p.log() - q.log())).sum(1).mean())
    assert_close(terms["psd"], 0.5 * soft_ce(torch.eye(3)[[0, 2]], logits))
    assert PSD.total_steps(PSD.Hparams(base="vl2v")) == 5001 + 5001
    assert PSD.total_steps(PSD.Hparams()) is None
    with pytest.raises(DgkitError, match="--teacher"):
        PSD(PSD.Hparams(base="kd"), context())
    with pytest.raises(DgkitError, match="--base rise needs the CLIP teacher"):
        PSD(PSD.Hparams(base="rise"), context(num_images=0))
    with pytest.raises(DgkitError, match="--base 'psd' is not one of: ") as info:
        PSD.Hparams(base="psd")
    choices = str(info.value).split("one of: ")[1].split(", ")
    assert {"none", "kd", "rise", "scmd", "vl2v"} <= set(choices) and "psd" not in choices


def test_psd_resumes_exactly(tiny_domains, tmp_path, monkeypatch):
    """The per-image table is checkpointed: an interrupted and resumed run ends identical."""
    from dgkit.distill.trainer import TrainConfig, Trainer
    from dgkit.rundir import RunDir

    def new_run(name: str) -> RunDir:
        (tmp_path / name).mkdir()
        return RunDir(tmp_path / name)

    def config() -> TrainConfig:
        return TrainConfig(data=str(tiny_domains), targets=["sketch"], method="psd",
                           student="timm:test_resnet", student_weights="none", steps=4,
                           batch_size=24, image_size=32, eval_every=4, checkpoint_every=2)

    Trainer(config(), new_run("a"), quiet=True).train()
    original = PSD.set_trainable
    interrupted = []

    def interrupt_at_step_3(self, student, step):
        if step == 3 and not interrupted:
            interrupted.append(step)
            assert self.seen.any()  # the table is in use by then
            raise KeyboardInterrupt
        return original(self, student, step)

    monkeypatch.setattr(PSD, "set_trainable", interrupt_at_step_3)
    run = new_run("b")
    with pytest.raises(DgkitError, match="interrupted at step 3"):
        Trainer(config(), run, quiet=True).train()
    Trainer(config(), run, quiet=True).train(resume=True)
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
