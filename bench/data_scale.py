"""Training on data larger than memory: peak memory and images/s of `dgkit distill` with the
decoded images in memory and streamed from the disk pixel store, on generated sets of growing
size, and the time to build the store.

    python bench/data_scale.py --work /tmp/dgkit-data-scale --sizes 12000,48000,192000 \
        --threads 1 --repeats 3

The sets are the built-in sample generator's (`dgkit.samples.draw_sample`, 4 domains x 6
classes) at --image-size px, drawn once into --work in --jobs processes; the smaller sets are
hard-linked prefixes of the largest (image n of a domain and class does not depend on how many
are drawn, so they are what `dgkit samples make --per-class N` writes). The store is built in a
process of its own (cold, then opened again warm), in --work's cache, before the disk runs.
Each `dgkit distill` runs as a subprocess whose memory is polled in /proc: peak RSS (the
kernel's ru_maxrss), peak anonymous RSS (the process's own memory; RSS also counts the shared
libraries and the pages of the memory-mapped store it touched, page cache the kernel can drop)
and peak file-backed RSS. Images/s comes from the run's own TensorBoard loss reports (step and
wall time) after --skip-steps: from the median time per step, which a burst of load from other
processes moves less, and over the whole span. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from dgkit.samples import CLASSES, DOMAINS, FORMAT, MANIFEST, draw_sample

PER_SET = len(DOMAINS) * len(CLASSES)  # images per index n: one per domain and class


# ---------------------------------------------------------------- the data sets

def _draw(job: tuple[Path, str, str, int, int, int, int]) -> None:
    """Draw images start..stop-1 of one domain and class that are not there yet, each written
    under a temporary name and renamed, so an interrupted drawing leaves no truncated file."""
    folder, domain, cls, start, stop, size, width = job
    for n in range(start, stop):
        path = folder / domain / cls / f"{n:0{width}d}.png"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            draw_sample(domain, cls, n, 0, size).save(tmp, format="PNG")
            os.replace(tmp, path)


def _manifest(per_class: int, size: int) -> dict[str, Any]:
    return {"generator": "dgkit.samples", "format": FORMAT, "seed": 0, "per_class": per_class,
            "size": size, "domains": list(DOMAINS), "classes": list(CLASSES)}


def make_sets(work: Path, sizes: list[int], image_size: int, jobs: int,
              largest: int | None = None) -> dict[int, Path]:
    """A folder of each size in `sizes` (images) in `work`. The images are drawn once, in index
    order, into the folder of the `largest` set (by default the largest of `sizes`), completed
    when all of it is drawn; the others are hard links to its first images, so a small set can
    be measured while the large one is still being drawn (by another invocation)."""
    largest = largest or max(sizes)
    for n in [*sizes, largest]:
        if n % PER_SET:
            raise SystemExit(f"--sizes: {n} is not a multiple of {PER_SET} (domains x classes)")
    width = len(str(largest // PER_SET - 1))
    full = work / f"samples-{image_size}px-{largest}"
    tmp = full.with_name(full.name + ".partial")
    if not (full / MANIFEST).is_file():
        need = max(sizes) // PER_SET
        for d in DOMAINS:
            for c in CLASSES:
                (tmp / d / c).mkdir(parents=True, exist_ok=True)
        step = 250
        work_items = [(tmp, d, c, s, min(s + step, need), image_size, width)
                      for s in range(0, need, step) for d in DOMAINS for c in CLASSES]
        began = time.perf_counter()
        with Pool(jobs) as pool:
            for done, _ in enumerate(pool.imap(_draw, work_items) if jobs > 1
                                     else map(_draw, work_items), 1):
                if done % max(1, len(work_items) // 20) == 0:
                    print(f"  drawn {done}/{len(work_items)} chunks "
                          f"({time.perf_counter() - began:.0f} s)", flush=True)
        seconds = time.perf_counter() - began
        print(f"drew up to {need * PER_SET} images of {image_size} px in {seconds:.0f} s "
              f"({jobs} processes)", flush=True)
        if need * PER_SET == largest:
            manifest = _manifest(need, image_size) | {
                "drawn_by": f"bench/data_scale.py in {jobs} processes"}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, full)
    source = full if (full / MANIFEST).is_file() else tmp
    sets = {}
    for n in sizes:
        per_class = n // PER_SET
        folder = full if n == largest else work / f"samples-{image_size}px-{n}"
        if not (folder / MANIFEST).is_file():
            part = folder.with_name(folder.name + ".partial")
            shutil.rmtree(part, ignore_errors=True)
            for d in DOMAINS:
                for c in CLASSES:
                    (part / d / c).mkdir(parents=True)
                    for i in range(per_class):
                        name = f"{i:0{width}d}.png"
                        os.link(source / d / c / name, part / d / c / name)
            (part / MANIFEST).write_text(json.dumps(
                _manifest(per_class, image_size) | {"hard_linked_from": full.name}, indent=2))
            os.replace(part, folder)
        sets[n] = folder
    return sets


# ---------------------------------------------------------------- measuring a process

def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of `pid` in bytes ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
            if k in keys}


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `cmd`, its output into `log`, polling its memory every 50 ms: wall seconds, exit
    code, peak RSS (the kernel's ru_maxrss), peak anonymous and file-backed RSS (polled)."""
    peak = {"RssAnon": 0, "RssFile": 0}
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                status = _status(proc.pid)
                for k in peak:
                    peak[k] = max(peak[k], status.get(k, 0))
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - began, 1), "returncode": proc.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_anon_rss_mb": round(peak["RssAnon"] / 2**20, 1),
            "peak_file_rss_mb": round(peak["RssFile"] / 2**20, 1)}


