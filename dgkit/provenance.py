"""Where a figure comes from: every result JSON (bench scripts, validation reports) carries the
dgkit version, the git commit, the command and the machine, including the CPU's int8
instruction sets, because INT8 speed and even INT8 arithmetic depend on them."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name, its int8 instruction sets and its physical cores."""
    from dgkit.cpu import cpu_model, instruction_sets
    from dgkit.serve.backends import physical_cores

    name = cpu_model() or platform.processor() or platform.machine()
    return f"{name} ({instruction_sets()}), {physical_cores()} cores"


def git_commit() -> str | None:
    """The commit of the dgkit checkout in use, or None for an installed wheel."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(**extra: Any) -> dict[str, Any]:
    from dgkit import __version__

    return {"dgkit_version": __version__, "git_commit": git_commit(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": cpu_name(), "python": platform.python_version(),
            "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **extra}
