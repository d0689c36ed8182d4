"""The run directory: the only thing that passes between distill, export, serve and demo.

```
runs/<name>/run.json  student.json  student.safetensors  metrics.jsonl  summary.json  cache/
            export/
```
Torch-free, so every stage (and the edge runtime) can read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgkit.atomic import write_text
from dgkit.errors import DgkitError
from dgkit.records import RunConfig, StudentSpec, Summary, ValidationReport

DEFAULT_RUNS = Path("runs")
LATEST = "latest"
QUICKSTART_RUN = Path("quickstart") / "run"  # where `dgkit quickstart` trains by default


class RunDir:
    """A run directory; its JSON files are read and written through `dgkit.records`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    run_json = property(lambda self: self.path / "run.json")
    student = property(lambda self: self.path / "student.safetensors")
    student_json = property(lambda self: self.path / "student.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary_json = property(lambda self: self.path / "summary.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    cache = property(lambda self: self.path / "cache")
    export = property(lambda self: self.path / "export")
    report_json = property(lambda self: self.path / "export" / "report.json")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def config(self) -> RunConfig:
        if not self.run_json.is_file():
            raise DgkitError(f"{self.path} is not a dgkit run (no run.json); train one with "
                             "dgkit distill")
        return RunConfig.read(self.run_json)

    def write_config(self, config: RunConfig) -> None:
        config.write(self.run_json)

    def student_spec(self) -> StudentSpec:
        if self.student_json.is_file():
            return StudentSpec.read(self.student_json)
        # A run written before student.json: its run.json and weights say the same.
        raw = json.loads(self.run_json.read_text(encoding="utf-8"))
        if raw.get("format") != 1:
            raise DgkitError(f"{self.path} is incomplete: it has no student.json")
        try:
            return StudentSpec.from_v1_run(raw, self.student)
        except (KeyError, ValueError, TypeError) as exc:
            raise DgkitError(f"{self.path} is a dgkit 0.1 run whose student cannot be "
                             f"described from run.json and its weights ({exc})") from exc

    def write_student_spec(self, spec: StudentSpec) -> None:
        spec.write(self.student_json)

    def summary(self) -> Summary | None:
        """The run's summary.json, or None before the first evaluation."""
        return Summary.read(self.summary_json) if self.summary_json.is_file() else None

    def write_summary(self, summary: Summary) -> None:
        summary.write(self.summary_json)

    def report(self) -> ValidationReport | None:
        """export/report.json, or None before the run is validated."""
        return ValidationReport.read(self.report_json) if self.report_json.is_file() else None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def keep_metrics_until(self, step: int) -> None:
        """On resume, drop evaluations logged after the checkpoint the run continues from."""
        rows = [r for r in self.read_metrics() if r["step"] <= step]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def require_trained(self) -> RunConfig:
        """The run's config, once it has a student; a run whose training stopped early is
        used as it is, with one line saying so."""
        config = self.config()
        if not self.student.is_file():
            raise DgkitError(f"{self.path} is incomplete: it has no student.safetensors (was "
                             "its training stopped before the first evaluation?)")
        summary = self.summary()
        if summary is not None and not summary.finished:
            from dgkit.progress import console

            reached = max((r["step"] for r in self.read_metrics()), default=0)
            console.print(f"[yellow]warning:[/] {self.path} has not finished training: it "
                          f"stopped after step {reached} of {config.train.steps}, so this is "
                          f"its best student so far (step {summary.best_step}); dgkit distill "
                          f"--resume {self.path} finishes it", soft_wrap=True)
        return config


def cache_dir() -> Path:
    """dgkit's cache of what runs share (the sample world's teacher, decoded pixels):
    $XDG_CACHE_HOME/dgkit, by default ~/.cache/dgkit."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dgkit"


def resolve_run(arg: str | Path | None) -> RunDir:
    """A run given on the command line, else runs/latest, else the quickstart's run."""
    if arg:
        path = Path(arg)
        if not path.exists():
            raise DgkitError(f"run directory {path} does not exist")
        return RunDir(path.resolve())
    path = DEFAULT_RUNS / LATEST
    if path.exists():
        return RunDir(path.resolve())
    if (QUICKSTART_RUN / "run.json").is_file():
        from dgkit.progress import console

        console.print(f"using {QUICKSTART_RUN}, the quickstart's run ({path} does not exist)")
        return RunDir(QUICKSTART_RUN.resolve())
    raise DgkitError(f"run directory {path} does not exist; name a run directory, or train "
                     "one with dgkit distill or dgkit quickstart")


@contextlib.contextmanager
def new_run(path: Path, overwrite: bool, runs_root: Path | None = None) -> Iterator[RunDir]:
    """Create a run directory and point <runs_root>/latest (default: its parent) at it,
    refusing to clobber an earlier run unless asked to.

    If the new run fails before it writes a checkpoint or a student, it is removed, `latest`
    points where it pointed before and a run that --overwrite set aside comes back, so a failed
    attempt loses nothing.
    """
    backup = None
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise DgkitError(f"run directory {path} already exists; pass --resume {path} to "
                             "continue it, --overwrite to replace it, or another --out")
        backup = path.with_name(f".{path.name}.replaced")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(path, backup)
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    root = runs_root or path.parent
    previous = _latest_target(root)
    update_latest(run, root)
    try:
        yield run
    except BaseException:
        if not run.student.is_file() and not run.checkpoint.is_file():
            shutil.rmtree(path, ignore_errors=True)
            if backup is not None:
                os.replace(backup, path)
                backup = None
            _point_latest(root, previous)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def update_latest(run: RunDir, runs_root: Path | None = None) -> None:
    """Point <runs_root>/latest (default: the run's parent) at this run, atomically."""
    root = runs_root or run.path.parent
    _point_latest(root, os.path.relpath(run.path.resolve(), root.resolve()))


def _latest_target(root: Path) -> str | None:
    link = root / LATEST
    return os.readlink(link) if link.is_symlink() else None


def _point_latest(root: Path, target: str | None) -> None:
    """Point <root>/latest at `target` (relative to root), or remove it when None; a real
    folder called 'latest' belongs to the user and is left alone."""
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        return
    if target is None:
        link.unlink(missing_ok=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    # A name of its own: runs started together in one root point it at the same moment.
    tmp = root / f".{LATEST}.{uuid.uuid4().hex}.tmp"
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)
