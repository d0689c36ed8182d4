"""The HTTP API (FastAPI, from the `serve` extra): POST /predict, GET /health, GET /model, and
the Open Inference Protocol v2 under /v2 (see v2.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgkit import __version__
from dgkit.preprocess import ImageError, ImageTooLarge, to_model_input
from dgkit.serve import v2
from dgkit.serve.batcher import Batcher
from dgkit.serve.limits import Batching, ServeLimits, flag
from dgkit.serve.metrics import Metrics
from dgkit.serve.predictor import Predictor

MAX_FILES = 64  # images per request; a batch larger than this belongs to `dgkit predict`
# What a 503 tells the client to wait: images ahead of it decode in tens of ms a megapixel.
RETRY_AFTER_S = 5
STATE = "dgkit.request"  # the scope key of a request's RequestState

log = logging.getLogger("uvicorn.error")  # uvicorn prints this one
T = TypeVar("T")


@dataclass
class Refused(Exception):
    """A request the server will not run: answered with `status` and `detail` as its reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class RequestState:
    """What RequestGuard needs to know of a request in progress, kept in its ASGI scope."""

    images: int | None = None  # set once /predict knows how many it got
    decoded: int = 0
    waiting_for_pixels: bool = False


class PixelBudget:
    """Pixels being decoded at once across all requests, first come first served (so that a
    large image is not passed over forever by small ones).

    `submit` holds an image's pixels until its decoding thread ends, not until the request
    that asked is cancelled: until then the pixels are still in memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def submit(self, pixels: int, executor: Executor, fn: Callable[..., T], *args: Any
               ) -> asyncio.Future[T]:
        """Run `fn` on `executor` holding `pixels`, taken with `acquire`, until it ends."""
        loop = asyncio.get_running_loop()
        try:
            job = executor.submit(fn, *args)
        except BaseException:
            self.release(pixels)
            raise
        job.add_done_callback(lambda _: _call_soon(loop, self.release, pixels))
        return asyncio.wrap_future(job)

    async def acquire(self, pixels: int) -> None:
        if not self._waiters and self.used + pixels <= self.limit:
            self.used += pixels
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((pixels, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                if (pixels, waiter) in self._waiters:
                    self._waiters.remove((pixels, waiter))
                self._grant()  # it may have been the head that held the others back
            else:  # granted just as it was cancelled
                self.release(pixels)
            raise

    def release(self, pixels: int) -> None:
        self.used -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if not waiter.done():
                if self.used + pixels > self.limit:
                    return
                self.used += pixels
                waiter.set_result(None)
            self._waiters.popleft()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Schedule `fn` on `loop` from any thread; nothing to do once the loop has closed."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class RequestGuard:
    """Bound each HTTP request: 413 for a body over `max_bytes` (declared or streamed); past
    `timeout` seconds 504, or 503 with Retry-After if it was still waiting for room to decode;
    and its work cancelled as soon as its client disconnects.

    The body is read here, before the app sees it, so that an over-long upload never reaches
    the multipart parser and no error surfaces from inside the endpoint as a 500. The app then
    runs as its own task while this one waits for the client's disconnect, which uvicorn
    reports as it happens; cancelling the task stops the request at its next await: before
    its next image, or while it waits for room or for a thread (whose one image is finished
    and dropped).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, metrics: Metrics,
                 routes: list[BaseRoute]) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.metrics, self.routes = metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope[STATE] = RequestState()
        sent: set[str] = set()  # the response messages sent so far
        status = "disconnected"

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            if message["type"] == "http.response.start" or not message.get("more_body"):
                sent.add(message["type"])
            await send(message)

        try:
            await asyncio.wait_for(self._run(scope, receive, tracked, sent), self.timeout)
        except asyncio.TimeoutError:
            self._log_stop(scope, "over --request-timeout")
            if "http.response.start" not in sent:
                await self._timed_out(scope, state, tracked)
        finally:
            self.metrics.observe_request(self._endpoint(scope), status,
                                         time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        """The route's path template, so that the label has few values whatever is asked."""
        return next((getattr(r, "path", "other") for r in self.routes
                     if r.matches(scope)[0] == Match.FULL), "other")

    async def _run(self, scope: Scope, receive: Receive, send: Send, sent: set[str]) -> None:
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        # After the body, uvicorn's next message is http.disconnect: when the client goes, or
        # once the response is complete.
        client_left = asyncio.ensure_future(receive())
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # after the body: wait for the disconnect, without consuming it
                return await asyncio.shield(client_left)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        app = asyncio.ensure_future(self.app(scope, replay, send))
        try:
            await asyncio.wait({app, client_left}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and "http.response.body" not in sent:
                app.cancel()
                await asyncio.wait({app})
                self._log_stop(scope, "the client disconnected")
                return
            await app
        finally:
            client_left.cancel()
            if not app.done():  # cancelled from outside: past the timeout, or shutting down
                app.cancel()
                await asyncio.wait({app})

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a 413 is sent or the client has gone."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return None
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        mb = self.max_bytes / 2**20
        await _answer(scope, send, 413, f"request body is over the {mb:g} MB limit "
                                        f"({flag('max_request_mb')})", {"Connection": "close"})

    async def _timed_out(self, scope: Scope, state: RequestState, send: Send) -> None:
        if state.waiting_for_pixels:
            await _answer(scope, send, 503, f"the server was busy decoding other requests' "
                          f"images for the whole {self.timeout:g} s {flag('request_timeout')}; "
                          f"retry later", {"Retry-After": str(RETRY_AFTER_S)})
        else:
            await _answer(scope, send, 504, f"the request took longer than the {self.timeout:g} "
                          f"s {flag('request_timeout')} and was stopped")

    @staticmethod
    def _log_stop(scope: Scope, reason: str) -> None:
        state: RequestState = scope[STATE]
        done = f" after {state.decoded} of {state.images} images" if state.images else ""
        log.info("stopped %s %s (%s)%s", scope["method"], scope["path"], reason, done)


async def _answer(scope: Scope, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    await _error(scope["path"], status, detail, headers)(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _error(path: str, status: int, detail: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    """An error answer: {"error": ...} under /v2, as the protocol has it, else FastAPI's
    {"detail": ...}."""
    key = "error" if path.startswith("/v2/") else "detail"
    return JSONResponse({key: detail}, status_code=status, headers=headers)


def _decoded_sizes(predictor: Predictor, files: list[tuple[str, bytes]], limits: ServeLimits
                   ) -> list[int]:
    """Every file's decoded pixels, from its header (ImageError names the bad file)."""
    hint = f" per image; send a smaller image or raise {flag('max_image_megapixels')}"
    return [predictor.decoded_pixels(data, name, limits.image_pixels, hint)
            for name, data in files]


# /predict reads its form itself (to bound it), so FastAPI cannot infer the upload field.
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "The image files (JPEG, PNG, WebP, ...): repeat the "
                                           "field for several images."}}}}}}}