def train_rates(run: Path, batch: int, skip: int) -> dict[str, float | None]:
    """Training images/s from the run's TensorBoard loss reports (each stamped with its step
    and wall time) after step `skip`, warm-up and evaluation left out: over the whole span
    (`images_per_s`), and from the median time per step of the intervals between reports
    (`images_per_s_median`), which a burst of load from other processes moves less."""
    import statistics

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    points = [(e.step, e.wall_time) for e in events.Scalars("loss/ce") if e.step >= skip]
    if len(points) < 2:
        return {"images_per_s": None, "images_per_s_median": None}
    (s0, t0), (s1, t1) = points[0], points[-1]
    per_step = statistics.median((tb - ta) / (sb - sa)
                                 for (sa, ta), (sb, tb) in zip(points, points[1:], strict=False))
    return {"images_per_s": round((s1 - s0) * batch / (t1 - t0), 1),
            "images_per_s_median": round(batch / per_step, 1)}


# ---------------------------------------------------------------- the runs

BUILD = """
import json, sys, time
from dgkit.data import discover
from dgkit.pixel_store import open_store
from dgkit.preprocess import PreprocessSpec
data = discover(sys.argv[1])
size = int(sys.argv[2])
began = time.perf_counter()
store = open_store(data, range(len(data.samples)), PreprocessSpec(input_size=size,
                   resize_size=size), progress=None)
print(json.dumps({"seconds": time.perf_counter() - began, "images": len(store),
                  "folder": str(store.folder)}))
"""


