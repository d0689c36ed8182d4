"""The run directory's JSON files as typed records, each with a schema version.

Every stage reads and writes these files only through these classes (as `ModelMeta` is for the
exported model), so a key is spelled once and a run from an earlier dgkit is migrated in one
place. Torch-free: the demo and the edge runtime read them too.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dgkit.atomic import write_json
from dgkit.errors import DgkitError
from dgkit.preprocess import PreprocessSpec
from dgkit.train_config import TrainConfig

FORMAT_KEY = "format"
SELECTION = ("target accuracy at the step with the best mean source-validation accuracy "
             "(training-domain validation)")
# The head each method's student carries; how runs written before student.json are rebuilt.
V1_HEADS = {"rise": "projected", "vl2v": "text"}

R = TypeVar("R", bound="Record")


class Record:
    """A JSON file of the run directory; `format` is its schema version (absent means 1)."""

    FORMAT: ClassVar[int]
    WHAT: ClassVar[str]  # how messages name the file's content

    def to_dict(self) -> dict[str, Any]:
        return {FORMAT_KEY: self.FORMAT, **asdict(self)}  # type: ignore[call-overload]

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DgkitError(f"{path} cannot be read ({exc.strerror})") from exc
        except ValueError as exc:
            raise DgkitError(f"{path} is not valid JSON ({exc})") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str) -> R:
        if not isinstance(data, dict):
            raise DgkitError(f"{source} is not a dgkit {cls.WHAT} (not a JSON object)")
        version = data.get(FORMAT_KEY, 1)
        if not isinstance(version, int) or not 1 <= version <= cls.FORMAT:
            raise DgkitError(f"{source} was written by another dgkit ({cls.WHAT} format "
                             f"{version!r}; this dgkit reads formats 1 to {cls.FORMAT}): "
                             "use the dgkit that wrote it, or a newer one")
        fields = cls.migrate({k: v for k, v in data.items() if k != FORMAT_KEY}, version)
        try:
            return cls.build(fields)
        except (TypeError, KeyError, ValueError) as exc:
            raise DgkitError(f"{source} is not a valid dgkit {cls.WHAT} ({exc})") from exc

    @classmethod
    def migrate(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of an earlier format, in this format's names."""
        return fields

    @classmethod
    def build(cls: type[R], fields: dict[str, Any]) -> R:
        return cls(**fields)


