"""What the demo shows, without any gradio: the teacher and student of a run, their model cards,
the run's reported accuracies and example images.

The student runs through `dgkit.serve.Predictor`, exactly as on the edge box; only a run that
has not been exported falls back to the torch student (`load_student`). Every image goes
through `dgkit.preprocess.load_prepared`, with the student's spec or the teacher's. torch and
open_clip are imported only when the teacher or the torch student is loaded, so the demo runs on
a box that has only the serve runtime.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dgkit.data import at_chance
from dgkit.errors import DgkitError
from dgkit.export.formats import BY_KEY
from dgkit.preprocess import IMAGE_SUFFIXES, PreprocessSpec, decode_image, load_prepared
from dgkit.records import ArtifactResult, RunConfig, Summary, ValidationReport, safetensors_params
from dgkit.rundir import RunDir
from dgkit.teacher_spec import RISE_TEMPLATES, TEACHER_LOGIT_SCALE, TeacherSpec

log = logging.getLogger("dgkit.demo")

TOP_K = 5
THUMBNAIL = 320
# `--artifact` -> export formats (dgkit.export.formats), the first present wins.
ARTIFACT_FORMATS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx-fp32",),
    "fp16": ("onnx-fp16",),
    "int8": ("onnx-int8", "onnx-int8-vnni"),  # this CPU's flavour first, see artifact_path
    "trt": ("trt-int8", "trt-fp16"),
}
ARTIFACT_FILES = {name: tuple(BY_KEY[k].filename for k in keys)
                  for name, keys in ARTIFACT_FORMATS.items()}
ARTIFACTS = ("torch", *ARTIFACT_FILES)
ARTIFACT_TITLES = {"torch": "FP32 torch", "onnx": "FP32 ONNX", "fp16": "FP16 ONNX",
                   "int8": "INT8 ONNX", "trt": "TensorRT"}


# ------------------------------------------------------------------ small helpers

def human_count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def file_size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def read_record(read: Any, what: str) -> Any:
    """A run's summary or report, or None when it is broken (the demo shows what it can)."""
    try:
        return read()
    except DgkitError as exc:
        log.warning("cannot read the %s: %s", what, exc)
        return None


