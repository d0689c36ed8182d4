"""`dgkit demo`: the Gradio app with the CLIP teacher and the student side by side.

Imported at every CLI start, so only typer and the standard library are imported at the top;
gradio, numpy and torch are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dgkit.errors import DgkitError, require_extra

ARTIFACTS = ("torch", "onnx", "fp16", "int8", "trt")  # as dgkit.demo.models.ARTIFACTS

EXAMPLES = """
\b
Examples:
  dgkit demo                                  # runs/latest, its exported FP32 ONNX model
  dgkit demo runs/pacs-kd --artifact int8     # the INT8 model the edge box would run
  dgkit demo runs/pacs-kd --host 0.0.0.0      # reachable from other machines on the network
"""


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `demo` to the main app."""
    app.command("demo", epilog=EXAMPLES)(demo)


def demo(
    run: Annotated[Path | None, typer.Argument(
        help=r"Run directory \[default: runs/latest].", show_default=False)] = None,
    artifact: Annotated[str | None, typer.Option(
        help=r"Student to run: torch | onnx | fp16 | int8 | trt \[default: the exported FP32 "
             "ONNX model (else the first exported one; torch when the run has no export)].",
        show_default=False)] = None,
    host: Annotated[str, typer.Option(
        help="Interface to bind; 0.0.0.0 makes the demo reachable from other machines.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option(
        help="Also open a public gradio.live link (needs internet).")] = False,
    backend: Annotated[str, typer.Option(
        help="Student backend: auto | tensorrt | ort-trt | ort-cuda | ort-cpu | openvino.")
    ] = "auto",
    teacher: Annotated[bool, typer.Option(
        "--teacher/--no-teacher",
        help="Load the CLIP teacher (--no-teacher: the student alone, as on an edge box).")
    ] = True,
) -> None:
    """Open the Gradio demo: upload images and compare the CLIP teacher's zero-shot top-5 with
    the student's, with both models' size, latency and the run's reported accuracy."""
    if artifact is not None and artifact not in ARTIFACTS:
        raise DgkitError(f"unknown --artifact '{artifact}'; choose one of: {', '.join(ARTIFACTS)}")
    if not 0 < port < 65536:
        raise DgkitError(f"--port {port} is not a TCP port (1-65535)")
    from dgkit.rundir import resolve_run

    run_dir = resolve_run(run)
    run_dir.require_trained()
    if artifact not in (None, "torch"):
        from dgkit.demo.models import ARTIFACT_FILES, ARTIFACT_TITLES, artifact_path

        if artifact_path(run_dir, artifact) is None:
            raise DgkitError(f"{run_dir.export} has no {ARTIFACT_TITLES[artifact]} model "
                             f"({' or '.join(ARTIFACT_FILES[artifact])}); export it with "
                             f"dgkit export {run_dir.path}")
    require_extra("demo", "gradio")
    check_gradio()
    from dgkit.demo.app import build_app, launch

    typer.echo(f"loading {run_dir.path} ...", err=True)
    app = build_app(run_dir, artifact, backend=backend, teacher=teacher)

    def announce(url: str, share_url: str | None) -> None:
        typer.echo(f"dgkit demo of {run_dir.path.name} on {url} (Ctrl-C to stop)", err=True)
        if share and share_url:
            typer.echo(f"public link (anyone who has it can use the demo): {share_url}",
                       err=True)
        elif share:
            typer.secho("no public link: gradio could not reach its share server",
                        fg="yellow", err=True)

    launch(app, host=host, port=port, share=share, block=True, announce=announce)


def check_gradio() -> None:
    """The demo uses Gradio 6's API (launch-time theme and css, api_visibility)."""
    from importlib.metadata import version

    major = version("gradio").split(".")[0]
    if not major.isdigit() or int(major) < 6:
        raise DgkitError(f"the demo needs gradio 6 or newer (this is gradio {version('gradio')}): "
                         "pip install -U 'dgkit[demo]'")
