"""The `dgkit` command line: one command per stage; each stage registers its own commands."""

from __future__ import annotations

import importlib
import sys

import typer

from dgkit.errors import DgkitError, Interrupted

HELP = """dgkit distills a CLIP teacher into a small student that keeps working on image domains
it never saw, exports it (ONNX, FP16, INT8, TensorRT) and serves it on an edge box.

\b
Typical session:
  dgkit data check ./mydomains
  dgkit distill --data ./mydomains --target sketch --method kd
  dgkit export runs/latest --fp16 --int8
  dgkit predict runs/latest/export/model.int8.onnx photo.jpg
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]})
bench_app = typer.Typer(help="Benchmarks that print a table and write JSON.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Each stage's commands live beside the stage; their modules import only typer at the top.
for _module in ("dgkit.distill.commands", "dgkit.distill.bench_dg", "dgkit.serve.commands",
                "dgkit.export.commands", "dgkit.demo.commands", "dgkit.samples",
                "dgkit.quickstart"):
    try:
        importlib.import_module(_module).register(app, bench_app)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise


def _print_version(value: bool) -> None:
    if value:
        from dgkit import __version__

        typer.echo(f"dgkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="Print dgkit's version and exit.")
          ) -> None:
    pass


def main() -> None:
    try:
        # Without standalone mode, click returns a command's exit code instead of exiting.
        result = app(standalone_mode=False)
        if isinstance(result, int):
            sys.exit(result)
    except DgkitError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(130 if isinstance(exc, Interrupted) else 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("aborted", fg="red", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # click's errors come from click itself or from the copy of it that newer typer
        # vendors, so they are known by their class names rather than by one import.
        kinds = {k.__name__ for k in type(exc).__mro__}
        if "ClickException" not in kinds:
            raise
        if "NoArgsIsHelpError" not in kinds:  # that one has printed the help already
            typer.secho(f"error: {exc.format_message()}", fg="red", err=True)
            if "UsageError" in kinds:
                typer.echo("Run 'dgkit --help' (or 'dgkit COMMAND --help') to see the options.",
                           err=True)
        sys.exit(exc.exit_code)
