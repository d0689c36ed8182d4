"""The CLIP teacher: open_clip models named `MODEL:PRETRAINED` or `MODEL:/path/to/checkpoint`.

Both forms go through the same `open_clip.create_model_and_transforms(name, pretrained=...)`
call; open_clip itself decides between a download tag and a local file (loaded as safetensors
or with `torch.load(weights_only=True)`). A `<MODEL>.json` model config beside a checkpoint is
registered first, so custom architectures (such as the tests' tiny CLIP) load the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dgkit.distill.hub import hub_access
from dgkit.errors import DgkitError
from dgkit.teacher_spec import TeacherSpec


def model_image_size(model: torch.nn.Module) -> int:
    """The square input size of an open_clip model's image tower."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class Teacher(torch.nn.Module):
    """A frozen open_clip model that returns L2-normalised embeddings."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, tokenizer, preprocess) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = model_image_size(model)
        normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1))

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] RGB in [0, 1] -> [N, D] unit vectors, with CLIP's own normalisation."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bicubic", align_corners=False, antialias=True)
        x = (images.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def class_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Per class: mean of the normalised template embeddings, re-normalised. [C, D]."""
        per_class = [self.encode_texts([t.format(n) for t in templates]).mean(0) for n in names]
        return F.normalize(torch.stack(per_class), dim=-1)


def first_sentence(text: str, limit: int = 300) -> str:
    """The first line of an error, shortened at a word boundary with an ellipsis, never cut
    mid-word."""
    line = (text.strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def load_teacher(text: str, device: str | torch.device = "cpu") -> Teacher:
    """Load an open_clip teacher from `MODEL:PRETRAINED` or `MODEL:/path/to/checkpoint`."""
    import open_clip

    spec = TeacherSpec.parse(text)
    if spec.is_path:
        ckpt = Path(spec.pretrained).expanduser()
        if not ckpt.is_file():
            raise DgkitError(f"teacher checkpoint {ckpt} does not exist")
        config = ckpt.parent / f"{spec.model}.json"
        if config.is_file():
            open_clip.add_model_config(config)
        spec = TeacherSpec(spec.model, str(ckpt))
    if spec.model not in open_clip.list_models():
        raise DgkitError(f"teacher model '{spec.model}' is not an open_clip model name (see "
                         "open_clip.list_models()); for a custom one put <MODEL>.json beside "
                         "the checkpoint")
    if not spec.is_path:
        known = open_clip.list_pretrained_tags_by_model(spec.model)
        if spec.pretrained not in known:
            raise DgkitError(f"'{spec.pretrained}' is not a pretrained tag of {spec.model}; "
                             f"choose one of: {', '.join(known)}")
    try:
        with hub_access():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=spec.pretrained, device=device)
    except Exception as exc:  # open_clip raises RuntimeError, OSError or hub errors
        if spec.is_path:
            raise DgkitError(f"teacher checkpoint {spec.pretrained} cannot be loaded into "
                             f"{spec.model}: {first_sentence(str(exc))}") from exc
        raise DgkitError(
            f"the CLIP weights '{spec}' cannot be fetched (no internet and not in the local "
            f"cache); download them on a connected machine and pass the file with --teacher "
            f"{spec.model}:/path/to/open_clip_pytorch_model.bin") from exc
    tokenizer = open_clip.get_tokenizer(spec.model)
    return Teacher(spec, model, tokenizer, preprocess).to(device)