# ---------------------------------------------------------------------- run.json
@dataclass
class RunConfig(Record):
    """run.json: the resolved request and the data it was resolved against."""

    FORMAT: ClassVar[int] = 2
    WHAT: ClassVar[str] = "run config"

    train: TrainConfig
    data_root: str
    domains: list[str]
    source_domains: list[str]
    classes: list[str]
    prompt_names: list[str]
    preprocess: PreprocessSpec
    dgkit_version: str
    versions: dict[str, str | None] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def target_domains(self) -> list[str]:
        return list(self.train.targets)

    @property
    def method(self) -> str:
        return self.train.method

    @property
    def student(self) -> str:
        return self.train.student

    @property
    def teacher(self) -> str | None:
        return self.train.teacher

    @property
    def seed(self) -> int:
        return self.train.seed

    @classmethod
    def migrate(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 1:  # the options under "config", some repeated at the top level
            fields["train"] = fields.pop("config")
            for repeated in ("student", "method", "teacher", "seed", "image_size",
                             "target_domains", "teacher_embed_dim"):
                fields.pop(repeated, None)
        return fields

    @classmethod
    def build(cls, fields: dict[str, Any]) -> RunConfig:
        fields["train"] = TrainConfig(**fields["train"])
        fields["preprocess"] = preprocess_spec(fields["preprocess"])
        return cls(**fields)


def preprocess_spec(values: dict[str, Any]) -> PreprocessSpec:
    values = dict(values)
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    return PreprocessSpec(**values)


# ---------------------------------------------------------------------- student.json
HEADS = ("linear", "projected", "text")


@dataclass(frozen=True)
class StudentSpec(Record):
    """student.json: what rebuilds the deployable network from student.safetensors alone."""

    FORMAT: ClassVar[int] = 1
    WHAT: ClassVar[str] = "student spec"

    backbone: str  # a registered student name or timm:<name>
    head: str  # linear | projected (RISE) | text (VL2V)
    feature_dim: int
    num_classes: int
    embed_dim: int | None  # the projection's width (the teacher's), for projected and text
    input_size: int
    mean: tuple[float, float, float]  # the backbone's own normalisation, inside the network
    std: tuple[float, float, float]

    @classmethod
    def build(cls, fields: dict[str, Any]) -> StudentSpec:
        spec = cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})
        if spec.head not in HEADS:
            raise ValueError(f"head '{spec.head}' is not one of {', '.join(HEADS)}")
        return spec

    @classmethod
    def from_v1_run(cls, run_json: dict[str, Any], weights: Path) -> StudentSpec:
        """The spec of a run written before student.json: from its run.json (format 1) and the
        shapes and normalisation stored in its weights."""
        header = safetensors_header(weights)
        if header is None:
            raise DgkitError(f"{weights} cannot be read as safetensors")
        config = run_json["config"]
        method = config["method"]
        if method == "psd":  # PSD's student carries the head of the method it adds to
            method = config["hparams"].get("base", "none")
        head = V1_HEADS.get(method, "linear")
        first = "head.weight" if head == "linear" else "head.proj.weight"
        out_dim, feature_dim = header[first]["shape"]
        return cls(backbone=config["student"], head=head, feature_dim=feature_dim,
                   num_classes=len(run_json["classes"]),
                   embed_dim=None if head == "linear" else out_dim,
                   input_size=int(run_json["image_size"]),
                   mean=_float_tensor(weights, header, "mean"),
                   std=_float_tensor(weights, header, "std"))


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """A safetensors file's header (names, dtypes, shapes, offsets) without torch; None when the
    file is missing or is not safetensors."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def safetensors_params(path: Path) -> int | None:
    """Learned parameters in a safetensors file: buffers (batch-norm statistics, the input
    mean and std) are not counted."""
    header = safetensors_header(path)
    if header is None:
        return None
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(v["shape"]) for k, v in header.items()
               if k != "__metadata__" and not k.endswith(skip) and k not in ("mean", "std"))


def _float_tensor(path: Path, header: dict[str, Any], name: str) -> tuple[float, ...]:
    entry = header[name]
    if entry["dtype"] != "F32":
        raise ValueError(f"{name} is {entry['dtype']}, expected F32")
    start, end = entry["data_offsets"]
    with path.open("rb") as fh:
        fh.seek(8 + struct.unpack("<Q", fh.read(8))[0] + start)
        data = fh.read(end - start)
    return tuple(struct.unpack(f"<{len(data) // 4}f", data))


# ---------------------------------------------------------------------- summary.json
@dataclass
class Summary(Record):
    """summary.json: the reported numbers (accuracies in percent) at the selected step."""

    FORMAT: ClassVar[int] = 2
    WHAT: ClassVar[str] = "run summary"

    finished: bool
    target_domains: list[str]
    best_step: int | None = None
    target_accuracy: dict[str, float] | None = None
    target_accuracy_mean: float | None = None
    source_val_accuracy: dict[str, float] | None = None
    source_val_accuracy_mean: float | None = None
    teacher: str | None = None
    teacher_zero_shot_accuracy: dict[str, float] | None = None
    plumbing_check: bool = False  # the teacher has no published weights
    skipped_images: int = 0
    selection: str = SELECTION


# ---------------------------------------------------------------------- export/report.json
@dataclass
class GateCheck:
    """One check of the validation gate: an artifact against torch FP32 on the same images.

    A drop ("drop": the held-out images, "source_drop": the source-validation split) is in
    points of accuracy: `fp32_only` images are right in torch FP32 and wrong in the artifact,
    `artifact_only` the reverse, so the drop is their difference over `images`. Agreement is
    the % of images whose top-1 is torch FP32's; `differ` counts the others. The check passes
    unless its whole 95 % interval [`low`, `high`] is beyond `limit`."""

    name: str  # "drop", "source_drop" or "agreement"
    on: str  # the images: the held-out domains joined by "+", or "source_val"
    images: int
    value: float
    low: float
    high: float
    limit: float
    passed: bool
    right: int = 0  # drops: images the artifact gets right
    fp32_only: int = 0
    artifact_only: int = 0
    differ: int = 0  # agreement


@dataclass
class ArtifactResult:
    """One artifact's row of the validation report; accuracies and agreement in percent."""

    key: str
    file: str  # file name, "" for the in-memory torch student
    precision: str
    runtime: str
    size_mb: float
    accuracy: dict[str, float] = field(default_factory=dict)  # per set
    target_accuracy: float | None = None
    agreement: float | None = None  # top-1 agreement with torch FP32, all images
    agreement_by_set: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None  # batch 1, median
    throughput: float | None = None  # images/s at batch 32
    failures: list[str] = field(default_factory=list)  # one sentence per failed check
    skipped: str = ""
    checks: list[GateCheck] = field(default_factory=list)  # none for torch FP32 itself
    # Rows: true class, columns: predicted, in ValidationReport.classes order, on the report's
    # `confusion_on` images.
    confusion: list[list[int]] | None = None

    @property
    def name(self) -> str:
        return self.file or self.key

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("FAIL" if self.failures else "ok")

    def check(self, name: str) -> GateCheck | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass
class ValidationReport(Record):
    """export/report.json, written by `dgkit validate` and by `dgkit export`.

    Format 3 added the gate's other limits, its per-artifact checks with their intervals, the
    confusion matrices and `max_images`; an earlier report loads with those absent (None or
    empty) and keeps the failures it was written with."""

    FORMAT: ClassVar[int] = 3
    WHAT: ClassVar[str] = "validation report"

    model: str
    device: str
    targets: list[str]
    sets: list[str]  # target domains, then "source_val"
    images: dict[str, int]
    max_drop: float
    passed: bool
    artifacts: list[ArtifactResult]
    export: dict[str, Any] | None = None  # what `dgkit export` wrote and how long it took
    validate_seconds: float | None = None
    provenance: dict[str, Any] | None = None  # dgkit version, commit, command, machine
    max_source_drop: float | None = None
    min_agreement: float | None = None
    intervals: str = ""  # how the checks' 95 % intervals are computed
    max_images: int | None = None  # set: a partial validation, at most this many images a set
    classes: list[str] = field(default_factory=list)
    confusion_on: str = ""  # the images of the confusion matrices, as GateCheck.on

    @classmethod
    def migrate(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        artifacts = fields.get("artifacts")
        if version < 3 and isinstance(artifacts, list):
            # "drop" was the difference of mean target accuracies; format 3 keeps the paired
            # drop in the artifact's checks.
            for artifact in artifacts:
                if isinstance(artifact, dict):
                    artifact.pop("drop", None)
        return fields

    @classmethod
    def build(cls, fields: dict[str, Any]) -> ValidationReport:
        artifacts = []
        for a in fields["artifacts"]:
            a = dict(a)
            checks = [GateCheck(**c) for c in a.get("checks", [])]
            artifacts.append(ArtifactResult(**{**a, "checks": checks}))
        return cls(**{**fields, "artifacts": artifacts})
