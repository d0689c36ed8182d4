"""`dgkit teacher train`: a small CLIP trained on captioned domains, loaded back through open_clip
and through dgkit's one teacher path, and used by a distillation run as a real teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import dgkit, error_line
from PIL import Image

from dgkit.samples import CLASSES, DOMAINS, make_samples
from dgkit.teacher_spec import RISE_TEMPLATES


@pytest.fixture(scope="module")
def world_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = make_samples(root / "world", per_class=4, size=64, quiet=True, shortcut=1 / 6)
    out = root / "teacher"
    proc = dgkit("teacher", "train", "--data", data, "--out", out, "--steps", "80", "--quiet",
                 check=True, timeout=600)
    return data, out, proc


def test_trained_teacher_loads_in_open_clip_and_knows_every_domain(world_teacher):
    import open_clip

    data, out, proc = world_teacher
    record = json.loads((out / "teacher.json").read_text())
    assert record["teacher"] == f"dgkit-world-clip:{out / 'teacher.safetensors'}"
    assert f"--teacher {record['teacher']}" in " ".join(proc.stderr.split())
    # straight through open_clip, not dgkit's Teacher: the zero-shot accuracy it recorded
    open_clip.add_model_config(out / "dgkit-world-clip.json")
    model, _, _ = open_clip.create_model_and_transforms(
        "dgkit-world-clip", pretrained=str(out / "teacher.safetensors"))
    tokenizer = open_clip.get_tokenizer("dgkit-world-clip")
    model.eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        text = torch.stack([F.normalize(model.encode_text(tokenizer(
            [t.format(c) for t in RISE_TEMPLATES])), dim=-1).mean(0) for c in CLASSES])
        text = F.normalize(text, dim=-1)
        for domain in DOMAINS:
            paths = [p for c in CLASSES for p in sorted((data / domain / c).glob("*.png"))]
            x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"))
                                           for p in paths])).permute(0, 3, 1, 2) / 255.0
            image = F.normalize(model.encode_image((x - mean) / std), dim=-1)
            labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
            accuracy = 100.0 * ((image @ text.T).argmax(-1) == labels).float().mean().item()
            assert accuracy == pytest.approx(record["zero_shot_accuracy"][domain], abs=4.2)
    assert np.mean(list(record["zero_shot_accuracy"].values())) > 40  # chance: 16.7


def test_a_run_with_the_trained_teacher_is_not_a_plumbing_check(world_teacher, tmp_path):
    data, out, _ = world_teacher
    teacher = json.loads((out / "teacher.json").read_text())["teacher"]
    run = tmp_path / "kd"
    proc = dgkit("distill", "--data", data, "--target", "sketch", "--method", "kd", "--teacher",
                 teacher, "--student", "timm:test_resnet", "--student-weights", "none",
                 "--steps", "2", "--batch-size", "6", "--image-size", "32", "--out", run,
                 check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plumbing_check"] is False
    # distill's output and the demo's teacher column say what this teacher is
    about = "a CLIP trained by dgkit teacher train on world"
    assert f"teacher: {about}" in " ".join(proc.stderr.split())
    from dgkit.demo.app import build_app

    page = json.dumps(build_app(run).get_config_file(), default=str)  # the model card
    assert f"**Teacher** (CLIP, {about})" in page, page[page.find("**Teacher**"):][:200]
    assert set(summary["teacher_zero_shot_accuracy"]) == set(DOMAINS)
    again = dgkit("teacher", "train", "--data", data, "--out", out, "--steps", "1")
    assert f"{out / 'teacher.safetensors'} exists" in error_line(again)


def test_teacher_train_bad_input_fails_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "teacher"
    proc = dgkit("teacher", "train", "--data", tmp_path / "nowhere", "--out", out)
    assert proc.returncode == 2 and "does not exist" in error_line(proc)
    proc = dgkit("teacher", "train", "--data", tmp_path, "--out", out, "--steps", "0")
    assert "--steps and --groups must be at least 1" in error_line(proc)
    assert not out.exists()


def test_world_teacher_is_trained_once_and_says_what_it_is(tmp_path):
    from dgkit.distill.teacher_train import WorldTeacher
    from dgkit.teacher_spec import TeacherSpec

    world = WorldTeacher(per_class=2, size=32, steps=2)
    assert world.key() != WorldTeacher(per_class=2, size=32, steps=3).key()
    record = world.train(tmp_path / "cache")
    weights = tmp_path / "cache" / "teacher.safetensors"
    assert record["teacher"] == f"dgkit-world-clip:{weights}" and record["steps"] == 2
    # the teacher's world: the mark is random (its colour is the class on about 1 image in 6)
    manifest = json.loads((tmp_path / "cache" / "data" / "samples.json").read_text())
    assert manifest["shortcut"]["probability"] == pytest.approx(1 / 6)
    assert TeacherSpec.parse(record["teacher"]).about() == WorldTeacher.about
    modified = weights.stat().st_mtime_ns
    assert world.train(tmp_path / "cache") == record  # cached: nothing trained again
    assert weights.stat().st_mtime_ns == modified
