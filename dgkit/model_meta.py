"""The exported-model contract: what a dgkit ONNX file carries in `metadata_props`.

Written by `dgkit.export`, read by `dgkit.serve` and `dgkit.export.validate`; nothing else
passes between those stages. All values are strings (ONNX metadata is string to string).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec

FORMAT_KEY = "dgkit_format"
FORMAT_VERSION = "1"
INPUT_NAME = "image"  # float32 [N, 3, H, W], RGB in [0, 1]
OUTPUT_NAME = "logits"  # float32 [N, num_classes]


@dataclass(frozen=True)
class ModelMeta:
    classes: list[str]  # class folder names, in output order
    prompt_names: list[str]  # human-readable class names
    preprocess: PreprocessSpec
    precision: str  # fp32 | fp16 | int8 | int8-trt
    run_id: str = ""
    student: str = ""
    method: str = ""
    target_domains: tuple[str, ...] = ()

    def to_props(self) -> dict[str, str]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "classes": json.dumps(self.classes),
            "prompt_names": json.dumps(self.prompt_names),
            "precision": self.precision,
            "run_id": self.run_id,
            "student": self.student,
            "method": self.method,
            "target_domains": json.dumps(list(self.target_domains)),
            **self.preprocess.to_metadata(),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMeta:
        if props.get(FORMAT_KEY) != FORMAT_VERSION:
            raise DgkitError(f"{source} is not a dgkit model (its ONNX metadata has no "
                             f"'{FORMAT_KEY}' = '{FORMAT_VERSION}'); export it with dgkit export")
        try:
            classes = json.loads(props["classes"])
            return cls(
                classes=classes,
                prompt_names=json.loads(props.get("prompt_names", "null")) or classes,
                preprocess=PreprocessSpec.from_metadata(props, source),
                precision=props.get("precision", "fp32"),
                run_id=props.get("run_id", ""),
                student=props.get("student", ""),
                method=props.get("method", ""),
                target_domains=tuple(json.loads(props.get("target_domains", "[]"))),
            )
        except (KeyError, ValueError) as exc:
            raise DgkitError(f"{source} has broken dgkit metadata ({exc})") from exc
