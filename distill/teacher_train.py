"""`dgkit teacher train`: a CLIP teacher trained contrastively on captioned domains.

The captions come from the folder names: "a {domain} of a {class}" (the form RISE's anchors use)
or a class-only prompt of the methods' templates, so the text tower answers the prompts dgkit's
methods ask. The loss is open_clip's own `ClipLoss`, over groups of one image per class (a
caption repeated inside a group would be a false negative). Without `--init`, the model is
`dgkit-world-clip`, a small open_clip ResNet-and-transformer CLIP defined by the model config
written beside its weights; with `--init MODEL:PRETRAINED` (or a checkpoint) a real CLIP is
fine-tuned instead, as RISE fine-tuned CLIP for TerraIncognita. Either way the result loads
through the one teacher path: `--teacher MODEL:OUT/teacher.safetensors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dgkit import __version__
from dgkit.atomic import atomic_path, write_json
from dgkit.data import decode_samples, discover, prompt_names
from dgkit.distill.augment import augment
from dgkit.distill.students import build_backbone
from dgkit.distill.teacher import model_image_size
from dgkit.distill.trainer import step_seed
from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec
from dgkit.progress import console, track
from dgkit.teacher_spec import RISE_TEMPLATES, TRAINED_MARK
from dgkit.train_config import AUGMENTATIONS

WORLD_CLIP = "dgkit-world-clip"
# An open_clip CLIP with a timm EfficientNet-Lite0 image tower (started from its ImageNet
# weights, the ones the students use) and a small text transformer (started from scratch).
WORLD_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "timm_model_name": "efficientnet_lite0",
                   "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 2},
}
# A random CLIP for plumbing checks and controls: one layer per tower, 32 wide.
TINY_CLIP = "dgkit-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}
# Class-only prompts: the methods' own (SCMD, VL2V-ADiP) and RISE's ensemble.
CLASS_PROMPTS = ("a photo of a {}.", "this is a photo of a {}", *RISE_TEMPLATES, "a {}.")
WEIGHTS = "teacher.safetensors"
RECORD = "teacher.json"


@dataclass
class TeacherTraining:
    data: str
    out: str
    init: str | None = None  # MODEL:PRETRAINED or MODEL:/checkpoint to fine-tune
    steps: int = 300
    groups: int = 4  # groups of one image per class in each step
    lr: float = 1e-3
    weight_decay: float = 0.1
    image_size: int | None = None  # default: the model's
    seed: int = 0
    about: str | None = None  # what the teacher is, shown beside its name (demo, quickstart)


def write_random_clip(folder: Path, seed: int = 0) -> str:
    """Save the tiny CLIP with random weights (and its config) in `folder`; returns the
    `--teacher` that loads it. Its numbers say only that a pipeline runs."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP)
    path = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{TINY_CLIP}:{path}"


def caption(domain: str, cls: str, rng: np.random.Generator) -> str:
    """Half the time "a {domain} of a {cls}", else a class-only prompt of the methods'."""
    if rng.random() < 0.5:
        return f"a {domain} of a {cls}"
    return CLASS_PROMPTS[int(rng.integers(len(CLASS_PROMPTS)))].format(cls)