V2_INFER_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"],
    "description": "An Open Inference Protocol v2 request: one input, 'image' (FP32 [N, 3, H, "
                   "W], data a flat list) or 'image_bytes' (BYTES [N], data base64 strings); "
                   "outputs [{'name': 'logits', 'parameters': {'classification': k}}] for the "
                   "top k. Binary tensors are accepted with Inference-Header-Content-Length.",
    "properties": {"id": {"type": "string"}, "inputs": {"type": "array", "items": {
        "type": "object"}}, "outputs": {"type": "array", "items": {"type": "object"}}}}}}}}


def docs_page(schema: dict[str, Any]) -> str:
    """/docs without the CDN that FastAPI's Swagger UI loads from: a plain page of the routes,
    their parameters and bodies, from the same OpenAPI schema as /openapi.json."""
    from html import escape

    rows = []
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            params = ", ".join(f"{p['name']} ({p['in']})" for p in op.get("parameters", []))
            bodies = op.get("requestBody", {}).get("content", {})
            body = "; ".join(f"{media}: {escape(str(b.get('schema', {})))}"
                             for media, b in bodies.items())
            rows.append(f"<h3><code>{method.upper()} {escape(path)}</code></h3>"
                        f"<p>{escape(op.get('description') or op.get('summary', ''))}</p>"
                        + (f"<p>Parameters: {escape(params)}</p>" if params else "")
                        + (f"<p>Body: <code>{body}</code></p>" if body else ""))
    info = schema["info"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{info['title']} API"
            f"</title></head><body><h1>{info['title']} {info['version']}</h1>"
            f"<p>{escape(info.get('description', ''))} The machine-readable schema is at "
            f"<a href='/openapi.json'>/openapi.json</a>.</p>{''.join(rows)}</body></html>")