@dataclass(frozen=True)
class TopK:
    """One model's answer for one image, and how long it took."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    infer_ms: float  # the model call
    prep_ms: float  # decoding, resize and crop for this model's input

    @property
    def label(self) -> str:
        return self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "top_k": [{"label": lab, "prob": round(p, 6)} for lab, p
                                               in zip(self.labels, self.probs, strict=True)],
                "infer_ms": round(self.infer_ms, 2), "prep_ms": round(self.prep_ms, 2)}


def _top(probs: np.ndarray, classes: Sequence[str], k: int) -> tuple[tuple[str, ...],
                                                                      tuple[float, ...]]:
    from dgkit.serve.predictor import top_predictions

    pred = top_predictions(probs[None], max(1, min(k, len(classes))), list(classes))[0]
    return pred.labels, pred.probs


# ------------------------------------------------------------------ the student
class Student:
    """The deployable student: an exported artifact through the serve Predictor, or the torch
    student when asked for (`torch`) or when the run has no export."""

    def __init__(self, run: RunDir, config: RunConfig, artifact: str, backend: str = "auto",
                 note: str = "") -> None:
        self.artifact = artifact
        self.note = note
        self.classes = list(config.classes)
        self.arch = config.student
        self.params = safetensors_params(run.student)
        if artifact == "torch":
            self._load_torch(run, config)
        else:
            from dgkit.serve import Predictor

            self.path = artifact_path(run, artifact)
            if self.path is None:
                raise DgkitError(f"{run.export} has no {ARTIFACT_TITLES[artifact]} model "
                                 f"({' or '.join(ARTIFACT_FILES[artifact])}); export it with "
                                 f"dgkit export {run.path}")
            self.predictor = Predictor(self.path, backend=backend)
            if list(self.predictor.classes) != self.classes:
                raise DgkitError(f"{self.path} classifies {self.predictor.classes}, not this "
                                 f"run's classes {self.classes}: it was exported from another run")
            self.precision = self.predictor.meta.precision
            self.backend = self.predictor.backend
            self.spec = self.predictor.spec
        self.file_bytes = file_size(self.path)

    def _load_torch(self, run: RunDir, config: RunConfig) -> None:
        try:
            import torch

            from dgkit.distill.students import load_student
        except ImportError as exc:
            raise DgkitError("the torch student needs the 'train' extra (torch is not "
                             "installed): pip install 'dgkit[train]', or export the run with "
                             "dgkit export on a machine that has it") from exc
        try:
            self.model = load_student(run)
        except DgkitError:
            raise
        except Exception as exc:
            raise DgkitError(f"{run.student} cannot be loaded as this run's student "
                             f"({str(exc).splitlines()[0][:200]})") from exc
        self._torch = torch
        self.path = run.student
        self.precision = "fp32"
        self.backend = "torch-cpu"
        self.predictor = None
        self.spec = config.preprocess

    @property
    def title(self) -> str:
        return ARTIFACT_TITLES.get(self.artifact, self.artifact)

    def classify(self, source: str | Path, k: int = TOP_K) -> TopK:
        """Exactly what `Predictor.predict([source], k)` does, timed in two parts."""
        t0 = time.perf_counter()
        if self.predictor is not None:
            pixels = self.predictor.prepare(source)
            t1 = time.perf_counter()
            pred = self.predictor.predict_prepared(pixels[None], k)[0]
            t2 = time.perf_counter()
            return TopK(pred.labels, pred.probs, (t2 - t1) * 1e3, (t1 - t0) * 1e3)
        from dgkit.preprocess import to_model_input
        from dgkit.serve.predictor import softmax

        pixels = load_prepared(source, self.spec)
        t1 = time.perf_counter()
        with self._torch.inference_mode():
            logits = self.model(self._torch.from_numpy(to_model_input(pixels[None]))).numpy()
        probs = softmax(logits)[0]
        t2 = time.perf_counter()
        labels, values = _top(probs, self.classes, k)
        return TopK(labels, values, (t2 - t1) * 1e3, (t1 - t0) * 1e3)


def artifact_path(run: RunDir, artifact: str) -> Path | None:
    from dgkit.cpu import native_flavour
    from dgkit.export.formats import cpu_int8_key

    native = BY_KEY[cpu_int8_key(native_flavour())].filename  # the INT8 this CPU computes right
    names = sorted(ARTIFACT_FILES.get(artifact, ()), key=lambda name: name != native)
    return next((run.export / name for name in names if (run.export / name).is_file()), None)


def available_artifacts(run: RunDir) -> list[str]:
    """Exported artifacts present in the run, in table order."""
    return [a for a in ARTIFACT_FILES if artifact_path(run, a) is not None]


def torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "safetensors", "timm"))


# ------------------------------------------------------------------ the teacher
class Teacher:
    """The run's CLIP teacher, zero-shot over the run's prompts; `reason` says why it is absent."""

    def __init__(self, run: RunDir, config: RunConfig, summary: Summary | None,
                 enabled: bool = True) -> None:
        self.spec_text = config.teacher
        self.classes = list(config.classes)
        self.plumbing_check = bool(summary and summary.plumbing_check)
        self.model = None
        self.reason = ""
        self.params: int | None = None
        self.file_bytes: int | None = None
        self.image_size: int | None = None
        spec = TeacherSpec.parse(self.spec_text) if self.spec_text else None
        self.name = spec.display_name if spec else "none"
        ckpt = spec.checkpoint if spec else None
        self.file_bytes = file_size(ckpt)
        if ckpt is not None and ckpt.suffix == ".safetensors":
            self.params = safetensors_params(ckpt)
        if not self.spec_text:
            self.reason = (f"this run was distilled without a teacher (method "
                           f"{config.method}), so there is no CLIP model to compare "
                           "with")
        elif not enabled:
            self.reason = "the teacher was switched off (--no-teacher)"
        else:
            self._load(run, config)

    def _load(self, run: RunDir, config: RunConfig) -> None:
        try:
            import torch

            from dgkit.distill.teacher import load_teacher
        except ImportError:
            self.reason = ("this machine lacks torch and open_clip, which the CLIP teacher needs "
                           "(pip install 'dgkit[train]'); the student runs without them")
            return
        try:
            teacher = load_teacher(self.spec_text, "cpu")
        except DgkitError as exc:
            self.reason = f"the teacher cannot be loaded: {exc}"
            return
        except Exception as exc:  # a broken checkpoint or open_clip surprise: still no crash
            self.reason = f"the teacher cannot be loaded ({str(exc).splitlines()[0][:200]})"
            return
        names = list(config.prompt_names or self.classes)
        templates = list(config.train.templates or RISE_TEMPLATES)
        try:
            from dgkit.distill.cache import text_embeddings

            text = text_embeddings(teacher, run, names, templates)
        except Exception as exc:  # a read-only run folder: compute without the cache
            log.info("teacher text cache unusable (%s); computing the embeddings", exc)
            text = teacher.class_embeddings(names, templates)
        self._torch = torch
        self.model = teacher
        self.text = text.float().cpu()
        self.scale = TEACHER_LOGIT_SCALE
        self.image_size = teacher.image_size
        self.spec = PreprocessSpec(teacher.image_size, teacher.image_size)
        self.params = sum(p.numel() for p in teacher.model.parameters())

    @property
    def available(self) -> bool:
        return self.model is not None

    def classify(self, source: str | Path, k: int = TOP_K) -> TopK:
        """CLIP zero-shot: softmax(100 * e_img . t^T) over the run's class prompts."""
        from dgkit.preprocess import to_model_input
        from dgkit.serve.predictor import softmax

        t0 = time.perf_counter()
        pixels = load_prepared(source, self.spec)
        t1 = time.perf_counter()
        with self._torch.inference_mode():
            emb = self.model.encode_images(self._torch.from_numpy(to_model_input(pixels[None])))
            logits = (self.scale * emb @ self.text.T).numpy()
        probs = softmax(logits)[0]
        t2 = time.perf_counter()
        labels, values = _top(probs, self.classes, k)
        return TopK(labels, values, (t2 - t1) * 1e3, (t1 - t0) * 1e3)


