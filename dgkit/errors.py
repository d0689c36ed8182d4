"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class DgkitError(Exception):
    """A problem the user can fix; its message is one sentence naming the file or argument."""


class Interrupted(DgkitError):
    """Ctrl-C, handled (a checkpoint written, say how to continue): the CLI exits 130, as for
    any interrupt."""


def require_extra(extra: str, module: str) -> None:
    """Fail with one line naming the extra to install when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DgkitError(
            f"this command needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'dgkit[{extra}]'"
        )
