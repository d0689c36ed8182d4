"""CLI commands of the edge runtime: `dgkit predict`, `dgkit serve`, `dgkit bench infer`.

Imported at every CLI start, so only typer and the standard library are imported at the top;
numpy, onnxruntime and fastapi are imported inside the command bodies.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dgkit.errors import DgkitError, require_extra
from dgkit.serve.limits import Batching, ServeLimits

if TYPE_CHECKING:
    from dgkit.serve.predictor import Prediction

BACKEND_HELP = "auto | tensorrt | ort-trt | ort-cuda | ort-cpu | openvino"
AnyCpu = Annotated[bool, typer.Option(
    "--any-cpu", help="Run an INT8 model made for another kind of CPU (dgkit export --cpu) "
                      "although its answers would be wrong here.")]
FORMATS = ("table", "json", "csv")
PROGRESS_MIN_FILES = 50  # below this a bar only flickers


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `predict` and `serve` to the main app and `infer` to the `bench` group."""
    app.command("predict")(predict)
    app.command("serve")(serve)
    bench_app.command("infer")(bench_infer)


def _collect(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given plus images under folders (recursive); missing paths as error lines."""
    from dgkit.preprocess import IMAGE_SUFFIXES

    files: list[Path] = []
    missing: list[str] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and p.suffix.lower() in IMAGE_SUFFIXES
                                and not p.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            missing.append(f"{path} does not exist")
    return files, missing


def _pairs(r: Prediction) -> zip:
    return zip(r.labels, r.probs, strict=True)


LineFormat = Callable[[Path, "Prediction"], str]


def _formatter(fmt: str, k: int, width: int) -> tuple[str | None, LineFormat]:
    """A header line (or None) and a function giving one output line per image."""
    if fmt == "json":
        return None, lambda path, r: json.dumps({"path": str(path), **r.to_dict()})
    if fmt == "csv":
        def csv_line(cells: list[Any]) -> str:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(cells)
            return buf.getvalue()

        header = ["path"] + [f"{col}_{i}" for i in range(1, k + 1) for col in ("label", "prob")]
        return csv_line(header), lambda path, r: csv_line(
            [str(path)] + [v for lab, p in _pairs(r) for v in (lab, f"{p:.6f}")])
    return None, lambda path, r: f"{str(path):<{width}}  " + "  ".join(
        f"{lab} {p:.3f}" for lab, p in _pairs(r))


def predict(
    model: Annotated[Path, typer.Argument(help="dgkit .onnx model or TensorRT .plan engine.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (recursive).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 32,
    fmt: Annotated[str, typer.Option("--format", help="table | json (lines) | csv.")] = "table",
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    any_cpu: AnyCpu = False,
) -> None:
    """Classify images: one line per image; unreadable ones are reported and skipped (exit 1)."""
    if fmt not in FORMATS:
        raise DgkitError(f"unknown --format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if top_k < 1 or batch_size < 1:
        raise DgkitError("--top-k and --batch-size must be at least 1")
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    import numpy as np
    from rich.markup import escape

    from dgkit.preprocess import IMAGE_SUFFIXES, ImageError
    from dgkit.progress import console, make_progress
    from dgkit.serve.predictor import Predictor

    files, missing = _collect(paths)
    failed = list(missing)
    if not files and not failed:
        raise DgkitError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in "
                         f"{', '.join(map(str, paths))}")
    predictor = Predictor(model, backend, any_cpu=any_cpu)
    console.print(f"[dim]{escape(model.name)} on backend {predictor.backend}: "
                  f"{len(files)} image{'' if len(files) == 1 else 's'}[/dim]")
    header, line = _formatter(fmt, min(top_k, len(predictor.classes)),
                              min(60, max((len(str(f)) for f in files), default=0)))
    # Under a live progress bar rich redirects sys.stdout to the terminal; when stdout is a pipe
    # or file, write to it directly so results never land on stderr.
    out = sys.stdout

    def emit(text: str) -> None:
        if out.isatty():
            print(text)
        else:
            out.write(text + "\n")

    def prepare(path: Path) -> np.ndarray | ImageError:
        try:
            return predictor.prepare(path)
        except ImageError as exc:
            return exc

    for message in failed:
        console.print(f"[red]skipped[/red] {escape(message)}", soft_wrap=True)
    show_bar = len(files) >= PROGRESS_MIN_FILES
    with (make_progress() if show_bar else nullcontext()) as progress, \
            ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        task = progress.add_task("predict", total=len(files)) if progress else None
        if header:
            emit(header)
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            good: list[tuple[Path, np.ndarray]] = []
            # Decoding in threads overlaps the files' I/O and PIL's C code, which drops the GIL.
            for path, result in zip(chunk, pool.map(prepare, chunk), strict=True):
                if isinstance(result, ImageError):
                    failed.append(str(result))
                    console.print(f"[red]skipped[/red] {escape(str(result))}", soft_wrap=True)
                else:
                    good.append((path, result))
            if good:
                preds = predictor.predict_prepared(np.stack([a for _, a in good]), top_k)
                for (path, _), pred in zip(good, preds, strict=True):
                    emit(line(path, pred))
            if progress:
                progress.advance(task, len(chunk))
    if failed:
        total = len(files) + len(missing)
        done = total - len(failed)
        message = f"{len(failed)} of {total} images failed; {done} classified" if done else (
            f"{'the image' if total == 1 else f'all {total} images'} failed; nothing was "
            "classified")
        console.print(f"[red]{message}[/red]")
        raise typer.Exit(1)


def _require_serve_extra() -> None:
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):
        require_extra("serve", module)


def serve(
    model: Annotated[Path, typer.Argument(help="dgkit .onnx model or TensorRT .plan engine.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_request_mb: Annotated[float, typer.Option(
        "--max-request-mb", help="Larger request bodies get 413.")] = ServeLimits.max_request_mb,
    max_image_megapixels: Annotated[float, typer.Option(
        "--max-image-megapixels",
        help="Largest image, in decoded pixels, read from its header before any decoding: a "
             "larger one gets 413. A small PNG can decode to gigabytes (about 8 bytes a pixel, "
             "20 with alpha); a large JPEG decodes at reduced scale and counts as such."
    )] = ServeLimits.max_image_megapixels,
    max_request_megapixels: Annotated[float, typer.Option(
        "--max-request-megapixels",
        help="Decoded pixels all images of one request may add up to; more gets 413 before "
             "any is decoded.")] = ServeLimits.max_request_megapixels,
    max_inflight_megapixels: Annotated[float, typer.Option(
        "--max-inflight-megapixels",
        help="Pixels being decoded at once across all requests, which bounds the server's "
             "memory; a request waits its turn, and one that finds no room within "
             "--request-timeout gets 503 with Retry-After. At least --max-image-megapixels."
    )] = ServeLimits.max_inflight_megapixels,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout",
        help="Seconds a request may take, upload included; a slower one gets 504 and its "
             "remaining images are not decoded. (A request whose client disconnects stops "
             "the same way.)")] = ServeLimits.request_timeout,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    any_cpu: AnyCpu = False,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Most images in one model call; requests waiting together share "
                            "one (a larger request runs alone). 1: no batching."
    )] = Batching.max_batch,
    max_delay_ms: Annotated[float, typer.Option(
        "--max-delay-ms", help="How long the first request waiting may wait for others to "
                               "join its batch. 0 batches only those that queue while the "
                               "model runs.")] = Batching.max_delay_ms,
    model_name: Annotated[str | None, typer.Option(
        "--model-name", help="The model's name under /v2/models (default: the file name up "
                             "to its first dot).")] = None,
) -> None:
    """Serve the model over HTTP: POST /predict (multipart 'file'), GET /health, GET /model, and
    the Open Inference Protocol v2 (KServe, Triton) under /v2."""
    _require_serve_extra()
    limits = ServeLimits(max_request_mb, max_image_megapixels, max_request_megapixels,
                         max_inflight_megapixels, request_timeout)
    batching = Batching(max_batch, max_delay_ms)
    if not 0 < port < 65536:
        raise DgkitError(f"--port must be between 1 and 65535, not {port}")
    import signal

    import uvicorn

    from dgkit.progress import console
    from dgkit.serve.app import create_app
    from dgkit.serve.predictor import Predictor

    _return_freed_memory()
    predictor = Predictor(model, backend, any_cpu=any_cpu)
    app = create_app(predictor, limits, model_name, batching)
    console.print(f"serving {model.name} ({len(predictor.classes)} classes) on backend "
                  f"{predictor.backend} at http://{host}:{port}")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal under the
    # handler that was there before it; a no-op one here makes a requested stop exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10,
                server_header=False)


def _return_freed_memory() -> None:
    """Have glibc hand large freed blocks back to the OS at once. By default it raises its mmap
    threshold after each large free, after which decoded images land in per-thread arenas that
    keep their size: the server's memory would stay at the peak of every decoding thread, and
    --max-inflight-megapixels would bound the work in flight but not the memory."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):  # no C library by that name (Windows)
        return
    if hasattr(libc, "mallopt"):  # glibc; other C libraries have no such threshold to pin
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MB and more are mmapped


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise DgkitError(f"{option} must be comma-separated integers, not '{text}'") from exc


def _read_images(folder: Path, count: int) -> list[bytes]:
    files, _ = _collect([folder])
    if not files:
        raise DgkitError(f"no images found in {folder}")
    # Every n-th file, so that a folder sorted by class or domain is sampled across.
    return [f.read_bytes() for f in files[::max(1, len(files) // count)][:count]]


def bench_infer(
    model: Annotated[Path, typer.Argument(help="dgkit .onnx model or TensorRT .plan engine.")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated.")
                           ] = "1,8,32",
    backend: Annotated[str, typer.Option("--backend", help=f"Comma-separated: {BACKEND_HELP}")
                       ] = "auto",
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per batch size.")] = 30,
    clients: Annotated[str, typer.Option(
        "--clients", help="Also load-test `dgkit serve MODEL` on localhost with each of these "
                          "numbers of concurrent clients, comma-separated (0: no HTTP test; "
                          "needs the serve extra).")] = "0",
    requests: Annotated[int, typer.Option(
        "--requests", help="Requests each HTTP load test sends before it stops.")] = 400,
    batching: Annotated[str, typer.Option(
        "--batching", help="Server settings to load-test, comma-separated, one server each: "
                           "'off' (--max-batch 1) or a --max-delay-ms value (0 batches only "
                           "what queues while the model runs).")] = "off,0,5",
    paths: Annotated[str, typer.Option(
        "--paths", help="Comma-separated: predict (multipart POST /predict) and v2 (v2 infer, "
                        "BYTES image_bytes in plain JSON).")] = "predict,v2",
    images: Annotated[Path | None, typer.Option(
        "--images", help="Folder of images to send in turn (default: a synthetic 640x480 "
                         "JPEG).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")
                        ] = None,
) -> None:
    """Latency p50/p95 and images/s per backend and batch size; preprocessing timed apart.

    With --clients, also images/s and request latency p50/p99 of a local `dgkit serve` under
    each number of concurrent single-image clients, per batching setting and path, beside the
    Predictor's own back-to-back single-image rate."""
    sizes = _int_list(batch_sizes, "--batch-sizes")
    if not sizes or min(sizes) < 1 or runs < 1:
        raise DgkitError("--batch-sizes and --runs must be positive integers")
    client_counts = [n for n in _int_list(clients, "--clients") if n != 0]
    if min(client_counts, default=1) < 1 or requests < 1:
        raise DgkitError(f"--clients must be 0 or more and --requests positive, not {clients} "
                         f"and {requests}")
    modes = [m.strip() for m in batching.split(",") if m.strip()]
    path_names = [p.strip() for p in paths.split(",") if p.strip()]
    from dgkit.serve.bench import PATHS

    for mode in modes:
        if mode != "off" and not mode.replace(".", "", 1).isdigit():
            raise DgkitError(f"--batching takes 'off' or a delay in ms, not '{mode}'")
    if not set(path_names) <= set(PATHS):
        raise DgkitError(f"--paths takes {', '.join(PATHS)}, not '{paths}'")
    if client_counts:
        _require_serve_extra()
    from rich.console import Console
    from rich.table import Table

    from dgkit.atomic import write_json
    from dgkit.progress import console
    from dgkit.serve.backends import check_backend
    from dgkit.serve.bench import COLUMNS, HEADINGS, bench_http, bench_predictor, host_info
    from dgkit.serve.predictor import Predictor

    names = [check_backend(b.strip()) for b in backend.split(",") if b.strip()]
    sample = _read_images(images, 64) if images else None
    rows: list[dict[str, Any]] = []
    precision = ""
    for name in names:
        predictor = Predictor(model, name)
        precision = predictor.meta.precision
        console.print(f"[dim]benchmarking backend {predictor.backend} ({name})[/dim]")
        rows.extend(bench_predictor(predictor, sizes, runs,
                                    image=sample[0] if sample else None))

    table = Table(title=f"{model.name} ({precision}): model call latency, preprocessing apart")
    for heading in HEADINGS:
        table.add_column(heading, justify="left" if heading == "backend" else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in COLUMNS))
    Console().print(table)
    http = None
    if client_counts:
        console.print(f"[dim]HTTP load tests: {requests} requests each from {clients} clients "
                      f"on backend {names[0]}[/dim]")
        http = bench_http(str(model), names[0], client_counts, requests, sample, modes,
                          path_names)
        direct = http["predictor_images_per_s"]
        table = Table(title=f"dgkit serve, one image a request; Predictor alone, one image at "
                            f"a time: {direct} img/s (ratio: img/s over it)")
        for heading in ("path", "batching", "clients", "img/s", "ms p50", "ms p99", "errors",
                        "ratio"):
            table.add_column(heading, justify="left" if heading == "path" else "right")
        for r in http["rows"]:
            table.add_row(r["path"], r["batching"], str(r["clients"]), str(r["images_per_s"]),
                          str(r["latency_ms_p50"]), str(r["latency_ms_p99"]), str(r["errors"]),
                          str(r["ratio"]))
        Console().print(table)
    if json_out is not None:
        from dgkit.provenance import provenance

        write_json(json_out, {"model": str(model), "precision": precision, "host": host_info(),
                              "image": f"{len(sample)} images from {images}" if sample
                              else "synthetic 640x480 JPEG", "columns": list(COLUMNS),
                              "results": rows, "http": http, "provenance": provenance()})
        console.print(f"wrote {json_out}")