# ------------------------------------------------------------------ reported accuracy
SOURCES = "source val"  # the accuracy column over the source domains (validation split)
SOURCE_SET = "source_val"  # the validation report's name of the source-validation set


@dataclass
class AccuracyRow:
    """One model in the header's table: accuracy (%) per column, plus what the report adds."""

    model: str
    accuracy: dict[str, float]  # target domain or SOURCES -> percent
    size_bytes: int | None = None
    latency_ms: float | None = None
    agreement: float | None = None  # % top-1 agreement with the torch FP32 student
    status: str = ""  # "ok", the report's failures, or why it was skipped


def _report_row(r: ArtifactResult, targets: Sequence[str]) -> AccuracyRow | None:
    row = {d: r.accuracy[d] for d in targets if d in r.accuracy}
    if SOURCE_SET in r.accuracy:
        row[SOURCES] = r.accuracy[SOURCE_SET]
    precision = r.precision.upper()
    if r.key.startswith("torch"):
        name = f"Student {precision or 'FP32'} torch (reference)"
    else:
        name = f"{r.name} · {precision}" if precision else r.name
    status = r.skipped or ("; ".join(r.failures) if r.failures else "ok")
    if not row and status == "ok":
        return None
    return AccuracyRow(name, row, int(r.size_mb * 2**20), r.latency_ms, r.agreement, status)


def report_rows(report: ValidationReport, targets: Sequence[str]) -> list[AccuracyRow]:
    """The rows of export/report.json (`dgkit validate`) for the header's table."""
    rows = [_report_row(r, targets) for r in report.artifacts]
    return [r for r in rows if r is not None]


@dataclass
class RunInfo:
    """Everything the header shows about a run."""

    name: str
    method: str
    student_arch: str
    domains: list[str]
    targets: list[str]
    rows: list[AccuracyRow] = field(default_factory=list)  # the at-a-glance table
    detail: list[AccuracyRow] = field(default_factory=list)  # every domain, from summary.json
    notes: list[str] = field(default_factory=list)
    plumbing_check: bool = False
    teacher_at_chance: bool = False  # zero-shot no better than answering one class
    teacher_about: str | None = None  # what a teacher trained by dgkit teacher train is
    report_png: Path | None = None
    report_device: str = ""
    report_images: dict[str, int] = field(default_factory=dict)  # validation set sizes
    report_passed: bool | None = None
    best_step: int | None = None