def _model(job: TeacherTraining, out: Path):
    """(model name, model, tokenizer, normalisation) to train: the world CLIP from its config
    (written to OUT), or the --init CLIP."""
    import open_clip

    from dgkit.distill.teacher import load_teacher

    if job.init:
        teacher = load_teacher(job.init)
        model = teacher.model.requires_grad_(True).train()
        return teacher.spec.model, model, teacher.tokenizer, (teacher.mean, teacher.std)
    config = out / f"{WORLD_CLIP}.json"
    config.write_text(json.dumps(WORLD_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    open_clip.add_model_config(config)
    torch.manual_seed(job.seed)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": none exist, by design
    try:
        model = open_clip.create_model(WORLD_CLIP)
    finally:
        logging.disable(previous)
    imagenet = build_backbone("efficientnet_lite0").module.state_dict()
    missing, unexpected = model.visual.trunk.load_state_dict(imagenet, strict=False)
    if missing or unexpected:
        raise DgkitError(f"the EfficientNet-Lite0 weights do not fit {WORLD_CLIP}'s image tower "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return WORLD_CLIP, model.train(), open_clip.get_tokenizer(WORLD_CLIP), (mean, std)


def train_teacher(job: TeacherTraining, quiet: bool = False) -> dict[str, Any]:
    """Train, save OUT/teacher.safetensors (+ the model config) and OUT/teacher.json, and
    return that record, with the zero-shot accuracy per domain measured through the teacher
    path dgkit distill uses."""
    from open_clip.loss import ClipLoss

    out = Path(job.out).expanduser().resolve()
    if (out / WEIGHTS).exists():
        raise DgkitError(f"{out / WEIGHTS} exists; pass another --out or delete it")
    data = discover(job.data)
    out.mkdir(parents=True, exist_ok=True)
    name, model, tokenizer, (mean, std) = _model(job, out)
    size = job.image_size or model_image_size(model)
    decoded = decode_samples(data, range(len(data.samples)), PreprocessSpec(size, size),
                             None if quiet else f"Decoding {len(data.samples)} images")
    if decoded.bad:
        raise DgkitError(f"{len(decoded.bad)} image(s) cannot be decoded, e.g. "
                         f"{decoded.bad[0][0]}; dgkit data check lists them")
    pixels = torch.from_numpy(decoded.pixels).permute(0, 3, 1, 2).contiguous()
    labels = np.array([data.samples[i].label for i in decoded.indices])
    domains = np.array([data.samples[i].domain for i in decoded.indices])
    classes = prompt_names(data.classes)
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    if any(len(rows) == 0 for rows in by_class):
        raise DgkitError(f"{data.root} has a class without images; every class needs some")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]  # norms, biases, the logit scale: no decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": job.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=job.lr)
    warmup = min(100, job.steps // 10)
    loss_fn = ClipLoss()
    began = time.perf_counter()
    for step in track(range(job.steps), job.steps, None if quiet else "Training the teacher"):
        rng = np.random.default_rng(step_seed(job.seed, step, "teacher"))
        rows = np.array([[rng.choice(rows) for rows in by_class] for _ in range(job.groups)])
        texts = [caption(data.domains[domains[r]], classes[labels[r]], rng)
                 for r in rows.reshape(-1)]
        gen = torch.Generator().manual_seed(step_seed(job.seed, step, "augment"))
        images = augment(pixels[torch.from_numpy(rows.reshape(-1))], gen, size,
                         AUGMENTATIONS["domainbed"])
        factor = (step + 1) / warmup if step < warmup else 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, job.steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = job.lr * factor
        image_features = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        n = len(classes)
        loss = sum(loss_fn(image_features[g * n:(g + 1) * n], text_features[g * n:(g + 1) * n],
                           model.logit_scale.exp()) for g in range(job.groups)) / job.groups
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if not math.isfinite(loss.item()):
            raise DgkitError(f"the teacher's loss became {loss.item()} at step {step}; lower "
                             f"--lr (now {job.lr})")
    minutes = (time.perf_counter() - began) / 60
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(tmp), metadata={TRAINED_MARK: json.dumps(
                      {"data": str(data.root), "steps": job.steps, "dgkit": __version__,
                       **({"about": job.about} if job.about else {})})})
    spec = f"{name}:{out / WEIGHTS}"
    record = {"teacher": spec, "data": str(data.root), "init": job.init, "steps": job.steps,
              "groups": job.groups, "lr": job.lr, "seed": job.seed, "minutes": round(minutes, 2),
              "dgkit": __version__,
              "zero_shot_accuracy": zero_shot(spec, data, decoded, labels, domains)}
    write_json(out / RECORD, record)
    return record


def zero_shot(spec: str, data, decoded, labels: np.ndarray, domains: np.ndarray
              ) -> dict[str, float]:
    """Per domain, % of images whose nearest class embedding (RISE's prompt ensemble, dgkit's
    default) is their class: measured through `load_teacher`, as dgkit distill loads it."""
    from dgkit.distill.teacher import load_teacher

    teacher = load_teacher(spec)
    text = teacher.class_embeddings(prompt_names(data.classes), RISE_TEMPLATES)
    x = torch.from_numpy(decoded.pixels).permute(0, 3, 1, 2).float() / 255.0
    predicted = torch.cat([teacher.encode_images(x[i:i + 256]) @ text.T
                           for i in range(0, len(x), 256)]).argmax(-1).numpy()
    return {d: round(100.0 * float((predicted == labels)[domains == k].mean()), 2)
            for k, d in enumerate(data.domains) if (domains == k).any()}


@dataclass(frozen=True)
class WorldTeacher:
    """The sample world's teacher: `dgkit-world-clip` trained on its own draw of the four styles
    (seed 1, not the students' seed 0) with the corner mark random everywhere, so it knows
    sketches and ignores the mark, as CLIP saw sketches on the web."""

    per_class: int = 40
    size: int = 64
    steps: int = 300
    world_seed: int = 1
    about: ClassVar[str] = "a small CLIP trained on the sample world, not OpenAI's"

    def key(self) -> str:
        """Names the weights these settings (and the model config) give, for caching."""
        text = json.dumps([dataclasses.asdict(self), WORLD_CLIP_CONFIG], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def train(self, folder: Path, quiet: bool = False) -> dict[str, Any]:
        """FOLDER/data (the teacher's world) and the teacher in FOLDER, unless FOLDER has them
        already; returns teacher.json's record. A lock lets concurrent callers share FOLDER."""
        import fcntl

        from dgkit.samples import CLASSES, make_samples

        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / RECORD).is_file():
                (folder / WEIGHTS).unlink(missing_ok=True)  # a run killed before its record
                make_samples(folder / "data", seed=self.world_seed, per_class=self.per_class,
                             size=self.size, shortcut=1 / len(CLASSES), overwrite=True,
                             quiet=quiet)  # a mark right 1 time in 6 says nothing
                train_teacher(TeacherTraining(str(folder / "data"), str(folder),
                                              steps=self.steps, about=self.about), quiet=quiet)
            return json.loads((folder / RECORD).read_text())


def print_record(record: dict[str, Any]) -> None:
    shown = ", ".join(f"{d} {a:.1f}" for d, a in record["zero_shot_accuracy"].items())
    console.print(f"teacher zero-shot accuracy (RISE's prompts): {shown}")
    console.print(f"trained in {record['minutes']:.1f} min; use it with --teacher "
                  f"{record['teacher']}", soft_wrap=True)
