"""`dgkit quickstart`: the whole pipeline on the built-in sample data, in minutes on a CPU.

draw the sample world (a corner mark names the class on most source images, never on the
sketches) -> distill a student from a CLIP teacher with `sketch` held out, and an ERM student
beside it -> export FP32, FP16 and INT8 (validated on the held-out sketches) -> classify a few
sketches with the edge Predictor -> print the report and the commands to try next. Without the
CLIP weights the teacher is a small CLIP trained on another draw of the sample world (cached in
~/.cache/dgkit). Everything else lands under one folder:

```
quickstart/data/<domain>/<class>/<n>.png   the sample dataset
quickstart/run/                            the run directory (run.json, student, metrics, ...)
quickstart/run/export/                     model.onnx, model.fp16.onnx, model.int8*.onnx, report.*
quickstart/erm/                            the ERM student, for comparison (erm.log: its output)
quickstart/quickstart.json                 the numbers printed at the end
```
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dgkit.atomic import write_json
from dgkit.cpu import native_flavour
from dgkit.errors import DgkitError, require_extra
from dgkit.export.formats import BY_KEY, cpu_int8_key
from dgkit.progress import console

if TYPE_CHECKING:
    from dgkit.records import Summary, ValidationReport
    from dgkit.train_config import TrainConfig

TARGET = "sketch"
SHORTCUT = 0.9  # how often the corner mark names the class in the source domains
TEACHER = "ViT-B-32:openai"
WORLD_TEACHER = "sample-world"  # stands for the small CLIP trained on the sample world
# ---- Which method the quickstart distills with: (method, teacher or None) ----------------------
# The first row whose method is registered and whose teacher (if it needs one) loads is used;
# `--teacher` replaces the teacher of the rows that have one. Edit the rows to change the choice.
METHODS: list[tuple[str, str | None]] = [
    ("rise", TEACHER),  # distils CLIP: the point of dgkit, when the weights can be loaded
    # Offline: VL2V's feature loss carries the teacher's image embedding, which knows sketches;
    # RISE's and KD's targets from this teacher say little more than the labels (BENCHMARKS.md).
    ("vl2v", WORLD_TEACHER),
    ("psd", None),  # progressive self-distillation: no teacher
    ("erm", None),  # plain supervised training: always there
]
BASELINE = "erm"  # trained beside the chosen method: what the student learns without a teacher


@dataclass
class Schedule:
    """Student efficientnet_lite0 with its ImageNet weights, fine-tuned on 3 source domains;
    sized to finish in a few minutes on a 2-core CPU (README gives the measured time)."""

    per_class: int = 40  # sample images per class and domain: 6 x 4 x 40 = 960
    sample_size: int = 64  # pixels of the drawn images
    image_size: int = 64  # student input
    steps: int = 150  # vl2v: half aligning, half distilling
    batch_size: int = 24
    evaluations: int = 5  # training-domain validation points (model selection)
    teacher_steps: int = 300  # the sample-world teacher's, when it is trained
    calib_images: int = 128  # INT8 calibration images from the source domains
    examples: int = 6  # held-out sketches classified at the end, one per class


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DgkitError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DgkitError(f"--out {out} is not empty (an earlier quickstart?); pass --overwrite "
                         "to redo it, or another --out")


def world_teacher(schedule: Schedule, out: Path) -> tuple[str, str]:
    """(--teacher, what it is) of the sample world's small CLIP: from the cache, or trained into
    it (into OUT/teacher when the cache cannot be written)."""
    from dgkit.distill.teacher_train import WorldTeacher
    from dgkit.rundir import cache_dir

    world = WorldTeacher(schedule.per_class, schedule.sample_size, schedule.teacher_steps)
    folder = cache_dir() / f"world-teacher-{world.key()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = out / "teacher"
    if not (folder / "teacher.json").is_file():
        console.print(f"training the teacher, {world.about} ({world.steps} steps; kept in "
                      f"{folder})", soft_wrap=True)
    return world.train(folder)["teacher"], world.about


def choose_method(teacher_override: str | None = None, schedule: Schedule | None = None,
                  out: Path = Path("quickstart")) -> tuple[str, str | None, str]:
    """(method, teacher or None, why) from METHODS: the first that is registered and whose
    teacher loads. `why` is empty for the first row, else one line saying what was skipped.
    A teacher the user named (`teacher_override`) that does not load is an error, not skipped."""
    from dgkit.distill.methods import method_names

    skipped: list[str] = []
    for method, teacher in METHODS:
        if method not in method_names():
            skipped.append(f"{method} is not in this dgkit")
            continue
        if teacher == WORLD_TEACHER:
            teacher, about = world_teacher(schedule or Schedule(), out)
            skipped.append(f"teacher: {about}")
        elif teacher is not None:
            from dgkit.distill.teacher import load_teacher

            teacher = teacher_override or teacher
            try:
                with console.status(f"Loading the CLIP teacher {teacher}"):
                    load_teacher(teacher, "cpu")
            except DgkitError as exc:
                if teacher_override:
                    raise
                skipped.append(f"{method} needs the CLIP teacher, and {exc}")
                continue
        return method, teacher, "; ".join(skipped)
    raise DgkitError("none of the quickstart's methods is available")  # erm always is


def idle_cores() -> int:
    """The physical cores other work leaves idle (by the 1-minute load average), at least one.

    On 2 cores shared with another busy process, 2 torch threads wait on each other and train
    3-5x slower than 1 thread (measured: 10.5 min instead of 4.6 for this quickstart)."""
    from dgkit.serve.backends import physical_cores

    cores = physical_cores()
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def stage_steps(method: str, steps: int) -> dict[str, int]:
    """The method's stage lengths for `steps` in all: vl2v aligns for half, distills for half;
    other methods have one stage, set by --steps."""
    half = steps // 2
    return {"align_steps": half, "distill_steps": steps - half} if method == "vl2v" else {}


def train_config(data: Path, method: str, teacher: str | None, schedule: Schedule,
                 seed: int) -> TrainConfig:
    """The quickstart's schedule on the fast recipe, with TARGET held out."""
    from dgkit.train_config import TrainConfig

    hparams = stage_steps(method, schedule.steps)
    return TrainConfig(
        data=str(data.resolve()), targets=[TARGET], method=method, teacher=teacher,
        hparams=hparams, seed=seed, steps=schedule.steps, batch_size=schedule.batch_size,
        image_size=schedule.image_size, eval_every=max(1, schedule.steps // schedule.evaluations))


def start_baseline(data: Path, out: Path, schedule: Schedule, seed: int) -> subprocess.Popen:
    """BASELINE in the background on one thread, its output in OUT/erm.log."""
    config = out / f"{BASELINE}.json"
    write_json(config, train_config(data, BASELINE, None, schedule, seed).__dict__)
    code = ("import json, sys; from pathlib import Path; from dgkit import api; "
            "from dgkit.train_config import TrainConfig; "
            "api.train(TrainConfig(**json.loads(Path(sys.argv[1]).read_text())), sys.argv[2], "
            "overwrite=True, quiet=True)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (out / f"{BASELINE}.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-c", code, str(config), str(out / BASELINE)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)


def finish_baseline(proc: subprocess.Popen, out: Path) -> Summary | None:
    """The baseline's summary once it ends; None, after one line saying why, if it failed."""
    from dgkit.rundir import RunDir

    if proc.wait() != 0:
        lines = (out / f"{BASELINE}.log").read_text().strip().splitlines() or ["no output"]
        console.print(f"[yellow]the {BASELINE} comparison failed: {lines[-1]} (see "
                      f"{out / BASELINE}.log)[/]", soft_wrap=True)
        return None
    return RunDir(out / BASELINE).summary()


def train(data: Path, run: Path, method: str, teacher: str | None, schedule: Schedule,
          seed: int, threads: int) -> Summary:
    """Distill one student with TARGET held out; returns the run's summary."""
    import torch

    from dgkit import api

    torch.set_num_threads(threads)
    return api.train(train_config(data, method, teacher, schedule, seed), run, overwrite=True,
                     quiet=False, runs_root=run.parent)


def export(run: Path, schedule: Schedule) -> ValidationReport:
    """FP32, FP16 and INT8 ONNX under RUN/export/, validated on the held-out domain; returns
    the validation report (report.json)."""
    from dgkit import api

    summary = api.export(run, api.ExportOptions(
        fp16=True, int8=True, calib_images=schedule.calib_images, validate=True))
    return summary["report"]


def classify_examples(model: Path, data: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """A few held-out images (one per class, in turn) through the edge Predictor."""
    import random

    from dgkit.serve.predictor import Predictor

    predictor = Predictor(model)
    rng = random.Random(seed)
    classes = sorted(p.name for p in (data / TARGET).iterdir() if p.is_dir())
    paths = [rng.choice(sorted((data / TARGET / classes[i % len(classes)]).glob("*.png")))
             for i in range(count)]
    return [{"image": str(p), "label": p.parent.name, "predicted": r.label,
             "prob": round(r.prob, 4), "top_k": r.to_dict()["top_k"]}
            for p, r in zip(paths, predictor.predict(paths, top_k=3), strict=True)]


def _artifact_rows(report: ValidationReport) -> list[dict[str, Any]]:
    """The report's rows that ran, for the summary table and quickstart.json."""
    source = [s for s in report.sets if s not in report.targets]
    rows = []
    for r in report.artifacts:
        if r.target_accuracy is None:
            continue
        rows.append({"artifact": r.file or "torch student", "precision": r.precision,
                     "size_mb": r.size_mb, "target_accuracy": r.target_accuracy,
                     "source_val_accuracy": round(sum(r.accuracy[s] for s in source)
                                                  / max(1, len(source)), 2),
                     "target_agreement": r.agreement_by_set.get(TARGET),
                     "latency_ms": r.latency_ms})
    return rows


def print_report(result: dict[str, Any]) -> None:
    """The closing report on stdout: the numbers, a few predictions, what to try next."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    table = Table(box=box.SIMPLE_HEAD, title=f"{result['method']} student, {TARGET} held out "
                  f"(chance {100 / len(result['classes']):.1f} %)")
    for name in ("model", "MB", f"{TARGET} acc %", "source val %", f"{TARGET} agree %",
                 "batch-1 ms"):
        table.add_column(name, justify="left" if name == "model" else "right",
                         no_wrap=name == "model")
    cell = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in result["artifacts"]:
        table.add_row(r["artifact"], cell(r["size_mb"]), cell(r["target_accuracy"]),
                      cell(r["source_val_accuracy"]), cell(r["target_agreement"]),
                      cell(r["latency_ms"]))
    out.print(table)
    out.print(f"The {TARGET} images were never trained on; the student is the one with the best "
              f"source-domain validation accuracy (step {result['best_step']}).", soft_wrap=True)
    out.print(f"\nHeld-out {TARGET} accuracy of the torch students, same data and schedule:")
    if result["teacher"]:
        about = result["teacher_about"] or ("a teacher without published weights (plumbing "
                                            "check)" if result["plumbing_check"] else "")
        out.print(f"  teacher {result['teacher']}" + (f"\n    ({about})" if about else ""),
                  soft_wrap=True)
    rows = [(f"{result['method']} (distilled from the teacher)", result["target_accuracy"])]
    if result["baseline"]:
        rows.append((f"{result['baseline']['method']} (no teacher)",
                     result["baseline"]["target_accuracy"]))
    zero_shot = (result["teacher_zero_shot_accuracy"] or {}).get(TARGET)
    if zero_shot is not None:
        rows.append(("the teacher alone, zero-shot", zero_shot))
    for name, accuracy in rows:
        out.print(f"  {name:<40} {accuracy:5.1f} %")
    if not result["validation_passed"]:
        out.print(f"[yellow]Export validation flagged an artifact: see {result['run']}/export/"
                  "report.md[/]", soft_wrap=True)
    out.print(f"\nHeld-out {TARGET}es through dgkit.serve.Predictor"
              f"({Path(result['int8_model']).name}):")
    for e in result["examples"]:
        mark = "[green]right[/]" if e["predicted"] == e["label"] else "[red]wrong[/]"
        out.print(f"  {e['image']}  ->  {e['predicted']} {e['prob']:.2f}  {mark}",
                  soft_wrap=True)
    d, r, m = result["data"], result["run"], result["int8_model"]
    minutes, seconds = divmod(round(result["seconds"]), 60)
    out.print(f"\nDone in {minutes}m{seconds:02d}s. Try next:")
    for what, command in (
            ("the web demo of this run", f"dgkit demo {r}"),
            ("serve the INT8 model over HTTP (POST /predict)", f"dgkit serve {m}"),
            ("classify a folder of images", f"dgkit predict {m} {d}/{TARGET}/star"),
            ("the validation report again", f"dgkit validate {r}"),
            ("hold out each domain in turn", distill_command(result)),
            ("TensorRT engines, on a GPU box", f"dgkit export {r} --fp16 --int8 --trt")):
        out.print(f"  [dim]# {what}[/]\n  {command}", soft_wrap=True)


def distill_command(result: dict[str, Any]) -> str:
    """`dgkit distill` with the quickstart's schedule, every domain held out in turn."""
    sched, method = result["schedule"], result["method"]
    stages = stage_steps(method, sched["steps"])
    length = (" ".join(f"--{k.replace('_', '-')} {v}" for k, v in stages.items())
              or f"--steps {sched['steps']}")
    teacher = f" --teacher {result['teacher']}" if result["teacher"] else ""
    return (f"dgkit distill --data {result['data']} --target all --method {method}{teacher} "
            f"--recipe fast {length} --image-size {sched['image_size']} --batch-size "
            f"{sched['batch_size']}")


def run_quickstart(out: Path = Path("quickstart"), overwrite: bool = False,
                   steps: int | None = None, image_size: int | None = None,
                   batch_size: int | None = None, per_class: int | None = None,
                   seed: int = 0, teacher: str | None = None,
                   threads: int | None = None, teacher_steps: int | None = None
                   ) -> dict[str, Any]:
    """The whole quickstart; returns (and writes to OUT/quickstart.json) what it printed."""
    require_extra("train", "torch")
    import torch

    from dgkit.rundir import RunDir, update_latest
    from dgkit.samples import CLASSES, make_samples

    started = time.perf_counter()
    schedule = Schedule()
    if threads is not None and threads < 1:
        raise DgkitError(f"--threads must be at least 1, got {threads}")
    for name, value in (("steps", steps), ("image_size", image_size),
                        ("batch_size", batch_size), ("per_class", per_class),
                        ("teacher_steps", teacher_steps)):
        if value is not None:
            if value < 1:
                raise DgkitError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
            setattr(schedule, name, value)
    if schedule.steps < 2:
        raise DgkitError(f"--steps must be at least 2 (vl2v trains in two stages), got "
                         f"{schedule.steps}")
    if teacher and ":" in teacher:  # a local checkpoint is stored absolute, as distill does
        model, _, pretrained = teacher.partition(":")
        if Path(pretrained).expanduser().exists():
            teacher = f"{model}:{Path(pretrained).expanduser().resolve()}"
    out = Path(out)
    _check_out(out, overwrite)
    data, run = out / "data", out / "run"

    stages: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        stages[name] = round(time.perf_counter() - tick, 1)
        tick = time.perf_counter()

    console.rule("1/4 sample data")
    make_samples(data, seed=seed, per_class=schedule.per_class, size=schedule.sample_size,
                 shortcut=SHORTCUT, shortcut_free=TARGET, overwrite=True)
    console.print(f"A corner mark's colour names the class on {SHORTCUT:.0%} of the cartoon, "
                  f"painting and photo images and is random on the {TARGET}es: a student "
                  "that learns the mark fails on them.", soft_wrap=True)
    lap("samples")
    console.rule(f"2/4 distill (held out: {TARGET})")
    threads = threads or idle_cores()
    baseline = start_baseline(data, out, schedule, seed)
    own = max(1, threads - 1)  # the baseline has one
    torch.set_num_threads(own)
    try:
        method, teacher, why = choose_method(teacher, schedule, out)
        if why:
            console.print(f"[yellow]using --method {method}: {why}[/]", soft_wrap=True)
        device = "a GPU" if torch.cuda.is_available() else f"{own} CPU thread{'s' * (own > 1)}"
        console.print(f"{method} trains on {device}, {BASELINE} (no teacher) beside it on one "
                      "CPU thread for comparison (--threads to change)", soft_wrap=True)
        summary = train(data, run, method, teacher, schedule, seed, own)
        with console.status(f"Waiting for the {BASELINE} comparison"):
            compared = finish_baseline(baseline, out)
    finally:
        if baseline.poll() is None:  # interrupted: the comparison goes too
            baseline.kill()
    update_latest(RunDir(run), out)  # the baseline may have pointed latest at itself
    lap("distill")
    console.rule("3/4 export FP32, FP16, INT8 and validate")
    report = export(run, schedule)
    lap("export")
    console.rule(f"4/4 classify held-out {TARGET}es")
    int8 = run / "export" / BY_KEY[cpu_int8_key(native_flavour())].filename  # --cpu auto's
    examples = classify_examples(int8, data, schedule.examples, seed)
    lap("classify")

    from dgkit.teacher_spec import TeacherSpec

    result = {
        "method": method, "teacher": teacher,
        "teacher_about": TeacherSpec.parse(teacher).about() if teacher else None,
        "fallback_reason": why or None,
        "target": TARGET, "shortcut": SHORTCUT, "classes": list(CLASSES),
        "schedule": schedule.__dict__, "threads": threads,
        "data": str(data), "run": str(run), "int8_model": str(int8),
        "best_step": summary.best_step,
        "target_accuracy": summary.target_accuracy_mean,
        "source_val_accuracy": summary.source_val_accuracy_mean,
        "teacher_zero_shot_accuracy": summary.teacher_zero_shot_accuracy,
        "plumbing_check": summary.plumbing_check,
        "baseline": None if compared is None else {
            "method": BASELINE, "run": str(out / BASELINE),
            "target_accuracy": compared.target_accuracy_mean,
            "source_val_accuracy": compared.source_val_accuracy_mean},
        "artifacts": _artifact_rows(report), "validation_passed": report.passed,
        "examples": examples, "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_stage": stages,
    }
    write_json(out / "quickstart.json", result)
    print_report(result)
    return result


# ---------------------------------------------------------------- CLI
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the data, the run and its export.")
                   ] = Path("quickstart"),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    # None means Schedule's value, which the help names.
    steps: Annotated[int | None, typer.Option(
        help=f"Training steps (default: {Schedule.steps}).")] = None,
    image_size: Annotated[int | None, typer.Option(
        help=f"Student input size in pixels (default: {Schedule.image_size}).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Images per step (default: {Schedule.batch_size}).")] = None,
    per_class: Annotated[int | None, typer.Option(
        help=f"Sample images per class and domain (default: {Schedule.per_class}).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the data and the training.")] = 0,
    teacher: Annotated[str | None, typer.Option(
        help="CLIP teacher, MODEL:PRETRAINED or MODEL:/path/to/checkpoint (default: "
             "ViT-B-32:openai with rise if it loads, else vl2v with a small CLIP trained on "
             "the sample world).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for training (default: the cores other work leaves idle).")] = None,
    teacher_steps: Annotated[int | None, typer.Option(
        help="Steps of the small CLIP trained on the sample world when the CLIP weights "
             f"cannot be loaded (default: {Schedule.teacher_steps}; cached).")] = None,
) -> None:
    """Try dgkit in minutes on CPU: draw the sample data, distill a student from a CLIP teacher
    with the sketch domain held out (an ERM student beside it), export FP32, FP16 and INT8,
    validate them on sketches and classify a few."""
    run_quickstart(out, overwrite=overwrite, steps=steps, image_size=image_size,
                   batch_size=batch_size, per_class=per_class, seed=seed, teacher=teacher,
                   threads=threads, teacher_steps=teacher_steps)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)