def run_info(run: RunDir, config: RunConfig, summary: Summary | None) -> RunInfo:
    domains, targets, sources = config.domains, config.target_domains, config.source_domains
    info = RunInfo(name=run.path.name, method=config.method, student_arch=config.student,
                   domains=list(domains), targets=list(targets),
                   plumbing_check=bool(summary and summary.plumbing_check))
    if config.teacher:
        info.teacher_about = TeacherSpec.parse(config.teacher).about()
    if summary:
        info.best_step = summary.best_step
        teacher = summary.teacher_zero_shot_accuracy or {}
        if teacher:
            info.teacher_at_chance = at_chance(teacher, config.data_root)
            info.detail.append(AccuracyRow("Teacher (CLIP zero-shot)", dict(teacher)))
            row = {d: teacher[d] for d in targets if d in teacher}
            src = [teacher[d] for d in sources if d in teacher]
            if src:
                row[SOURCES] = statistics.fmean(src)
            ckpt = TeacherSpec.parse(config.teacher).checkpoint if config.teacher else None
            info.rows.append(AccuracyRow("Teacher (CLIP zero-shot)", row, file_size(ckpt)))
        student = {**(summary.source_val_accuracy or {}), **(summary.target_accuracy or {})}
        if student:
            info.detail.append(AccuracyRow("Student FP32 (training evaluation)", student,
                                           file_size(run.student)))
            row = {d: student[d] for d in targets if d in student}
            if summary.source_val_accuracy_mean is not None:
                row[SOURCES] = summary.source_val_accuracy_mean
            info.rows.append(AccuracyRow("Student FP32 (training evaluation)", row,
                                         file_size(run.student)))
    else:
        info.notes.append("the run has no summary.json yet, so there are no training "
                          "accuracies to show")
    report = read_record(run.report, "validation report")  # None: absent or unreadable
    if report is not None:
        exported = report_rows(report, targets)
        info.rows.extend(exported)
        info.report_device = report.device
        info.report_images = dict(report.images)
        info.report_passed = report.passed
        if not exported:
            info.notes.append("export/report.json holds no accuracies this demo can read")
    elif run.report_json.is_file():
        info.notes.append("export/report.json cannot be read: dgkit validate "
                          f"{run.path} measures the exported models again")
    elif run.export.is_dir():
        info.notes.append("the export has no report.json yet: dgkit validate "
                          f"{run.path} measures the exported models")
    else:
        info.notes.append(f"not exported yet: dgkit export {run.path} --fp16 --int8 writes the "
                          "edge models and measures them")
    png = run.export / "report.png"
    info.report_png = png if png.is_file() else None
    return info


# ------------------------------------------------------------------ example images
def thumbnail(img: Image.Image, side: int = THUMBNAIL) -> Image.Image:
    """A preview whose longer side is `side`: large images shrink, small ones are enlarged so
    that a 40-pixel test image is visible too."""
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS,
                      reducing_gap=3.0 if scale < 1 else None)


@dataclass(frozen=True)
class Example:
    path: Path
    domain: str
    label: str
    unseen: bool

    @property
    def caption(self) -> str:
        return f"{'★ ' if self.unseen else ''}{self.domain} · {self.label}"

    def thumbnail(self) -> Image.Image | None:
        try:
            return thumbnail(decode_image(self.path, draft_size=THUMBNAIL))
        except DgkitError:
            return None


