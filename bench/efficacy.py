"""Does each CLIP method move into the student what its teacher knows? A controlled world where
the answer is known in advance: not a benchmark of the methods (PACS is), the mechanism.

The world: `dgkit samples make --shortcut P`: in the cartoon, painting and photo domains a corner
mark's colour names the class on P of the images; on the held-out sketches it is random, so ERM
learns the mark and falls there. The teacher: `dgkit teacher train` on another draw of the same
four styles with the mark random everywhere, captions naming shape and style, never the mark:
a CLIP that has seen sketches and ignores the mark, as CLIP saw sketches on the web. Each method
distills a student with sketch held out, over seeds, and twice more as controls: with a tiny
random CLIP, and with the trained teacher's class text embeddings shuffled between classes (the
prompt names deranged through `--class-names`). Prints the table and writes JSON.

    python bench/efficacy.py --out runs/efficacy --json bench/results/efficacy.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dgkit.provenance import provenance
from dgkit.samples import CLASSES, make_samples

TARGET = "sketch"
TEACHER_METHODS = ("kd", "rise", "scmd", "vl2v")
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/efficacy"),
                   help="working folder; finished runs in it are reused")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--methods", default="erm,psd,kd,rise,scmd,vl2v")
    p.add_argument("--controls", default="random,shuffled",
                   help="comma-separated: random, shuffled (empty: none)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=40, help="images per domain and class")
    p.add_argument("--shortcut", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=150, help="student steps (vl2v: half each)")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--extra", default="",
                   help="options added to every teacher method's dgkit distill, e.g. "
                        "'--temperature 10'; their runs are kept apart")
    return p.parse_args()


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """The world, the teacher's world, the teachers and the deranged names; reused if there."""
    import torch

    from dgkit.distill.teacher_train import WorldTeacher, write_random_clip

    world = args.out / "world"
    if not (world / "samples.json").is_file():
        make_samples(world, seed=0, per_class=args.per_class, size=args.image_size,
                     shortcut=args.shortcut, shortcut_free=TARGET, overwrite=True)
    torch.set_num_threads(max(1, args.jobs))
    trained = WorldTeacher(args.per_class, args.image_size, args.teacher_steps).train(
        args.out / "teacher")
    random = write_random_clip(args.out / "random_teacher")
    shuffled = args.out / "shuffled_names.txt"  # every class prompted as the next one
    shuffled.write_text("".join(f"{c}: {CLASSES[(i + 1) % len(CLASSES)]}\n"
                                for i, c in enumerate(CLASSES)))
    return {"world": str(world),
            "trained": trained["teacher"],
            "random": random,
            "shuffled_names": str(shuffled)}


def run_one(args: argparse.Namespace, paths: dict[str, str], method: str, variant: str,
            seed: int) -> dict:
    """One `dgkit distill` (reused when finished); returns its summary."""
    extra = shlex.split(args.extra) if method in TEACHER_METHODS else []
    tag = "".join(f"_{a.lstrip('-')}" for a in extra)
    run = args.out / "runs" / f"{method}-{variant}{tag}-s{seed}"
    summary = run / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["finished"]:
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "dgkit", "distill", "--data", paths["world"], "--target",
           TARGET, "--method", method, "--recipe", "fast", "--seed", str(seed),
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--eval-every", str(max(1, args.steps // 5)), "--out", str(run), "--overwrite",
           "--quiet"]
    half = args.steps // 2
    cmd += (["--align-steps", str(half), "--distill-steps", str(args.steps - half)]
            if method == "vl2v" else ["--steps", str(args.steps)])
    if variant != "none":
        cmd += ["--teacher", paths["random" if variant == "random" else "trained"]]
    if variant == "shuffled":
        cmd += ["--class-names", paths["shuffled_names"]]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(summary.read_text())


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    paths = prepare(args)
    methods = [m for m in args.methods.split(",") if m]
    controls = [c for c in args.controls.split(",") if c]
    jobs = [(m, v, s) for m in methods
            for v in (["trained", *controls] if m in TEACHER_METHODS else ["none"])
            for s in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda job: run_one(args, paths, *job), jobs))
    results: dict[str, dict[str, dict]] = {}
    teacher_zero_shot = {}
    for (method, variant, _), summary in zip(jobs, summaries, strict=True):
        cell = results.setdefault(method, {}).setdefault(variant, {"target": [], "val": []})
        cell["target"].append(summary["target_accuracy"][TARGET])
        cell["val"].append(summary["source_val_accuracy_mean"])
        if summary.get("teacher_zero_shot_accuracy"):
            teacher_zero_shot[variant] = summary["teacher_zero_shot_accuracy"]
    table = {m: {v: {"target": stats(c["target"]), "source_val": stats(c["val"])}
                 for v, c in cells.items()} for m, cells in results.items()}
    erm = table.get("erm", {}).get("none", {}).get("target")
    for cells in table.values():
        for cell in cells.values():
            if erm:
                spread = max(cell["target"]["std"], erm["std"], 1e-9)
                cell["vs_erm"] = {"points": cell["target"]["mean"] - erm["mean"],
                                  "in_std": (cell["target"]["mean"] - erm["mean"]) / spread}
    minutes = (time.perf_counter() - began) / 60
    print_table(table, teacher_zero_shot, args, minutes)
    if args.json:
        info = provenance()
        info["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "provenance": info, "world": {"shortcut": args.shortcut, "per_class": args.per_class,
                                          "held_out": TARGET, "image_size": args.image_size},
            "student": {"recipe": "fast", "steps": args.steps, "batch_size": args.batch_size,
                        "backbone": "efficientnet_lite0 (ImageNet)"},
            "teacher": paths["trained"], "teacher_steps": args.teacher_steps,
            "teacher_method_options": args.extra,
            "teacher_zero_shot_accuracy": teacher_zero_shot, "seeds": args.seeds,
            "results": table, "minutes": round(minutes, 1)}, indent=1) + "\n")
        print(f"wrote {args.json}")


def print_table(table: dict, zero_shot: dict, args: argparse.Namespace, minutes: float) -> None:
    def cell(c: dict | None) -> str:
        if c is None:
            return "-"
        t = c["target"]
        return f"{t['mean']:5.1f} ± {t['std']:4.1f}"

    variants = ["none", "trained", "random", "shuffled"]
    heads = ["no teacher", "trained teacher", "random teacher", "shuffled text"]
    print(f"\nHeld-out {TARGET} accuracy % (mean ± std over {args.seeds} seeds), shortcut "
          f"{args.shortcut}, {args.steps} steps at {args.image_size} px; {minutes:.1f} min"
          + (f"; teacher methods with {args.extra}" if args.extra else ""))
    print(f"{'method':<8}" + "".join(f"{h:>18}" for h in heads))
    for method, cells in table.items():
        print(f"{method:<8}" + "".join(f"{cell(cells.get(v)):>18}" for v in variants))
    for variant, accuracy in zero_shot.items():
        shown = ", ".join(f"{d} {a:.1f}" for d, a in accuracy.items())
        print(f"teacher zero-shot ({variant}): {shown}")


if __name__ == "__main__":
    main()
