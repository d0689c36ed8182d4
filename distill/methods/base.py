"""The method interface: one small class per method, registered by name.

A method may add modules (a projector, a logit scale), chooses the kind of the deployable
student's head and initialises it, and turns (student outputs, teacher outputs, labels) into a
dict of named loss terms. The trainer
sums the terms, logs each, and knows nothing else about methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.errors import DgkitError

_METHODS: dict[str, type[Method]] = {}


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""

    num_classes: int
    class_names: list[str]  # prompt names, in label order
    source_domains: list[str]
    total_steps: int
    steps_per_epoch: int  # steps that show the model about every training image once
    num_images: int  # Batch.indices are < num_images (per-sample state, e.g. PSD's table)
    feature_dim: int  # width of the student backbone's pooled features
    # [C, D] unit class text embeddings from the teacher; None for teacher-free methods.
    text_embeddings: torch.Tensor | None = None
    teacher: Any = None  # the Teacher, for methods that need more text embeddings (RISE anchors)


@dataclass
class Batch:
    images: torch.Tensor  # augmented, RGB in [0, 1]
    labels: torch.Tensor
    domains: torch.Tensor
    indices: torch.Tensor  # unique id of each image in the run (< ctx.num_images)
    step: int
    teacher_embeddings: torch.Tensor | None = None  # e_img, unit vectors
    teacher_logits: torch.Tensor | None = None  # z_t = 100 * e_img . t^T

    def subset(self, keep: torch.Tensor) -> Batch:
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return Batch(self.images[keep], self.labels[keep], self.domains[keep],
                     self.indices[keep], self.step, pick(self.teacher_embeddings),
                     pick(self.teacher_logits))


class Method(nn.Module):
    """Base class. Subclasses set `name`, `Hparams` and override `losses`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    head: ClassVar[str] = "linear"  # linear, projected or text
    # Prompt templates this method's authors used; None means the run's ensemble (RISE's).
    templates: ClassVar[Sequence[str] | None] = None
    # Where each Hparams default comes from (a file in the authors' repository).
    sources: ClassVar[dict[str, str]] = {}
    # The authors' hyper-parameter search per dataset (`dgkit bench dg --grid`): dataset name ->
    # the option values of each grid point; "" is the grid for any other dataset.
    grids: ClassVar[dict[str, tuple[dict[str, float], ...]]] = {}

    @dataclass
    class Hparams:
        pass

    def __init__(self, hparams: Any, ctx: MethodContext) -> None:
        super().__init__()
        self.hp = hparams
        self.ctx = ctx

    @classmethod
    def total_steps(cls, hparams: Any) -> int | None:
        """Steps the method needs regardless of --steps (e.g. VL2V's two stages), or None."""
        return None

    def stage_starts(self) -> list[int]:
        """First step of each stage (VL2V: align, then distill). A new stage starts from the
        previous one's best-validation weights with a fresh optimiser and is selected alone."""
        return [0]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups with their own learning rate (and weight decay), e.g. SCMD's logit
        scale; every other parameter trains at the run's learning rate."""
        return []

    def head_kind(self) -> str:
        """The kind of the deployable student's head (`dgkit.distill.students.build_head`)."""
        return self.head

    def init_head(self, head: nn.Module) -> None:
        """Initialise the freshly built head (e.g. from the class text embeddings)."""

    def select(self, student: nn.Module, batch: Batch) -> Batch:
        """Which samples of the batch the update uses (all, unless the method selects)."""
        return batch

    def set_trainable(self, student: nn.Module, step: int) -> None:
        """Freeze or unfreeze parts before a step (staged methods); default trains everything."""

    def losses(self, student: nn.Module, features: torch.Tensor, logits: torch.Tensor,
               batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (e.g. to clamp a learned temperature)."""


def register(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise DgkitError(f"unknown method '{name}'; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def parse_hparams(cls: type[Method], given: dict[str, Any]) -> Any:
    """Build the method's Hparams from CLI options (`--kd-temperature 3` -> kd_temperature)."""
    fields = {f.name: f for f in dataclasses.fields(cls.Hparams)}
    values = {}
    for key, raw in given.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in fields:
            options = ", ".join(f"--{f.replace('_', '-')}" for f in fields) or "none"
            raise DgkitError(f"--{name.replace('_', '-')} is not an option of --method "
                             f"{cls.name}; its options are: {options}")
        values[name] = _coerce(raw, fields[name], cls.name)
    return cls.Hparams(**values)


def _coerce(raw: Any, field: dataclasses.Field, method: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if not isinstance(raw, str):
        return raw
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise DgkitError(f"--{field.name.replace('_', '-')} of --method {method} expects a "
                         f"{kind}, got '{raw}'") from exc
    return raw


def hparams_dict(hp: Any) -> dict[str, Any]:
    return dataclasses.asdict(hp)


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """KD_T(a, b) = T^2 * KL(softmax(a/T) || softmax(b/T)), batch-mean reduction."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                            F.log_softmax(teacher_logits / t, dim=-1),
                            reduction="batchmean", log_target=True)