def create_app(predictor: Predictor, limits: ServeLimits | None = None,
               model_name: str | None = None, batching: Batching | None = None) -> FastAPI:
    """The app; `model_name` (default: the model file's name up to its first dot) is its name
    under /v2/models."""
    limits, batching = limits or ServeLimits(), batching or Batching()
    name = model_name or predictor.path.stem.split(".")[0]
    size, classes = predictor.spec.input_size, predictor.classes
    # Decoding, header reading and inference block: they run on threads, off the event loop,
    # which keeps watching for timeouts and disconnects. Decoding has threads of its own, as
    # many as cores: more would only hold more decoded images in memory at once.
    decoders = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dgkit-decode")
    budget = PixelBudget(limits.inflight_pixels)
    metrics = Metrics()
    batchers: list[Batcher] = []  # started at the first request, in the server's event loop

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers:
            await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dgkit", version=__version__, lifespan=lifespan,
                  description="Image classification with a distilled dgkit model.",
                  docs_url=None, redoc_url=None)
    app.state.budget = budget

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _error(request.url.path, exc.status, exc.detail)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, and uvicorn logs the traceback; the
        # client gets only the error's kind.
        return _error(request.url.path, 500, f"internal error: {type(exc).__name__}")

    async def in_thread(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def infer(batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> logits [N, C], batched with other requests'."""
        if not batchers:
            batchers.append(Batcher(predictor.run_batch, batching.max_batch,
                                    batching.max_delay_ms / 1000, metrics))
            batchers[0].start()
        return await batchers[0].infer(batch)

    async def decode(request: Request, files: list[tuple[str, bytes]]) -> np.ndarray:
        """Encoded images -> the model's input, within the pixel limits (Refused if not)."""
        state: RequestState = request.scope[STATE]
        state.images = len(files)
        start = time.perf_counter()
        try:
            sizes = await in_thread(_decoded_sizes, predictor, files, limits)
        except ImageTooLarge as exc:
            raise Refused(413, str(exc)) from exc
        except ImageError as exc:
            raise Refused(400, str(exc)) from exc
        if sum(sizes) > limits.request_pixels:
            raise Refused(413, f"the {len(files)} images are {sum(sizes) / 1e6:.1f} megapixels "
                          f"in all, over the {limits.max_request_megapixels:g}-megapixel limit "
                          f"per request; send fewer or smaller images or raise "
                          f"{flag('max_request_megapixels')}")
        prepared = []
        # Each image is decoded from its bytes inside its thread, so that no decoded image
        # outlives its step: only the small prepared arrays accumulate.
        for (file, data), pixels in zip(files, sizes, strict=True):
            state.waiting_for_pixels = True
            await budget.acquire(pixels)
            state.waiting_for_pixels = False
            try:
                prepared.append(await budget.submit(pixels, decoders, predictor.prepare, data,
                                                    file))
            except ImageError as exc:
                raise Refused(400, str(exc)) from exc
            state.decoded += 1
        batch = to_model_input(np.stack(prepared))
        metrics.preprocess.observe(time.perf_counter() - start)
        return batch

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return {**predictor.describe(), "limits": limits.to_dict(),
                "batching": batching.to_dict()}

    @app.get("/metrics")
    def prometheus() -> Response:
        """Prometheus metrics: requests by endpoint and status, latencies, batch sizes."""
        body, media = metrics.exposition()
        return Response(body, media_type=media)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request, top_k: int = 5) -> Any:
        """Multipart upload, field `file` (repeat it for several images)."""
        if top_k < 1:
            raise Refused(400, f"top_k must be at least 1, not {top_k}")
        media = request.headers.get("content-type", "")
        if not media.startswith("multipart/form-data"):
            raise Refused(415, f"send the images as multipart/form-data field 'file', not "
                          f"{media or 'a body without a Content-Type'}")
        try:
            form = await request.form(max_files=MAX_FILES)
        except Exception as exc:  # malformed multipart, too many parts
            raise Refused(400, f"cannot parse the upload as multipart/form-data: {exc}") from exc
        try:
            uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not uploads:
                raise Refused(400, "send the images as multipart/form-data field 'file'")
            files = [(u.filename or f"file {i + 1}", await u.read())
                     for i, u in enumerate(uploads)]
        finally:
            await form.close()
        results = predictor.top_k(await infer(await decode(request, files)), top_k)
        return {"backend": predictor.backend,
                "predictions": [{"file": file, **r.to_dict()}
                                for (file, _), r in zip(files, results, strict=True)]}

    @app.get("/v2")
    def v2_server() -> dict[str, Any]:
        return {"name": "dgkit", "version": __version__, "extensions": v2.EXTENSIONS}

    @app.get("/v2/health/live")
    def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def v2_ready() -> dict[str, bool]:
        return {"ready": True}  # the model is loaded before the server listens

    def check_model(model_name: str, version: str | None = None) -> None:
        if model_name != name or version not in (None, v2.VERSION):
            raise Refused(404, f"no model {model_name!r} version {version}; this server has "
                          f"{name!r} version {v2.VERSION}")

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    def v2_metadata(model_name: str, version: str | None = None) -> dict[str, Any]:
        check_model(model_name, version)
        return v2.model_metadata(name, size, len(classes))

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    def v2_model_ready(model_name: str, version: str | None = None) -> Response:
        check_model(model_name, version)
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/models/{model_name}/infer", openapi_extra=V2_INFER_SCHEMA)
    @app.post("/v2/models/{model_name}/versions/{version}/infer", openapi_extra=V2_INFER_SCHEMA)
    async def v2_infer(request: Request, model_name: str, version: str | None = None) -> Any:
        """An OIP v2 infer request with input `image` (FP32 [N, 3, H, W]) or `image_bytes`
        (BYTES [N], encoded images); output `logits`, top-k labels with `classification`."""
        check_model(model_name, version)
        encoding = request.headers.get("content-encoding", "identity")
        if encoding != "identity":
            raise Refused(415, f"Content-Encoding {encoding} is not supported; send the "
                          "request uncompressed")
        try:
            parsed = v2.parse_infer_request(await request.body(),
                                            request.headers.get(v2.HEADER_LENGTH), size,
                                            MAX_FILES)
        except v2.TensorError as exc:
            raise Refused(400, str(exc)) from exc
        if parsed.tensor is None:
            batch = await decode(request, [(f"image_bytes[{i}]", data)
                                           for i, data in enumerate(parsed.files)])
        else:
            batch = parsed.tensor
        body, head = v2.infer_response(name, parsed, await infer(batch), classes)
        if head is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(head)})

    app.add_middleware(RequestGuard, max_bytes=limits.max_bytes, timeout=limits.request_timeout,
                       metrics=metrics, routes=app.routes)
    return app
