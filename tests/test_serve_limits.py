"""The bounds of `dgkit serve` in process: option checks, the pixel budget's order and
bookkeeping, and the 503/504 answers of a server whose decoding is held up on purpose."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import encode, make_model, needs_serve_extra, photo

from dgkit.errors import DgkitError
from dgkit.preprocess import MAX_PIXELS
from dgkit.serve import Predictor
from dgkit.serve.limits import ServeLimits

pytestmark = needs_serve_extra
httpx = pytest.importorskip("httpx", reason="needs httpx (the 'dev' extra)")
INFLIGHT_MP = ServeLimits.max_inflight_megapixels


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"request_timeout": 0}, "--request-timeout must be a positive number, not 0"),
    ({"max_request_megapixels": -1}, "--max-request-megapixels must be a positive number, not -1"),
    ({"max_image_megapixels": float("nan")}, "--max-image-megapixels must be a positive number"),
    ({"max_request_mb": float("inf")}, "--max-request-mb must be a positive number, not inf"),
    ({"max_image_megapixels": MAX_PIXELS / 1e6 + 1, "max_inflight_megapixels": 1000},
     f"--max-image-megapixels must be at most {MAX_PIXELS / 1e6:g} "),
    ({"max_image_megapixels": INFLIGHT_MP + 1},
     f"--max-inflight-megapixels ({INFLIGHT_MP:g}) must be at least --max-image-megapixels "
     f"({INFLIGHT_MP + 1:g})"),
])
def test_bad_limits_are_one_sentence_naming_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(DgkitError) as info:
        ServeLimits(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_budget_serves_in_arrival_order_and_forgets_cancelled_waiters() -> None:
    from dgkit.serve.app import PixelBudget

    async def scenario() -> list[str]:
        budget, order = PixelBudget(10), []

        async def take(name: str, pixels: int) -> None:
            await budget.acquire(pixels)
            order.append(name)

        await budget.acquire(6)
        big = asyncio.create_task(take("big", 8))
        await asyncio.sleep(0)  # let it queue
        small = asyncio.create_task(take("small", 3))  # would fit now, but comes after big
        gone = asyncio.create_task(take("gone", 1))
        await asyncio.sleep(0)
        assert order == [] and budget.used == 6
        gone.cancel()
        budget.release(6)
        await big
        assert order == ["big"] and budget.used == 8 and not small.done()
        budget.release(8)
        await small
        await asyncio.gather(gone, return_exceptions=True)
        assert budget.used == 3  # the cancelled waiter took nothing
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_busy_server_answers_503_and_holds_pixels_until_decoding_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request's decoding is held up: it gets 504 at the timeout; one that finds no room
    meanwhile gets 503 with Retry-After; the pixels stay taken until the thread really ends."""
    from dgkit.serve.app import RETRY_AFTER_S, create_app

    model = tmp_path / "model.onnx"
    make_model(model)
    started, go_on = threading.Event(), threading.Event()
    real = Predictor.prepare

    def held(self: Predictor, source: bytes, name: str):  # noqa: ANN202
        started.set()
        go_on.wait(30)
        return real(self, source, name)

    monkeypatch.setattr(Predictor, "prepare", held)
    app = create_app(Predictor(model, "ort-cpu"),
                     ServeLimits(max_image_megapixels=1, max_inflight_megapixels=1,
                                 request_timeout=0.5))
    budget = app.state.budget
    full = encode(Image.new("RGB", (1000, 1000), (9, 9, 9)))  # the whole 1-megapixel budget
    small = encode(photo(0))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dgkit") as client:
            first = asyncio.create_task(client.post("/predict", files={"file": ("a.png", full)}))
            await asyncio.to_thread(started.wait, 30)
            second = await client.post("/predict", files={"file": ("b.png", small)})
            assert second.status_code == 503, second.text
            assert second.headers["retry-after"] == str(RETRY_AFTER_S)
            assert "--request-timeout" in second.json()["detail"]
            first_r = await first
            assert first_r.status_code == 504, first_r.text
            assert budget.used == 1000 * 1000  # its thread still holds the image
            started.clear()
            go_on.set()
            for _ in range(3000):  # the release is scheduled from the thread as it ends
                if budget.used == 0:
                    break
                await asyncio.sleep(0.01)
            assert budget.used == 0
            third = await client.post("/predict", files={"file": ("c.png", small)})
            assert third.status_code == 200, third.text

    asyncio.run(scenario())