def find_examples(config: RunConfig, per_domain: int = 2) -> list[Example]:
    """A few images of every domain of the run (its data root), target domains marked.

    Classes are spread over domains so that the examples show different classes."""
    root = Path(config.data_root)
    if not root.is_dir():
        return []
    targets = set(config.target_domains)
    classes = list(config.classes)
    out: list[Example] = []
    for d, domain in enumerate(config.domains):
        for j in range(per_domain):
            if not classes:
                break
            for shift in range(len(classes)):
                cls = classes[(d * per_domain + j + shift) % len(classes)]
                folder = root / domain / cls
                if not folder.is_dir():
                    continue
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                               and not p.name.startswith("."))
                if files:
                    out.append(Example(files[len(files) // 3], domain, cls, domain in targets))
                    break
    # unseen domains first: they are the point of the demo
    return sorted(out, key=lambda e: not e.unseen)


def true_label(path: Path, config: RunConfig) -> tuple[str, str] | None:
    """(class, domain) of an image inside the run's data root, else None."""
    try:
        rel = Path(path).resolve().relative_to(Path(config.data_root).resolve())
    except (ValueError, OSError):
        return None
    parts = rel.parts
    if len(parts) >= 3 and parts[0] in config.domains and parts[1] in config.classes:
        return parts[1], parts[0]
    return None


# ------------------------------------------------------------------ the whole demo
@dataclass
class ImageResult:
    name: str
    error: str | None = None
    teacher: TopK | None = None
    student: TopK | None = None
    truth: tuple[str, str] | None = None  # class, domain
    unseen: bool = False
    thumbnail: Image.Image | None = None
    student_title: str = ""

    @property
    def agree(self) -> bool | None:
        if self.teacher is None or self.student is None:
            return None
        return self.teacher.label == self.student.label

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.error,
                "teacher": self.teacher.to_dict() if self.teacher else None,
                "student": self.student.to_dict() if self.student else None,
                "agree": self.agree,
                "true_class": self.truth[0] if self.truth else None,
                "domain": self.truth[1] if self.truth else None,
                "unseen_domain": self.unseen if self.truth else None}


class Demo:
    """The models of one run, loaded once and shared by every browser session."""

    def __init__(self, run: RunDir, artifact: str | None = None, backend: str = "auto",
                 teacher: bool = True, top_k: int = TOP_K) -> None:
        if artifact is not None and artifact not in ARTIFACTS:
            raise DgkitError(f"unknown --artifact '{artifact}'; choose one of: "
                             f"{', '.join(ARTIFACTS)}")
        self.run = run
        self.config = run.require_trained()
        self.summary = read_record(run.summary, "run summary")
        self.backend = backend
        self.top_k = top_k
        self.exported = available_artifacts(run)
        self.has_torch = torch_available()
        self._students: dict[str, Student] = {}
        self._lock = threading.Lock()
        note = ""
        if artifact is None:
            if self.exported:
                artifact = self.exported[0] if "onnx" not in self.exported else "onnx"
            else:
                artifact = "torch"
                note = (f"{run.path.name} has no exported model ({run.export} is missing), so the "
                        "student runs in torch, not through the edge runtime; export it with "
                        f"dgkit export {run.path}")
        self.default_artifact = artifact
        self._students[artifact] = Student(run, self.config, artifact, backend, note)
        self.teacher = Teacher(run, self.config, self.summary, enabled=teacher)
        self.info = run_info(run, self.config, self.summary)
        self.examples = find_examples(self.config)
        self._warm_up(self._students[artifact])

    @property
    def artifacts(self) -> list[str]:
        """What the UI may switch between: the exported models, and torch where it runs."""
        options = list(self.exported)
        if self.has_torch or "torch" in self._students:
            options.append("torch")
        if self.default_artifact not in options:
            options.insert(0, self.default_artifact)
        return options

    def student(self, artifact: str | None = None) -> Student:
        artifact = artifact or self.default_artifact
        with self._lock:
            if artifact not in self._students:
                if artifact not in self.artifacts:
                    raise DgkitError(f"this run has no '{artifact}' student; choose one of: "
                                     f"{', '.join(self.artifacts)}")
                student = Student(self.run, self.config, artifact, self.backend)
                self._warm_up(student)
                self._students[artifact] = student
            return self._students[artifact]

    def _warm_up(self, student: Student) -> None:
        """One throw-away call, so that the first image's latency is not the session's start."""
        grey = np.full((student.spec.input_size, student.spec.input_size, 3), 128, np.uint8)
        try:
            student.classify(Image.fromarray(grey))
            if self.teacher.available:
                self.teacher.classify(Image.fromarray(grey))
        except Exception as exc:  # warm-up is best effort; a real failure shows on real images
            log.warning("warm-up failed: %s", exc)

    def classify(self, source: str | Path, name: str | None = None,
                 artifact: str | None = None) -> ImageResult:
        """Teacher and student on one image; a bad image gives a result with `error` set."""
        name = name or Path(source).name
        result = ImageResult(name=name, truth=true_label(Path(source), self.config))
        if result.truth:
            result.unseen = result.truth[1] in self.config.target_domains
        try:
            result.thumbnail = thumbnail(decode_image(source, draft_size=THUMBNAIL))
            result.student = self.student(artifact).classify(source, self.top_k)
            if self.teacher.available:
                result.teacher = self.teacher.classify(source, self.top_k)
        except DgkitError as exc:  # ImageError included
            result.error = _clean(str(exc), source, name)
            result.student = result.teacher = None
        return result


def _clean(message: str, source: str | Path, name: str) -> str:
    """Error messages name the file as the user knows it, not gradio's temporary copy."""
    return message.replace(str(source), name)


def summarize(results: Sequence[ImageResult]) -> str:
    """One line over a batch: agreement and median latencies."""
    ok = [r for r in results if r.error is None]
    bad = len(results) - len(ok)
    if not ok:
        return f"None of the {len(results)} file(s) could be classified." if results else ""
    parts = [f"Classified {len(ok)} image{'s' if len(ok) != 1 else ''}"]
    both = [r for r in ok if r.agree is not None]
    if both:
        agree = sum(bool(r.agree) for r in both)
        parts.append(f"teacher and student agree on {agree} of {len(both)}")
    known = [r for r in ok if r.truth]
    if known:
        right = sum(r.student.label == r.truth[0] for r in known)
        parts.append(f"student correct on {right} of {len(known)} labelled examples")
    parts.append(f"student median {statistics.median(r.student.infer_ms for r in ok):.1f} ms")
    if both:
        parts.append(f"teacher median {statistics.median(r.teacher.infer_ms for r in both):.1f} ms")
    if bad:
        parts.append(f"{bad} file{'s' if bad != 1 else ''} rejected")
    return "; ".join(parts) + "."
