"""`dgkit bench dg`: leave-one-domain-out for several methods and seeds, as a DomainBed table.

Every (method, seed, target domain) is one ordinary run directory, trained the way
`dgkit distill` trains (commands._train_one), under OUT/runs/<method>-seed<k>-<target>/. All runs
are siblings, so they share the teacher embedding caches. A run whose summary.json says
finished is reused, one with a checkpoint is resumed, so an interrupted benchmark continues
where it stopped. A run directory made with other settings is an error, never silently reused.

Each cell is the target accuracy at the step with the best source-validation accuracy
(DomainBed's training-domain validation: summary.json's target_accuracy), as mean ± sample
standard deviation over the seeds; Avg averages the domains within each seed first.
Results go to OUT/dg_table.md and OUT/dg_table.json.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dgkit.distill import options as opt
from dgkit.errors import DgkitError, require_extra
from dgkit.train_config import train_default as DEFAULT

if TYPE_CHECKING:
    from dgkit.records import Summary

EXAMPLES = """
\b
Examples:
  dgkit bench dg --data ../shared/datasets/PACS --methods erm,kd,rise --seeds 3 --out bench/pacs
  dgkit bench dg --data ./d --methods erm,psd --seeds 2 --steps 500 --out bench/d  # again: reuses
  dgkit bench dg --data ./d --methods kd,vl2v --kd-temperature 4 --vl2v-align-steps 50
  dgkit bench dg --data ../shared/datasets/PACS --methods rise --grid --seeds 3  # RISE's grid

