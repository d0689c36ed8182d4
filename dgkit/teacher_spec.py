"""What names a CLIP teacher, its prompts and its logit scale: torch-free, so the CLI, the demo
and the run records read them without loading open_clip."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dgkit.errors import DgkitError

DEFAULT_TEACHER = "ViT-B-32:openai"
# The prompt ensemble RISE's official code uses for the teacher's class text embeddings.
RISE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# z_t = TEACHER_LOGIT_SCALE * e_img . t^T, as the methods' official code computes teacher logits.
TEACHER_LOGIT_SCALE = 100.0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Metadata key of a checkpoint `dgkit teacher train` wrote: a trained teacher, not a random one.
TRAINED_MARK = "dgkit_teacher_train"


@dataclass(frozen=True)
class TeacherSpec:
    """`MODEL:PRETRAINED` (an open_clip tag) or `MODEL:/path/to/checkpoint`."""

    model: str
    pretrained: str

    @classmethod
    def parse(cls, text: str) -> TeacherSpec:
        model, sep, pretrained = text.partition(":")
        if not sep or not model or not pretrained:
            raise DgkitError(f"--teacher '{text}' should be MODEL:PRETRAINED (e.g. "
                             f"{DEFAULT_TEACHER}) or MODEL:/path/to/checkpoint")
        return cls(model, pretrained)

    @classmethod
    def resolve(cls, text: str) -> str:
        """The spec as stored in run.json: an existing checkpoint path made absolute, so that
        --resume and export work from any folder."""
        spec = cls.parse(text)
        path = Path(spec.pretrained).expanduser()
        if spec.is_path and path.exists():
            return str(cls(spec.model, str(path.resolve())))
        return text

    @property
    def is_path(self) -> bool:
        p = self.pretrained
        return ("/" in p or "\\" in p or p.startswith(".")
                or Path(p).suffix in CHECKPOINT_SUFFIXES)

    @property
    def checkpoint(self) -> Path | None:
        """The local checkpoint file, when the spec names one that exists."""
        path = Path(self.pretrained).expanduser()
        return path if self.is_path and path.is_file() else None

    @property
    def display_name(self) -> str:
        """`ViT-B-32 (openai)`, or the checkpoint's file name for a local one."""
        shown = Path(self.pretrained).name if self.is_path else self.pretrained
        return f"{self.model} ({shown})"

    def training(self) -> dict | None:
        """What `dgkit teacher train` recorded in the checkpoint (data, steps), or None."""
        import json

        from dgkit.records import safetensors_header

        path = self.checkpoint
        header = safetensors_header(path) if path and path.suffix == ".safetensors" else None
        mark = ((header or {}).get("__metadata__") or {}).get(TRAINED_MARK)
        return json.loads(mark) if mark else None

    def about(self) -> str | None:
        """What this teacher is, when it is not what its name suggests: the label
        `dgkit teacher train` recorded, or None."""
        training = self.training()
        if training is None:
            return None
        return training.get("about") or (f"a CLIP trained by dgkit teacher train on "
                                         f"{Path(training['data']).name}")

    def cache_id(self) -> str:
        """Identifies the weights: the tag, or the checkpoint's size and a hash of its head."""
        if not self.is_path:
            return f"{self.model}-{self.pretrained}"
        path = Path(self.pretrained)
        with path.open("rb") as fh:
            head = hashlib.sha1(fh.read(1 << 20)).hexdigest()[:12]
        return f"{self.model}-{path.stat().st_size}-{head}"

    def __str__(self) -> str:
        return f"{self.model}:{self.pretrained}"
