"""Dynamic batching: model calls shared by the requests that arrive close together.

Requests queue their model input; one loop takes what arrived within `max_delay` seconds of the
oldest, up to `max_batch` images (a larger request runs alone, never split), runs it as one
model call on its own thread, and hands each request its own rows of the logits. While a call
runs, new requests queue, so the next call takes them together even with no delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np

from dgkit.serve.metrics import Metrics

log = logging.getLogger("uvicorn.error")


@dataclass
class _Job:
    batch: np.ndarray
    since: float
    future: asyncio.Future[np.ndarray] = field(repr=False)


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay: float,
                 metrics: Metrics | None = None) -> None:
        self.run, self.max_batch, self.max_delay, self.metrics = run, max_batch, max_delay, metrics
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        # One model call at a time: onnxruntime already spreads one call over the cores.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dgkit-infer")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> its logits [N, C], run in a batch with others."""
        loop = asyncio.get_running_loop()
        job = _Job(batch, loop.time(), loop.create_future())
        self._queue.append(job)
        self._arrived.set()
        return await job.future  # a cancelled request's job is skipped by _take

    def _pending(self) -> int:
        return sum(len(j.batch) for j in self._queue if not j.future.done())

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its request was cancelled while it waited
                self._queue.popleft()
                continue
            if jobs and size + len(job.batch) > self.max_batch:
                break
            jobs.append(self._queue.popleft())
            size += len(job.batch)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending():
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].since + self.max_delay
            while self._pending() < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            jobs = self._take()
            if jobs:
                await self._run(jobs, loop)

    async def _run(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        start = loop.time()
        batch = np.concatenate([j.batch for j in jobs]) if len(jobs) > 1 else jobs[0].batch
        try:
            logits = await loop.run_in_executor(self._executor, self.run, batch)
        except Exception as exc:
            if len(jobs) == 1:
                if not jobs[0].future.done():
                    jobs[0].future.set_exception(exc)
                return
            # Run each request alone, so that only the one the model rejects fails.
            log.warning("a batch of %d requests failed (%s); running them one by one",
                        len(jobs), exc)
            for job in jobs:
                await self._run([job], loop)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), loop.time() - start,
                                       [start - j.since for j in jobs])
        at = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(logits[at:at + len(job.batch)])
            at += len(job.batch)
