"""The HTTP API: POST /predict, GET /health, GET /model (FastAPI, from the `serve` extra)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgkit import __version__
from dgkit.preprocess import ImageError
from dgkit.serve.predictor import Predictor

MAX_FILES = 64  # images per request; a batch larger than this belongs to `dgkit predict`


class BodyLimit:
    """Answer 413 to a request body over `max_bytes`, declared or streamed.

    The body is read here, before the app sees it, so that an over-long upload never reaches
    the multipart parser and no error surfaces from inside the endpoint as a 500.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        mb = self.max_bytes / 2**20
        response = JSONResponse({"detail": f"request body is over the {mb:g} MB limit"},
                                status_code=413, headers={"Connection": "close"})
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _bad_request(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=400)


def _predict(predictor: Predictor, files: list[tuple[str, bytes]], top_k: int
             ) -> list[dict[str, Any]]:
    """Decode all files (ImageError names the bad one), then run them as one batch."""
    prepared = []
    for name, data in files:
        try:
            prepared.append(predictor.prepare(data))
        except ImageError as exc:
            raise ImageError(str(exc).replace("<bytes>", name, 1)) from exc
    results = predictor.predict_prepared(np.stack(prepared), top_k)
    return [{"file": name, **r.to_dict()} for (name, _), r in zip(files, results, strict=True)]


def create_app(predictor: Predictor, max_request_mb: float = 10.0) -> FastAPI:
    app = FastAPI(title="dgkit", version=__version__,
                  description="Image classification with a distilled dgkit model.")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return predictor.describe()

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 5) -> Any:
        """Multipart upload, field `file` (repeat it for several images)."""
        if top_k < 1:
            return _bad_request(f"top_k must be at least 1, not {top_k}")
        try:
            form = await request.form(max_files=MAX_FILES)
        except Exception as exc:  # malformed multipart, too many parts
            return _bad_request(f"cannot parse the upload as multipart/form-data: {exc}")
        try:
            uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not uploads:
                return _bad_request("send the images as multipart/form-data field 'file'")
            files = [(u.filename or f"file {i + 1}", await u.read())
                     for i, u in enumerate(uploads)]
        finally:
            await form.close()
        try:
            # Decoding and inference block: run them in the thread pool, off the event loop.
            results = await run_in_threadpool(_predict, predictor, files, top_k)
        except ImageError as exc:
            return _bad_request(str(exc))
        return {"backend": predictor.backend, "predictions": results}

    app.add_middleware(BodyLimit, max_bytes=int(max_request_mb * 2**20))
    return app