def build_store(root: Path, size: int, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Open the pixel store of `root` at `size` px in a fresh process (building it when it is
    not there): its seconds, as the process measured them, and its memory."""
    result = run_measured([sys.executable, "-c", BUILD, str(root), str(size)], env, log)
    if result["returncode"] == 0:
        result |= json.loads(log.read_text().strip().splitlines()[-1])
    return result


def distill(args: argparse.Namespace, data: Path, store: str, out: Path, env: dict[str, str],
            extra: list[str] | None = None, steps: int | None = None) -> dict[str, Any]:
    steps = steps or args.steps
    cmd = [*args.dgkit, "distill", "--data", str(data), "--method", "erm", "--recipe", "fast",
           "--student", args.student, "--student-weights", "none", "--steps", str(steps),
           "--eval-every", str(steps), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--data-store", store, "--out", str(out),
           "--overwrite", "--quiet", *(extra or [])]
    load = os.getloadavg()
    result = run_measured(cmd, env, out.with_suffix(".log"))
    result["load_before"] = [round(x, 2) for x in load]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if result["returncode"] != 0:
        tail = out.with_suffix(".log").read_text()[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed:\n{tail}")
    return result | train_rates(out, args.batch_size, args.skip_steps)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one setting: the median of their rates, the highest of their peaks."""
    import statistics

    out: dict[str, Any] = {"runs": runs}
    for key in ("images_per_s", "images_per_s_median"):
        values = [r[key] for r in runs if r.get(key)]
        out[key] = round(statistics.median(values), 1) if values else None
    for key in ("peak_rss_mb", "peak_anon_rss_mb", "peak_file_rss_mb"):
        out[key] = max(r[key] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="where the generated sets, the stores and the runs are kept")
    parser.add_argument("--sizes", default="12000,48000,192000",
                        help="images per set, multiples of 24")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-steps", type=int, default=5,
                        help="first steps left out of images/s (warm-up)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes drawing the sets")
    parser.add_argument("--largest", type=int, default=None,
                        help="the set the others are drawn as prefixes of (default: the largest "
                             "of --sizes)")
    parser.add_argument("--draw-only", action="store_true", help="draw the sets, measure nothing")
    parser.add_argument("--dgkit", default=f"{sys.executable} -m dgkit",
                        help="how to start dgkit")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the runs (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each store per size, alternating which goes first")
    parser.add_argument("--skip-auto", action="store_true",
                        help="leave out the --data-store auto run")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other sizes (and the auto run, with --skip-auto) "
                             "that --out holds, so the sizes can be measured in turns")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_scale.json"))
    args = parser.parse_args()
    args.dgkit = args.dgkit.split()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    from dgkit.provenance import provenance

    args.work.mkdir(parents=True, exist_ok=True)
    sets = make_sets(args.work, sizes, args.image_size, args.jobs, args.largest)
    if args.draw_only:
        return
    # The stores go into --work, not the user's cache: each is built cold here, then reused.
    env = os.environ | {"XDG_CACHE_HOME": str(args.work / "cache")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    row_bytes = args.image_size * args.image_size * 3
    rows = []
    for n in sizes:
        runs = args.work / "runs" / str(n)
        runs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.work / "cache" / "dgkit" / "pixels", ignore_errors=True)
        cold = build_store(sets[n], args.image_size, env, runs / "build-cold.log")
        warm = build_store(sets[n], args.image_size, env, runs / "build-warm.log")
        measured: dict[str, list[dict[str, Any]]] = {"memory": [], "disk": []}
        for i in range(args.repeats):  # alternating which goes first
            for store in ("memory", "disk") if i % 2 == 0 else ("disk", "memory"):
                measured[store].append(distill(args, sets[n], store, runs / f"{store}-{i}", env))
        memory, disk = summary(measured["memory"]), summary(measured["disk"])
        row = {"images": n, "decoded_mb": round(n * row_bytes / 2**20, 1),
               "store_cold": cold, "store_warm": warm,
               "store_cold_s_per_1000": round(cold["seconds"] / n * 1000, 2),
               "store_warm_s_per_1000": round(warm["seconds"] / n * 1000, 2),
               "memory": memory, "disk": disk}
        rows.append(row)
        print(f"{n:>8} images: memory {memory['images_per_s_median']} img/s, peak RSS "
              f"{memory['peak_rss_mb']} MB (anon {memory['peak_anon_rss_mb']}); disk "
              f"{disk['images_per_s_median']} img/s, peak RSS {disk['peak_rss_mb']} MB (anon "
              f"{disk['peak_anon_rss_mb']}); store {row['store_cold_s_per_1000']} s/1000 cold, "
              f"{row['store_warm_s_per_1000']} warm", flush=True)

    old = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    rows = sorted([r for r in old.get("rows", []) if r["images"] not in sizes] + rows,
                  key=lambda r: r["images"])
    for row in rows:  # kept rows too: their rates again from their runs' logs, if still there
        for store in ("memory", "disk"):
            runs = row[store].get("runs") or [row[store]]
            for i, measured in enumerate(runs):
                for name in (f"{store}-{i}", store):
                    run = args.work / "runs" / str(row["images"]) / name
                    if (run / "tensorboard").is_dir():
                        measured |= train_rates(run, args.batch_size, args.skip_steps)
                        break
            row[store] = summary(runs)
        m, d = row["memory"]["images_per_s_median"], row["disk"]["images_per_s_median"]
        row["disk_vs_memory"] = round(d / m, 2) if m and d else None
    auto = old.get("auto") if args.skip_auto else run_auto(args, sets[sizes[0]], sizes[0], env)
    result = {"provenance": provenance(load_average=[round(x, 2) for x in os.getloadavg()]),
              "cpus": os.cpu_count(), "image_size": args.image_size, "student": args.student,
              "batch_size": args.batch_size, "steps": args.steps, "skip_steps": args.skip_steps,
              "repeats": args.repeats, "omp_num_threads": env.get("OMP_NUM_THREADS"),
              "omp_wait_policy": env.get("OMP_WAIT_POLICY"),
              "method": "erm", "recipe": "fast", "student_weights": "none", "rows": rows,
              "auto": auto}
    if old:
        result["earlier_provenance"] = old.get("earlier_provenance", []) + [old["provenance"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")


def run_auto(args: argparse.Namespace, data: Path, n: int, env: dict[str, str]
             ) -> dict[str, Any]:
    """--data-store auto with a budget of half the set's decoded size: disk, and the line
    saying why."""
    budget = n * args.image_size ** 2 * 3 / 2 / 1e9
    out = args.work / "runs" / str(n) / "auto"
    auto = distill(args, data, "auto", out, env, ["--memory-budget", f"{budget:.6f}"],
                   steps=args.skip_steps + 2)
    said = [line for line in out.with_suffix(".log").read_text().splitlines()
            if line.startswith("data store:")]
    return auto | {"images": n, "memory_budget_gb": round(budget, 6),
                   "line": said[0] if said else None}


def table(result: dict[str, Any]) -> str:
    head = ("| images | decoded | memory: img/s | peak RSS (anon) | disk: img/s | peak RSS (anon)"
            " | disk / memory | store build s/1000 cold | warm |")
    lines = [head, "|" + "---:|" * 9]
    for r in result["rows"]:
        m, d = r["memory"], r["disk"]
        lines.append(f"| {r['images']:,} | {r['decoded_mb']:,.0f} MB | "
                     f"{m['images_per_s_median']} | "
                     f"{m['peak_rss_mb']:,.0f} MB ({m['peak_anon_rss_mb']:,.0f}) | "
                     f"{d['images_per_s_median']} | {d['peak_rss_mb']:,.0f} MB "
                     f"({d['peak_anon_rss_mb']:,.0f}) | {r['disk_vs_memory']} | "
                     f"{r['store_cold_s_per_1000']} | {r['store_warm_s_per_1000']} |")
    if (result.get("auto") or {}).get("line"):
        lines.append(f"\nauto: {result['auto']['line']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
