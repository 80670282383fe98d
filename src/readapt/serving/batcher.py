"""Dynamic batching: requests that arrive within a short window share one model call, which runs in a single
worker thread so that the event loop never waits on the model.

The window opens when the oldest waiting request arrived; a batch closes when the window has passed or it holds
`max_batch_rows` rows, whichever is first. Requests that came in while the model was busy have already waited
longer than the window, so they go into the next call at once. A batch holds whole requests (a request has at
most `max_batch_rows` rows: the server checks that at start). `queue_limit` bounds the requests waiting for the
model; one more is refused (the server answers 503) rather than queued without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("readapt.serving")


class QueueFull(Exception):
    """The batcher already holds `queue_limit` waiting requests."""


class ShuttingDown(Exception):
    """The batcher stopped before the request reached the model."""


@dataclass
class _Job:
    item: Any
    rows: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    requests: int = 0  # answered (successfully or not) by the model
    rows: int = 0
    batches: int = 0  # model calls
    refused: int = 0  # turned away because the queue was full
    largest_batch_rows: int = 0


class DynamicBatcher:
    """`await submit(item, rows)` -> what `run_batch` returned for the item. `run_batch(items)` runs in the worker
    thread and returns one result per item, in order; a result that is an exception is raised to its submitter.
    Call `start()` and `stop()` from the event loop that submits."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, window_s: float, max_batch_rows: int,
                 queue_limit: int, thread_initializer: Callable[[], None] | None = None):
        if window_s < 0 or max_batch_rows < 1 or queue_limit < 1:
            raise ValueError("window_s >= 0, max_batch_rows >= 1 and queue_limit >= 1 are required")
        self.run_batch = run_batch
        self.window_s = window_s
        self.max_batch_rows = max_batch_rows
        self.queue_limit = queue_limit
        self.stats = BatcherStats()
        self._waiting: deque[_Job] = deque()
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readapt-model",
                                            initializer=thread_initializer)
        self._task: asyncio.Task | None = None
        self.running_rows = 0  # rows in the model call under way

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="readapt-batcher")

    async def stop(self) -> None:
        """Stop taking batches (the server has already answered its in-flight requests) and end the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        self._waiting.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any, rows: int) -> Any:
        if len(self._waiting) >= self.queue_limit:
            self.stats.refused += 1
            raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model")
        job = _Job(item, rows, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._arrival.set()
        return await job.future  # if the awaiting task is cancelled, the batch skips the job

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.running_rows = sum(job.rows for job in batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [job.item for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # a bug in run_batch: fail this batch, keep serving the next
                log.error("a batch failed as a whole", exc_info=exc)
                results = [exc] * len(batch)
            finally:
                self.running_rows = 0
            self.stats.batches += 1
            self.stats.requests += len(batch)
            rows = sum(job.rows for job in batch)
            self.stats.rows += rows
            self.stats.largest_batch_rows = max(self.stats.largest_batch_rows, rows)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # cancelled: nobody is waiting for it
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _next_batch(self) -> list[_Job]:
        while True:
            self._drop_cancelled()
            if not self._waiting:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            deadline = self._waiting[0].arrived + self.window_s
            while sum(job.rows for job in self._waiting) < self.max_batch_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                with contextlib.suppress(asyncio.TimeoutError):  # builtin TimeoutError from 3.11 on
                    await asyncio.wait_for(self._arrival.wait(), remaining)
            self._drop_cancelled()
            if not self._waiting:
                continue
            batch, rows = [], 0
            while self._waiting and rows + self._waiting[0].rows <= self.max_batch_rows:
                job = self._waiting.popleft()
                batch.append(job)
                rows += job.rows
            if not batch:  # a single request above the limit (the server prevents it): run it alone
                batch.append(self._waiting.popleft())
            return batch

    def _drop_cancelled(self) -> None:
        if any(job.future.done() for job in self._waiting):
            self._waiting = deque(job for job in self._waiting if not job.future.done())