Method options go as --<method>-<option> value and reach only that method's runs.
"""


def bench_dg(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Root of <domain>/<class>/<image>.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods (see dgkit methods).")
                       ] = "erm,kd,rise,scmd,vl2v,psd",
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 for every method and target.")] = 3,
    grid: Annotated[bool, typer.Option(
        help="Run the authors' hyper-parameter grid of each method that has one (RISE: "
             "data/hp_search/<dataset>.txt, chosen by the data folder's name) and keep, per "
             "seed and target, the point with the best source validation.")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Benchmark folder; finished runs in it are reused (default: "
             "runs/bench-dg-<date>).")] = None,
    recipe: opt.Recipe = "paper",
    student: opt.Student = DEFAULT("student"),
    student_weights: opt.StudentWeights = DEFAULT("student_weights"),
    teacher: opt.Teacher = None,
    teacher_mode: opt.TeacherMode = None,
    templates: opt.Templates = None,
    class_names: opt.ClassNames = None,
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
    device: opt.Device = DEFAULT("device"),
    precision: opt.Precision = DEFAULT("precision"),
    skip_bad: opt.SkipBad = DEFAULT("skip_bad"),
    data_store: opt.DataStore = DEFAULT("data_store"),
    memory_budget: opt.MemoryBudget = DEFAULT("memory_budget"),
    quiet: opt.Quiet = False,
) -> None:
    """Leave-one-domain-out benchmark of distillation methods over seeds (DomainBed table)."""
    require_extra("train", "torch")
    from dgkit.distill import distributed

    distributed.init()  # under torchrun every run is data-parallel; rank 0 writes the table
    try:
        _bench(data, methods, seeds, grid, out, quiet, _options_by_method(methods, ctx.args),
               dict(
            student=student, student_weights=student_weights, teacher=teacher,
            teacher_mode=teacher_mode, templates=templates, class_names_file=class_names,
            recipe=recipe, steps=steps, epochs=epochs, batch_size=batch_size,
            batch_per_domain=batch_per_domain, image_size=image_size, augment=augment, lr=lr,
            optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
            warmup_steps=warmup_steps, eval_every=eval_every, checkpoint_every=checkpoint_every,
            average=average, ema_decay=ema_decay, sma_start=sma_start,
            swad_n_converge=swad_n_converge, swad_n_tolerance=swad_n_tolerance,
            swad_tolerance_ratio=swad_tolerance_ratio, swad_bn_batches=swad_bn_batches,
            precision=precision, device=device,
            skip_bad=skip_bad, data_store=data_store, memory_budget=memory_budget))
    finally:
        distributed.shutdown()


def _options_by_method(methods: str, args: list[str]) -> dict[str, dict[str, str]]:
    """`--vl2v-align-steps 50` -> {'vl2v': {'align_steps': '50'}}."""
    from dgkit.distill.commands import method_options

    names = [m.strip() for m in methods.split(",") if m.strip()]
    out: dict[str, dict[str, str]] = {name: {} for name in names}
    for key, value in method_options(args).items():
        name = next((n for n in names if key.startswith(f"{n}_")), None)
        if name is None:
            raise DgkitError(f"--{key.replace('_', '-')} names none of --methods "
                             f"({', '.join(names)}); method options go as --<method>-<option>")
        out[name][key[len(name) + 1:]] = value
    return out


def grid_points(method: str, data: Path) -> tuple[str, tuple[dict[str, float], ...]]:
    """The method's grid for the dataset in folder `data` (matched by name: PACS, VLCS,
    OfficeHome, TerraIncognita), or its grid for other datasets; a method without a grid gets
    the one empty point, ("other datasets", ({},))."""
    from dgkit.distill.methods import get_method

    grids = get_method(method).grids
    plain = lambda name: "".join(c for c in name.lower() if c.isalnum())  # noqa: E731
    name = next((n for n in grids if n and plain(n) == plain(data.name)), "")
    return name or "other datasets", grids.get(name, ({},))


def _bench(data: Path, methods: str, seeds: int, grid: bool, out: Path | None, quiet: bool,
           options: dict[str, dict[str, str]], settings: dict[str, Any]) -> None:
    from dgkit.atomic import write_json, write_text
    from dgkit.data import discover
    from dgkit.distill import distributed
    from dgkit.distill.commands import read_templates
    from dgkit.distill.methods import get_method
    from dgkit.progress import console

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise DgkitError(f"--methods needs distinct method names, got '{methods}'")
    for name in names:
        get_method(name)
    if seeds < 1:
        raise DgkitError(f"--seeds must be at least 1, got {seeds}")
    domains = discover(data).domains
    if len(domains) < 2:
        raise DgkitError(f"{data} has {len(domains)} domain(s); leave-one-domain-out needs 2+")
    if settings["teacher"]:
        from dgkit.teacher_spec import TeacherSpec

        settings["teacher"] = TeacherSpec.resolve(settings["teacher"])
    if settings["templates"]:
        settings["templates"] = read_templates(settings["templates"])
    if settings["class_names_file"]:
        settings["class_names_file"] = str(Path(settings["class_names_file"]).resolve())
    settings["data"] = str(data.expanduser().resolve())
    stamp = distributed.broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = out or Path("runs") / f"bench-dg-{stamp}"
    accuracy: dict[str, dict[int, dict[str, float]]] = {}
    runs: dict[str, dict[int, dict[str, str]]] = {}
    grids: dict[str, dict[str, Any]] = {}
    plumbing = False
    for name in names:
        points: tuple[dict[str, Any], ...] = ({},)
        if grid and get_method(name).grids:
            grid_name, points = grid_points(name, data)
            clash = sorted(set(options.get(name, {})) & set(points[0]))
            if clash:
                raise DgkitError(f"--grid sets {name}'s {', '.join(clash)}; leave out "
                                 f"--{name}-{clash[0].replace('_', '-')}")
            grids[name] = {"grid": grid_name, "points": points, "chosen": {}}
        for seed in range(seeds):
            for domain in domains:
                best = None  # RISE's evaluate_results.py: per target, the best source val
                for k, point in enumerate(points):
                    tag = f"{name}-grid{k}" if len(points) > 1 else name
                    path = out / "runs" / f"{tag}-seed{seed}-{domain}"
                    if distributed.is_main():
                        console.rule(f"{tag}, seed {seed}, target {domain}")
                    summary = run_one(dict(settings, method=name, seed=seed, targets=[domain],
                                           hparams={**options.get(name, {}), **point}),
                                      path, out, quiet)
                    if not summary:  # torchrun ranks other than 0
                        continue
                    plumbing = plumbing or summary.plumbing_check
                    if best is None or (summary.source_val_accuracy_mean >
                                        best[0].source_val_accuracy_mean):
                        best = (summary, k, path)
                if best is None:
                    continue
                summary, k, path = best
                accuracy.setdefault(name, {}).setdefault(seed, {})[domain] = (
                    summary.target_accuracy[domain])
                runs.setdefault(name, {}).setdefault(seed, {})[domain] = str(path)
                if name in grids:
                    grids[name]["chosen"].setdefault(seed, {})[domain] = k
    if not distributed.is_main():
        return
    from dgkit.provenance import provenance

    result = {"provenance": provenance(), "data": settings["data"], "domains": domains,
              "methods": names,
              "seeds": list(range(seeds)),
              "selection": "training-domain validation (target accuracy at the step with the "
                           "best mean source-validation accuracy)",
              "settings": settings, "method_options": options, "grids": grids,
              "plumbing_check": plumbing,
              "results": {n: table_row(accuracy[n], domains) for n in names}, "runs": runs}
    write_json(out / "dg_table.json", result)
    write_text(out / "dg_table.md", markdown(result))
    _print(result)
    console.print(f"wrote {out / 'dg_table.md'} and {out / 'dg_table.json'}")


def run_one(config: dict[str, Any], path: Path, root: Path, quiet: bool) -> Summary | None:
    """Train one run, resume it from its checkpoint, or reuse it when it has finished."""
    from dgkit import api
    from dgkit.distill import distributed
    from dgkit.distill.trainer import Trainer
    from dgkit.progress import console
    from dgkit.recipes import train_config
    from dgkit.rundir import RunDir

    say = console.print if distributed.is_main() else (lambda *args: None)
    config = train_config(config.pop("recipe"), {k: v for k, v in config.items()
                                                 if v is not None})
    run = RunDir(path)
    if run.run_json.is_file():
        _check_same(Trainer(config, run=None, quiet=True), run)
        summary = run.summary()
        if summary is not None and summary.finished:
            say(f"reusing finished run {path}")
            return summary
        if run.checkpoint.is_file():
            say(f"resuming {path}")
            return api.resume(path, quiet=quiet, data_store=config.data_store,
                              memory_budget=config.memory_budget)
    return api.train(config, path, overwrite=True, quiet=quiet, runs_root=root)


# Settings that decide where the decoded images live, not the weights: a run made with any of
# them is reused under any other.
SAME_WEIGHTS = ("data_store", "memory_budget")


def _check_same(trainer, run) -> None:
    """Refuse to reuse a run directory whose run.json was made with other settings (other than
    SAME_WEIGHTS)."""
    import dataclasses

    from dgkit.distill.methods import hparams_dict

    wanted = dataclasses.asdict(trainer.run_config().train)  # resolved against the data
    wanted["hparams"] = hparams_dict(trainer.hparams)
    wanted = json.loads(json.dumps(wanted))
    stored = json.loads(json.dumps(dataclasses.asdict(run.config().train)))
    differ = sorted(k for k in set(wanted) | set(stored)
                    if k not in SAME_WEIGHTS and wanted.get(k) != stored.get(k))
    if differ:
        raise DgkitError(f"{run.path} holds a run made with other settings ({', '.join(differ)}"
                         "); pass another --out or delete that run directory")


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,  # one seed: no spread
            "per_seed": values}


def table_row(per_seed: dict[int, dict[str, float]], domains: list[str]) -> dict[str, Any]:
    """Per target domain and on average: mean, sample std and values over the seeds."""
    seeds = sorted(per_seed)
    return {"target_accuracy": {d: _stats([per_seed[s][d] for s in seeds]) for d in domains},
            "average": _stats([statistics.fmean(per_seed[s][d] for d in domains)
                               for s in seeds])}


def _cell(stats: dict[str, Any]) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.1f}"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    domains, s = result["domains"], result["settings"]
    lines = [
        "# Leave-one-domain-out (DomainBed protocol)", "",
        f"Data: `{result['data']}`; student {s['student']} ({s['student_weights']} weights); "
        f"{s.get('recipe', 'fast')} recipe (`dgkit methods NAME`); teacher "
        f"{s['teacher'] or 'per recipe'}; steps {s['steps'] or 'per recipe'}, batch "
        f"{_batch(s)}, image {s['image_size']} px; seeds "
        f"{', '.join(map(str, result['seeds']))}.", "",
        "Model selection: training-domain validation. Cells: target-domain accuracy (%), mean "
        "± sample standard deviation over seeds.", "",
        "| Method | " + " | ".join(domains) + " | Avg |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    for name in result["methods"]:
        row = result["results"][name]
        cells = [_cell(row["target_accuracy"][d]) for d in domains] + [_cell(row["average"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, g in result.get("grids", {}).items():
        lines += ["", f"{name}: the authors' grid for {g['grid']} ({len(g['points'])} points), "
                  "the point with the best source validation kept per seed and target: "
                  + "; ".join(f"seed {seed} {d}: {g['points'][k]}"
                              for seed, chosen in g["chosen"].items()
                              for d, k in chosen.items())]
    if result["plumbing_check"]:
        lines += ["", "**Plumbing check:** the teacher has no published weights (a random or "
                  "custom checkpoint), so these accuracies say nothing about the methods."]
    return "\n".join(lines) + "\n"


def _batch(settings: dict[str, Any]) -> str:
    if settings.get("batch_size"):
        return str(settings["batch_size"])
    if settings.get("batch_per_domain"):
        return f"{settings['batch_per_domain']} per source domain"
    return "per recipe"


def _print(result: dict[str, Any]) -> None:
    from dgkit.progress import console
    from dgkit.text_table import text_table

    domains = result["domains"]
    rows = [[name, *(_cell(result["results"][name]["target_accuracy"][d]) for d in domains),
             _cell(result["results"][name]["average"])] for name in result["methods"]]
    console.print("Leave-one-domain-out, training-domain validation (mean ± std over "
                  f"{len(result['seeds'])} seed(s))")
    # plain lines: a rich table would cut domain names and wrap "mean ± std" at 80 columns
    console.out("\n".join(text_table(["method", *domains, "Avg"], rows, console.width)),
                highlight=False)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("dg", epilog=EXAMPLES, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})(bench_dg)
