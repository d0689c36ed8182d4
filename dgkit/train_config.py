"""Every option of a training run and its default, once: `dgkit distill`, `dgkit bench dg`,
the quickstart and run.json all read them from `TrainConfig`. Imports only the standard library
(the CLI reads the defaults at start-up)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dgkit.errors import DgkitError


@dataclass
class TrainConfig:
    """What was asked of `dgkit distill`, resolved; every training option's default is here."""

    data: str
    targets: list[str]
    method: str = "erm"
    hparams: dict[str, Any] = field(default_factory=dict)
    student: str = "efficientnet_lite0"
    student_weights: str = "imagenet"
    teacher: str | None = None
    teacher_mode: str = "cached"
    templates: list[str] | None = None
    class_names_file: str | None = None
    seed: int = 0
    steps: int = 3000
    batch_size: int = 96
    image_size: int = 224
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    average: str = "none"
    ema_decay: float = 0.999
    swa_start: float = 0.75
    precision: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    skip_bad: bool = False
    eval_batch_size: int = 256
    compile: bool = False

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "optimizer": ("adamw", "sgd"), "schedule": ("cosine", "step", "constant"),
        "average": ("none", "ema", "swa"), "teacher_mode": ("cached", "online"),
        "precision": ("auto", "fp32", "bf16")}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise DgkitError(f"--{name.replace('_', '-')} '{getattr(self, name)}' is not "
                                 f"one of: {', '.join(choices)}")
        for name in ("steps", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise DgkitError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if not self.lr > 0:
            raise DgkitError(f"--lr must be positive, got {self.lr}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_interval


def train_default(name: str) -> Any:
    """TrainConfig's default for option `name`: the CLI's defaults are read from here."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
