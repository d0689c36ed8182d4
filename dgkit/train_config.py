"""Every option of a training run and its default, once: `dgkit distill`, `dgkit bench dg`,
the quickstart and run.json all read them from `TrainConfig`. The field defaults are the fast
recipe; `dgkit.recipes` holds the authors' (paper) recipe of each method. Imports only the
standard library (the CLI reads the defaults at start-up)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dgkit.errors import DgkitError


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: random resized crop (area range, aspect 3/4 to 4/3), horizontal
    flip, colour jitter (brightness, contrast and saturation factors in 1 +- jitter, hue shift in
    +- hue of a turn) and random grayscale."""

    scale: tuple[float, float]
    jitter: float
    hue: float
    grayscale: float


AUGMENTATIONS = {
    # DomainBed's (domainbed/datasets.py): ColorJitter(0.3, 0.3, 0.3, 0.3).
    "domainbed": Augmentation((0.7, 1.0), 0.3, 0.3, 0.1),
    # The fast recipe's: DomainBed's without the hue shift.
    "domainbed-nohue": Augmentation((0.7, 1.0), 0.3, 0.0, 0.1),
    # RISE's (data/data_helper.py): RandomResizedCrop(scale=(0.8, 1)), ColorJitter(.4, .4, .4, .4).
    "rise": Augmentation((0.8, 1.0), 0.4, 0.4, 0.1),
}


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
    # The recipe the other values came from, and the options given on top of it.
    recipe: str = "fast"
    overrides: list[str] = field(default_factory=list)
    steps: int = 3000
    # When set, the number of steps is this many passes over the source training images at
    # --batch-size, resolved against the data before training (RISE's 20 epochs).
    epochs: float | None = None
    batch_size: int = 96
    # When set, the batch is this many images from each source domain (DomainBed's 32).
    batch_per_domain: int | None = None
    image_size: int = 224
    augment: str = "domainbed-nohue"
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    # --schedule step: the fractions of the schedule at which the learning rate drops x0.1.
    lr_drops: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    warmup_steps: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    average: str = "none"
    ema_decay: float = 0.999
    swa_start: float = 0.75
    # --average sma: SCMD's MovingAvg start_iter (SeanLeng1/SCMD algorithms.py: 300).
    sma_start: int = 300
    # --average swad: LossValley's swad_kwargs (khanrc/swad config.yaml) and update_bn's 500
    # batches (khanrc/swad trainer.py).
    swad_n_converge: int = 3
    swad_n_tolerance: int = 6
    swad_tolerance_ratio: float = 0.3
    swad_bn_batches: int = 500
    precision: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    skip_bad: bool = False
    eval_batch_size: int = 256
    compile: bool = False
    # Where the decoded training images live: memory (all of them on the device), disk (a
    # memory-mapped store read batch by batch, dgkit.pixel_store) or auto (memory when they fit
    # in --memory-budget GB; default budget: dgkit.distill.data_store.default_budget).
    data_store: str = "memory"
    memory_budget: float | None = None

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "recipe": ("paper", "fast"), "optimizer": ("adamw", "adam", "sgd"),
        "schedule": ("cosine", "step", "constant"),
        "average": ("none", "ema", "swa", "sma", "swad"), "teacher_mode": ("cached", "online"),
        "precision": ("auto", "fp32", "bf16"), "augment": tuple(AUGMENTATIONS),
        "data_store": ("memory", "disk", "auto")}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise DgkitError(f"--{name.replace('_', '-')} '{getattr(self, name)}' is not "
                                 f"one of: {', '.join(choices)}")
        least = {"steps": 1, "batch_size": 1, "image_size": 1, "eval_every": 1,
                 "checkpoint_every": 1, "warmup_steps": 0, "sma_start": 0, "batch_per_domain": 1,
                 "swad_n_converge": 1, "swad_n_tolerance": 1, "swad_bn_batches": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise DgkitError(f"--{name.replace('_', '-')} must be at least {low}, got "
                                 f"{value}")
        if not 0 < self.lr < float("inf"):  # nan fails both comparisons
            raise DgkitError(f"--lr must be a positive number, got {self.lr}")
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise DgkitError(f"--epochs must be a positive number, got {self.epochs}")
        if not all(0 < f < 1 for f in self.lr_drops):
            raise DgkitError(f"lr_drops must be fractions between 0 and 1, got {self.lr_drops}")
        if not 0 <= self.swad_tolerance_ratio < float("inf"):
            raise DgkitError("--swad-tolerance-ratio must be a number >= 0, got "
                             f"{self.swad_tolerance_ratio}")
        if self.memory_budget is not None:
            if self.data_store != "auto":
                raise DgkitError("--memory-budget applies to --data-store auto only, not "
                                 f"--data-store {self.data_store}")
            if not 0 < self.memory_budget < float("inf"):
                raise DgkitError("--memory-budget must be a positive number of GB, got "
                                 f"{self.memory_budget}")

    def for_data(self, sources: int, train_images: int) -> TrainConfig:
        """The batch and step count for `sources` source domains holding `train_images`
        training images, where the recipe gives them per domain or in epochs."""
        batch = self.batch_size if self.batch_per_domain is None else (
            self.batch_per_domain * sources)
        steps = self.steps if self.epochs is None else max(
            1, math.ceil(self.epochs * train_images / batch))
        return dataclasses.replace(self, batch_size=batch, steps=steps)

    @property
    def augmentation(self) -> Augmentation:
        return AUGMENTATIONS[self.augment]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    @property
    def eval_interval(self) -> int:
        # SWAD's segments run from one evaluation to the next: its authors evaluate every 100 of
        # 5000 steps on PACS (checkpoint_freq), so SWAD's default is 50 evaluations a run.
        return self.eval_every or max(1, self.steps // (50 if self.average == "swad" else 10))

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_interval


def train_default(name: str) -> Any:
    """TrainConfig's default for option `name`: the CLI's defaults are read from here."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
