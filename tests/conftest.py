"""Shared fixtures: a tiny drawn domain dataset and a tiny random-weight open_clip teacher."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

PACS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "PACS"
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every test sees the same CPU, an x86 with AVX2 alone, whatever the machine has, so that
# `--cpu auto` and the Predictor's CPU check do the same everywhere; the tests of other CPUs
# set dgkit.cpu.FAKE_ENV themselves, and those of this machine's arithmetic remove it.
os.environ["DGKIT_CPU_FEATURES"] = "avx2"


def pytest_collection_modifyitems(config, items):
    if PACS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the PACS dataset at {PACS}")
    for item in items:
        if "pacs" in item.keywords:
            item.add_marker(skip)


def draw_shape(shape: str, style: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One image of `shape` in a domain `style`; the shape decides the class, the style the
    domain, so a student can learn classes that transfer across domains."""
    background = {"photo": tuple(int(v) for v in rng.integers(90, 200, 3)),
                  "sketch": (245, 245, 240), "cartoon": (255, 255, 255)}[style]
    img = Image.new("RGB", (size, size), background)
    if style == "photo":
        noise = rng.integers(-30, 30, (size, size, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 4, size // 2 - 2))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    box = [cx - r, cy - r, cx + r, cy + r]
    color = tuple(int(v) for v in rng.integers(0, 255, 3))
    fill = None if style == "sketch" else color
    outline = (0, 0, 0) if style != "photo" else color
    width = {"photo": 1, "sketch": 2, "cartoon": 4}[style]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill,
                     outline=outline, width=width)
    return img


def make_domains(root: Path, per_class: int = 8, seed: int = 0,
                 domains=("cartoon", "photo", "sketch"),
                 classes=("circle", "square", "triangle")) -> Path:
    rng = np.random.default_rng(seed)
    for domain in domains:
        for cls in classes:
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(cls, domain, rng).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_domains(tmp_path_factory) -> Path:
    """3 domains x 3 classes x 8 images of 40 px: read-only, copy it before changing it."""
    return make_domains(tmp_path_factory.mktemp("domains") / "shapes")


@pytest.fixture
def domains_copy(tiny_domains, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_domains, tmp_path / "shapes"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """`MODEL:/path` of a tiny open_clip model with random weights, saved as safetensors and
    loaded back through dgkit's one teacher-loading path."""
    from dgkit.distill.teacher_train import write_random_clip

    return write_random_clip(tmp_path_factory.mktemp("teacher"))
