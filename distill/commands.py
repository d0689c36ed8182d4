"""`dgkit distill`, `dgkit data check` and `dgkit methods`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dgkit.distill import options as opt
from dgkit.errors import DgkitError, require_extra
from dgkit.train_config import train_default as DEFAULT

if TYPE_CHECKING:
    from dgkit.data import DomainData
    from dgkit.records import Summary

EXAMPLES = """
\b
Examples:
  dgkit distill --data ../shared/datasets/PACS --target sketch --method erm --steps 300
  dgkit distill --data ./mydomains --target sketch --method kd --temperature 4
  dgkit distill --data ./mydomains --target sketch --method scmd --recipe fast  # quick run
  dgkit distill --data ./mydomains --target all --method erm      # leave-one-domain-out
  dgkit distill --resume runs/latest                              # continue after Ctrl-C
  dgkit distill --resume runs/latest --data-store disk     # ... with images streamed from disk
  dgkit distill --data ./d --target s --teacher ViT-B-32:/ckpts/open_clip_model.safetensors

Method options (see `dgkit methods`) follow as --name value, e.g. --kd-weight 0.5.
"""

data_app = typer.Typer(help="Inspect a domain dataset.", no_args_is_help=True)
teacher_app = typer.Typer(help="Train a CLIP teacher on captioned domains.",
                          no_args_is_help=True)


@teacher_app.command("train")
def teacher_train(
    data: Annotated[Path, typer.Option(help="Root of <domain>/<class>/<image>; the captions "
                                            "are made of the domain and class names.")],
    out: Annotated[Path, typer.Option(help="Folder for teacher.safetensors, its model config "
                                           "and teacher.json.")],
    init: Annotated[str | None, typer.Option(
        help="Fine-tune this CLIP (MODEL:PRETRAINED or MODEL:/path) instead of training the "
             "small dgkit-world-clip from scratch.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 300,
    groups: Annotated[int, typer.Option(
        help="Groups of one image per class in each step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, cosine).")
                  ] = 1e-3,
    seed: opt.Seed = 0,
    quiet: opt.Quiet = False,
) -> None:
    """Train a CLIP teacher contrastively (open_clip's loss) on captions such as "a sketch of a
    circle", made from the folder names; it loads with --teacher MODEL:OUT/teacher.safetensors."""
    require_extra("train", "torch")
    from dgkit.distill.teacher_train import TeacherTraining, print_record, train_teacher

    if steps < 1 or groups < 1 or not 0 < lr < float("inf"):
        raise DgkitError(f"--steps and --groups must be at least 1 and --lr positive, got "
                         f"{steps}, {groups}, {lr}")
    record = train_teacher(TeacherTraining(str(data), str(out), init=init, steps=steps,
                                           groups=groups, lr=lr, seed=seed), quiet=quiet)
    print_record(record)


def method_options(args: list[str]) -> dict[str, str]:
    """`--kd-weight 0.5 --temperature=4` -> {'kd_weight': '0.5', 'temperature': '4'}."""
    out, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise DgkitError(f"unexpected argument '{token}'; method options look like "
                             "--name value (see dgkit methods)")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise DgkitError(f"--{name} needs a value")
            value, i = args[i + 1], i + 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


def distill(
    ctx: typer.Context,
    data: opt.Data = None,
    target: Annotated[list[str] | None, typer.Option(
        help="Domain to hold out (repeatable), or 'all' for leave-one-domain-out; none: "
             "train the student to deploy on every domain.")] = None,
    method: opt.Method = DEFAULT("method"),
    recipe: opt.Recipe = "paper",
    student: opt.Student = DEFAULT("student"),
    student_weights: opt.StudentWeights = DEFAULT("student_weights"),
    teacher: opt.Teacher = None,
    teacher_mode: opt.TeacherMode = None,
    templates: opt.Templates = None,
    class_names: opt.ClassNames = None,
    out: Annotated[Path | None, typer.Option(
        help="Run directory (default: runs/<date>-<method>-<target>).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue an interrupted run from its last checkpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    steps: opt.Steps = None,
    epochs: opt.Epochs = None,
    batch_size: opt.BatchSize = None,
    batch_per_domain: opt.BatchPerDomain = None,
    image_size: opt.ImageSize = DEFAULT("image_size"),
    augment: opt.Augment = None,
    lr: opt.Lr = None,
    optimizer: opt.Optimizer = None,
    weight_decay: opt.WeightDecay = None,
    schedule: opt.Schedule = None,
    warmup_steps: opt.WarmupSteps = None,
    eval_every: opt.EvalEvery = None,
    checkpoint_every: opt.CheckpointEvery = None,
    average: opt.Average = None,
    ema_decay: opt.EmaDecay = DEFAULT("ema_decay"),
    sma_start: opt.SmaStart = None,
    swad_n_converge: opt.SwadNConverge = DEFAULT("swad_n_converge"),
    swad_n_tolerance: opt.SwadNTolerance = DEFAULT("swad_n_tolerance"),
    swad_tolerance_ratio: opt.SwadToleranceRatio = DEFAULT("swad_tolerance_ratio"),
    swad_bn_batches: opt.SwadBnBatches = DEFAULT("swad_bn_batches"),
    seed: opt.Seed = DEFAULT("seed"),
    device: opt.Device = DEFAULT("device"),
    precision: opt.Precision = DEFAULT("precision"),
    compile: opt.Compile = DEFAULT("compile"),
    skip_bad: opt.SkipBad = DEFAULT("skip_bad"),
    data_store: opt.DataStore = None,
    memory_budget: opt.MemoryBudget = None,
    quiet: opt.Quiet = False,
) -> None:
    """Distill a student from the CLIP teacher with a domain-generalization method."""
    require_extra("train", "torch")
    from dgkit.distill import distributed
    from dgkit.teacher_spec import TeacherSpec

    distributed.init()
    extra = method_options(ctx.args)
    if resume is not None:
        from dgkit import api

        _print_summary(api.resume(resume, quiet=quiet, data_store=data_store,
                                  memory_budget=memory_budget), resume)
        return
    if data is None:
        raise DgkitError("--data is required: the folder of <domain>/<class>/<image>")
    target = list(target or [])  # none: train on every domain, the student to deploy
    template_list = read_templates(templates) if templates else None
    teacher = TeacherSpec.resolve(teacher) if teacher else None
    base = dict(data=str(data.expanduser().resolve()), method=method, hparams=extra,
                student=student, student_weights=student_weights, teacher=teacher,
                teacher_mode=teacher_mode,
                templates=template_list,
                class_names_file=str(class_names.resolve()) if class_names else None, seed=seed,
                steps=steps, epochs=epochs, batch_size=batch_size,
                batch_per_domain=batch_per_domain, image_size=image_size, augment=augment, lr=lr,
                optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                warmup_steps=warmup_steps, eval_every=eval_every,
                checkpoint_every=checkpoint_every, average=average, ema_decay=ema_decay,
                sma_start=sma_start, swad_n_converge=swad_n_converge,
                swad_n_tolerance=swad_n_tolerance, swad_tolerance_ratio=swad_tolerance_ratio,
                swad_bn_batches=swad_bn_batches,
                precision=precision, device=device, skip_bad=skip_bad, compile=compile,
                data_store=data_store, memory_budget=memory_budget)
    base = {k: v for k, v in base.items() if v is not None}  # None: the recipe's value
    # One name on every rank under torchrun.
    stamp = distributed.broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = out or Path("runs") / f"{stamp}-{method}-{'+'.join(target) or 'all-domains'}"
    try:
        if target == ["all"]:
            _leave_one_domain_out(recipe, base, out, overwrite, quiet)
        else:
            from dgkit import api
            from dgkit.recipes import train_config

            summary = api.train(train_config(recipe, {**base, "targets": list(target)}), out,
                                overwrite=overwrite, quiet=quiet)
            _print_summary(summary, out)
    finally:
        distributed.shutdown()


def read_templates(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise DgkitError(f"--templates file {path} cannot be read: {exc.strerror}") from exc
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise DgkitError(f"--templates file {path} needs one template per line, each with {{}} "
                         f"for the class name ({'no lines' if not lines else repr(bad[0])})")
    return lines


def _leave_one_domain_out(recipe: str, base: dict, parent: Path, overwrite: bool, quiet: bool
                          ) -> None:
    from rich.table import Table

    from dgkit import api
    from dgkit.atomic import write_json
    from dgkit.data import discover
    from dgkit.progress import console
    from dgkit.recipes import train_config

    domains = discover(base["data"]).domains
    results = {}
    for domain in domains:
        console.rule(f"target: {domain}")
        summary = api.train(train_config(recipe, {**base, "targets": [domain]}), parent / domain,
                            overwrite=overwrite, quiet=quiet, runs_root=parent.parent)
        if summary:  # None on torchrun ranks other than 0
            results[domain] = summary.target_accuracy_mean
    if not results:
        return
    average = sum(results.values()) / len(results)
    table = Table(title=f"Leave-one-domain-out, {base['method']} (training-domain validation)")
    for domain in domains:
        table.add_column(domain, justify="right")
    table.add_column("average", justify="right")
    table.add_row(*(f"{results[d]:.1f}" for d in domains), f"{average:.1f}")
    console.print(table)
    write_json(parent / "lodo.json", {"method": base["method"], "target_accuracy": results,
                                      "average": average})


def _print_summary(summary: Summary | None, out: Path) -> None:
    from dgkit.progress import console

    if summary is None:  # a torchrun rank other than 0
        return
    acc = summary.target_accuracy or {}
    if not summary.target_domains:  # trained on every domain: nothing was held out
        console.print(f"[bold green]done[/]: {out}  trained on every domain, selected at step "
                      f"{summary.best_step} by source validation "
                      f"({summary.source_val_accuracy_mean:.1f} %). Nothing was held out, so "
                      "its accuracy on an unseen domain is unknown: estimate it with dgkit "
                      f"distill --data DATA --target all (leave-one-domain-out), or check it on "
                      f"labelled images of a new domain with dgkit validate "
                      f"{out}/export/model.onnx --data DIR --domain D after dgkit export")
        return
    text = ", ".join(f"{d} {a:.1f}" for d, a in acc.items())
    how = ("the SWAD average" if summary.selection.startswith("SWAD")
           else "best source validation")
    console.print(f"[bold green]done[/]: {out}  target accuracy {text} at step "
                  f"{summary.best_step} ({how})")
    if summary.teacher_zero_shot_accuracy:
        from dgkit.data import at_chance
        from dgkit.rundir import RunDir

        zs = ", ".join(f"{d} {a:.1f}" for d, a in summary.teacher_zero_shot_accuracy.items())
        if at_chance(summary.teacher_zero_shot_accuracy, RunDir(out).config().data_root):
            zs += (" [yellow]at chance[/]: no better than always answering one class (random "
                   "weights, or class names it cannot read)")
        console.print(f"teacher zero-shot: {zs}")
    from dgkit.teacher_spec import TeacherSpec

    if summary.teacher and (about := TeacherSpec.parse(summary.teacher).about()):
        console.print(f"teacher: {about}")
    if summary.plumbing_check:
        console.print("[yellow]plumbing check:[/] the teacher has no published weights (a "
                      "random or custom checkpoint), so these accuracies say nothing about "
                      "the method")


MANY_CLASSES = 100  # up to this many classes the grid lists all of them
SCARCEST = 20  # above: the classes a check is for, those with the fewest images in a domain


def count_report(data: DomainData, width: int, every: bool = False) -> list[str]:
    """`dgkit data check`'s lines, none wider than `width`: each domain's images and class
    sizes, then the images of each class in each domain, classes as rows so that any number
    of them fits."""
    import textwrap

    from dgkit.text_table import text_table

    counts = data.counts()
    size = f"{len(data.domains)} domains, {len(data.classes)} classes, {len(data.samples)} images"
    title = f"{data.root}: {size}"
    lines = [title] if len(title) <= width else [f"{data.root}:", size]  # the path whole
    lines += ["", *text_table(
        ["domain", "images", "classes", "smallest class", "largest class"],
        [[name, str(row.sum()), str((row > 0).sum()), str(row.min()), str(row.max())]
         for name, row in zip(data.domains, counts, strict=True)], width)]
    shown = list(range(len(data.classes)))
    lines.append("")
    if len(shown) > MANY_CLASSES and not every:
        shown = sorted(shown, key=lambda c: (counts[:, c].min(), counts[:, c].sum()))[:SCARCEST]
        note = (f"The {SCARCEST} of {len(data.classes)} classes with the fewest images in a "
                "domain (--all lists every class, --json prints every count):")
        lines += textwrap.wrap(note, width)
    lines += text_table(["class", *data.domains, "total"],
                        [[data.classes[c], *map(str, counts[:, c]), str(counts[:, c].sum())]
                         for c in shown], width)
    return lines


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Root of <domain>/<class>/<image>.")],
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 4,
    every: Annotated[bool, typer.Option(
        "--all", help=f"List every class, also when there are more than {MANY_CLASSES}.")
    ] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the counts and the unreadable images as JSON instead.")] = False,
) -> None:
    """Print each domain's images and class sizes, the images of each class in each domain,
    and every unreadable image (exit 1 if any)."""
    import json
    import shutil

    from dgkit.data import decode_samples, discover
    from dgkit.preprocess import PreprocessSpec
    from dgkit.progress import console

    data = discover(root)
    if not as_json:  # the counts first: decoding a large dataset takes minutes
        print("\n".join(count_report(data, shutil.get_terminal_size().columns, every)),
              flush=True)
    for warning in data.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    decoded = decode_samples(data, range(len(data.samples)), PreprocessSpec(32, 32),
                             "Decoding", workers=workers)
    if as_json:
        counts = data.counts()
        print(json.dumps({
            "root": str(data.root), "images": len(data.samples),
            "domains": data.domains, "classes": data.classes,
            "counts": {d: dict(zip(data.classes, map(int, row), strict=True))
                       for d, row in zip(data.domains, counts, strict=True)},
            "warnings": data.warnings,
            "unreadable": [{"path": str(path), "why": why} for path, why in decoded.bad],
        }, indent=1))
    for path, why in decoded.bad:
        console.print(f"[red]unreadable:[/] {path}: {why}")
    console.print(f"{len(decoded.bad)} unreadable of {len(data.samples)} images")
    if decoded.bad:
        raise typer.Exit(1)


def methods(
    method: Annotated[str | None, typer.Argument(
        help="Show this method's recipe: every training value and where it comes from.")
    ] = None,
    recipe: opt.Recipe = "paper",
) -> None:
    """List the distillation methods, or show one method's recipe with its sources."""
    import dataclasses

    from rich.table import Table

    require_extra("train", "torch")
    from dgkit.distill.methods import get_method, method_names
    from dgkit.progress import console
    from dgkit.recipes import settings

    if method is not None:  # plain lines on stdout: the sources are long, and worth grepping
        cls = get_method(method)
        rows = [(_option(name), _shown(setting.value), setting.source)
                for name, setting in settings(recipe, method).items()]
        rows += [(f"--{f.name.replace('_', '-')}", _shown(f.default),
                  cls.sources.get(f.name, "dgkit")) for f in dataclasses.fields(cls.Hparams)]
        print(f"dgkit distill --method {method} --recipe {recipe}  ({cls.summary})")
        for option, value, source in rows:
            print(f"  {option:<22} {value:<16} {source}")
        print("Options given to dgkit distill override the recipe's values; run.json records "
              "the recipe and the overrides.")
        return
    table = Table(title="dgkit distill --method NAME [--option value ...]")
    for column in ("method", "teacher", "what it does", "options (default)"):
        table.add_column(column)
    for name in method_names():
        cls = get_method(name)
        options = "\n".join(f"--{f.name.replace('_', '-')} ({f.default})"
                            for f in dataclasses.fields(cls.Hparams))
        table.add_row(name, "yes" if cls.needs_teacher else "no", cls.summary, options or "-")
    console.print(table)
    console.print("dgkit methods NAME shows a method's recipe, each value with its source.")


def _option(name: str) -> str:
    """The distill option that sets a recipe value; momentum and lr_drops are set only by
    recipes (and the Python API)."""
    return name if name in ("momentum", "lr_drops") else f"--{name.replace('_', '-')}"


def _shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(_shown, value))
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})(distill)
    app.command()(methods)
    app.add_typer(data_app, name="data")
    app.add_typer(teacher_app, name="teacher")
