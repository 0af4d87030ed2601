"""Dynamic micro-batching: concurrent requests are merged into one model run, padded per batch.

A request is a dict of int64 [rows, tokens] arrays. The worker takes the oldest request, then keeps taking more
until the batch holds `max_batch` rows or `max_delay` seconds have passed since it started waiting, pads every
request to the longest sequence in the batch, runs the model once in a worker thread (so the event loop keeps
accepting requests meanwhile) and hands each request its own rows back. The queue is bounded: at most `max_queue`
requests may be admitted and not yet answered (waiting, or in the batch being formed or run); `admit` (or `submit`)
refuses more at once, so overload becomes a 503 instead of an unbounded backlog. A text request is admitted before
it is tokenised, so a full queue refuses it before any work is spent on it.

`close()` finishes what is queued; `abandon()` (a shutdown past its grace period) fails every request not yet
answered with `BatcherClosed` at once and asks the model run in progress to stop, so nothing abandoned is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from qbert_deploy.runtimes.serving.metrics import ServeMetrics

RunFn = Callable[[dict[str, np.ndarray]], np.ndarray]


class QueueFull(RuntimeError):
    """The request queue is full; the client should retry later."""


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class Admission:
    """A place in the queue, held from admission until the request is answered (or released unused)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher

    def release(self) -> None:
        """Give the place back; a second call, or one after the request was answered, does nothing."""
        if self._batcher is not None:
            self._batcher._pending -= 1
            self._batcher = None


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    future: asyncio.Future[np.ndarray]

    @property
    def rows(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


def pad_and_stack(requests: list[dict[str, np.ndarray]], pad_values: dict[str, int]) -> dict[str, np.ndarray]:
    """One batch from several requests: each padded on the right to the longest sequence, rows stacked in order."""
    longest = max(int(next(iter(r.values())).shape[1]) for r in requests)
    rows = sum(int(next(iter(r.values())).shape[0]) for r in requests)
    batch: dict[str, np.ndarray] = {}
    for name in requests[0]:
        out = np.full((rows, longest), pad_values.get(name, 0), dtype=np.int64)
        row = 0
        for request in requests:
            array = request[name]
            out[row:row + array.shape[0], :array.shape[1]] = array
            row += array.shape[0]
        batch[name] = out
    return batch


class Batcher:
    def __init__(self, run: RunFn, *, max_batch: int, max_delay: float, max_queue: int,
                 pad_values: dict[str, int], metrics: ServeMetrics | None = None,
                 stop_run: Callable[[], None] | None = None) -> None:
        """`stop_run`, called from the event loop, asks the model run in progress (in the worker thread) to stop."""
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")
        self.run = run
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.pad_values = pad_values
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()  # bounded by `_pending`, not by size
        self._pending = 0  # admitted and not yet answered
        self._carry: _Request | None = None  # taken from the queue but did not fit the last batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbert-infer")
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._abandoned = False
        self._forming: list[_Request] = []  # the batch being collected
        self._running: list[_Request] = []  # the batch in the worker thread
        self._abandon_reason = ""
        self._stop_run = stop_run
        if metrics is not None:
            metrics.watch_queue(lambda: self._pending)

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._loop(), name="qbert-batcher")

    async def close(self) -> None:
        """Take no new work, finish every queued request (none after `abandon`), then stop the worker."""
        self._closing = True
        if self._worker is not None:
            if self._abandoned:  # its requests are answered already; the run in progress was asked to stop
                self._worker.cancel()
            else:
                await self._queue.put(None)  # wakes the worker after everything queued before it
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=not self._abandoned, cancel_futures=True)

    def abandon(self, reason: str = "the server stopped before this request was run") -> None:
        """Take no new work and fail every request not yet answered; stop the model run in progress."""
        self._closing = self._abandoned = True
        self._abandon_reason = reason
        waiting = [*self._forming, *self._running, *([self._carry] if self._carry is not None else [])]
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                waiting.append(item)
        self._queue.put_nowait(None)  # the worker stops at the marker instead of waiting for more
        self._fail(waiting)
        if self._running and self._stop_run is not None:
            self._stop_run()

    def _fail(self, requests: list[_Request]) -> None:
        for r in requests:
            if not r.future.done():
                r.future.set_exception(BatcherClosed(self._abandon_reason))

    def admit(self) -> Admission:
        """A place in the queue for a request about to be prepared (tokenised); QueueFull when there is none."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self._pending >= self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise QueueFull(f"the request queue is full ({self._pending} requests waiting)")
        self._pending += 1
        return Admission(self)

    def submit(self, feeds: dict[str, np.ndarray], admission: Admission | None = None) -> asyncio.Future[np.ndarray]:
        """Queue one request (in the place `admission` holds, else a new one); its future resolves to its own
        [rows, labels] logits."""
        if self._closing:
            if admission is not None:
                admission.release()
            raise BatcherClosed("the server is shutting down")
        rows = int(feeds["input_ids"].shape[0])
        if rows > self.max_batch:
            if admission is not None:
                admission.release()
            raise ValueError(f"a request of {rows} rows is larger than the maximum batch of {self.max_batch}")
        place = admission if admission is not None else self.admit()
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: place.release())
        self._queue.put_nowait(_Request(feeds, future))
        return future

    @property
    def pending(self) -> int:
        return self._pending

    async def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return await self.submit(feeds)

    async def _next(self, timeout: float | None) -> _Request | None:
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self) -> tuple[list[_Request], bool]:
        """The next batch, and whether the shutdown marker was reached."""
        first = await self._next(None)
        if first is None:
            return [], True
        batch, rows = [first], first.rows
        self._forming = batch  # where `abandon` finds them while more are awaited
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_batch:
            try:
                request = await self._next(deadline - time.monotonic())
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if request is None:
                return batch, True
            if rows + request.rows > self.max_batch:
                self._carry = request
                break
            batch.append(request)
            rows += request.rows
        return batch, False

    async def _loop(self) -> None:
        while True:
            batch, done = await self._collect()
            self._forming = []
            if self._abandoned:
                self._fail(batch)
                return
            live = [r for r in batch if not r.future.done()]  # a client that went away needs no answer
            if live:
                self._running = live
                try:
                    await self._run_batch(live)
                finally:
                    self._running = []
            if done or self._abandoned:
                return

    async def _run_batch(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            feeds = pad_and_stack([r.feeds for r in batch], self.pad_values)
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, feeds)
            if logits.shape[0] != feeds["input_ids"].shape[0]:
                raise RuntimeError(f"the model gave {logits.shape[0]} rows for {feeds['input_ids'].shape[0]}")
        except Exception as err:  # the batch failed: each of its requests gets the error, the worker goes on
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        if self.metrics is not None:
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.batch_rows.observe(sum(r.rows for r in batch))
            self.metrics.batch_requests.observe(len(batch))
        row = 0
        for r in batch:
            if not r.future.done():
                own = logits[row:row + r.rows]
                # per-token outputs come back as long as the request's own sequences, not the padded batch
                r.future.set_result(own[:, :r.feeds["input_ids"].shape[1]] if own.ndim > 2 else own)
            row += r.rows

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._executor.shutdown(wait=False)
