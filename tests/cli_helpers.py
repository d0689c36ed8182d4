"""Run the real `dgkit` command in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TINY = ["--image-size", "32", "--student-weights", "none", "--batch-size", "12", "--quiet"]


def dgkit(*args: str | Path, cwd: Path | None = None, check: bool = False,
          timeout: float = 300, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dgkit", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dgkit {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def bench_script(name: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `bench/NAME` with this Python, as the commands in BENCHMARKS.md do."""
    script = Path(__file__).resolve().parents[1] / "bench" / name
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error the CLI printed; fails if it printed a traceback instead."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
