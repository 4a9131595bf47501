"""Adaptive batching: the rows of concurrent requests are scored in one ONNX Runtime call.

BentoML's batcher sits only on the path of a batchable `@bentoml.api`; reaching it from our
own route costs a second trip through BentoML's request path, and its `max_latency_ms`
doubles as a deadline that turns load into 503s. This one lives in the event loop of the
worker:

- A request appends its rows to a queue. If no drain is running, one is started; it runs
  when the event loop has finished the callbacks already due, so requests parsed in the same
  loop turn join the first batch.
- The drain takes the queued requests, whole, while their rows fit in `max_batch_rows`,
  scores them in one call, answers each request with its slice, and goes on while the queue
  holds rows. The batch size therefore follows the load: one request at a time when idle,
  everything that arrived during the previous call when busy. Nothing ever waits for a
  batch to fill. A request larger than `max_batch_rows` is scored alone, in one call: cut
  into 256-row calls, 1,000-row requests lost a third of their throughput (measured).
- Calls of at least `thread_min_rows` rows run on one scoring thread, so that the event loop
  keeps reading and parsing requests while ONNX Runtime computes (it releases the GIL); small
  ones run inline, where a thread hop would cost more than the call. The thread gets its
  next batch while it computes the current one: waiting for the event loop between calls
  left it idle a third of the time under 1,000-row requests (bench/RESULTS.md, "Serving").
- Overload is shed, not queued without bound: a request is refused (`Overloaded`, a 503 with
  `Retry-After`) when the queue already holds `max_queued_rows` rows or when it waited
  `max_wait_s` without being taken. With the defaults neither happens below the host's
  capacity; the load test and the benchmark count them.
- A failing call fails only its own requests: a batch that raises is scored again request by
  request, so one bad request cannot fail the requests it shared a batch with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

# Batches handed to the scoring thread at once: one computing, one waiting behind it.
_PIPELINE = 2


class Rows(Protocol):
    """What the batcher scores: rows it can count (and join, with `concat`): `RowBlock`."""

    def __len__(self) -> int: ...


R = TypeVar("R", bound=Rows)


class Overloaded(RuntimeError):
    """The scorer is behind by more than the configured bounds; retry later."""


@dataclass(eq=False)
class _Pending(Generic[R]):
    rows: R
    future: asyncio.Future[np.ndarray]
    enqueued: float
    scores: np.ndarray
    taken: int = 0
    done: int = 0
    failed: bool = field(default=False)


class AdaptiveBatcher(Generic[R]):
    def __init__(
        self,
        score: Callable[[R], np.ndarray],
        concat: Callable[[Sequence[R]], R],
        *,
        max_batch_rows: int,
        max_queued_rows: int,
        max_wait_s: float,
        thread_min_rows: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._score = score
        self._concat = concat
        self._max_batch_rows = max_batch_rows
        self._max_queued_rows = max_queued_rows
        self._max_wait_s = max_wait_s
        self._thread_min_rows = thread_min_rows
        self._on_batch = on_batch
        self._queue: deque[_Pending[R]] = deque()
        self._queued_rows = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mlgate-score"
        )
        self.batches = 0
        # Told how long each request waited in the queue before its call (the wait metric).
        self.on_wait: Callable[[float], None] | None = None

    @property
    def max_batch_rows(self) -> int:
        return self._max_batch_rows

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def score(self, rows: R) -> np.ndarray:
        """Scores of `rows`, in order."""
        n = len(rows)
        if self._queued_rows + n > self._max_queued_rows:
            raise Overloaded(
                f"{self._queued_rows} rows are already waiting to be scored (limit "
                f"{self._max_queued_rows})"
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future(), time.monotonic(), np.empty(n))
        self._queue.append(pending)
        self._queued_rows += n
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain())
        return await pending.future

    async def close(self) -> None:
        """Finish what is queued, then release the scoring thread."""
        if self._drain_task is not None:
            await asyncio.shield(self._drain_task)
        self._executor.shutdown(wait=True)

    async def _drain(self) -> None:
        # Calls on the scoring thread are pipelined: the next batch is handed to the thread
        # while the current one computes, so ONNX Runtime does not sit idle while the event
        # loop (busy reading, decoding and answering requests) gets round to the result.
        in_call: deque[asyncio.Task[None]] = deque()
        try:
            while self._queue or in_call:
                parts = self._take_batch() if self._queue and len(in_call) < _PIPELINE else []
                if not parts:
                    if in_call:
                        await in_call.popleft()
                    continue
                # A small batch behind a thread call goes to the thread too: calls keep the
                # order their requests arrived in.
                if in_call or sum(len(p.rows) for p, _, _ in parts) >= self._thread_min_rows:
                    in_call.append(asyncio.ensure_future(self._run(parts, threaded=True)))
                else:
                    await self._run(parts)
        finally:
            self._drain_task = None

    def _take_batch(self) -> list[tuple[_Pending[R], int, int]]:
        parts: list[tuple[_Pending[R], int, int]] = []
        room = self._max_batch_rows
        now = time.monotonic()
        while self._queue:
            p = self._queue[0]
            if p.taken == 0 and now - p.enqueued > self._max_wait_s:
                self._queue.popleft()
                self._queued_rows -= len(p.rows)
                if not p.future.done():
                    p.future.set_exception(
                        Overloaded(
                            f"waited {now - p.enqueued:.1f} s for the scorer (limit "
                            f"{self._max_wait_s:g} s)"
                        )
                    )
                continue
            n = len(p.rows)
            if parts and n > room:
                break
            # Whole requests only: the first of a batch even when it alone exceeds the room.
            parts.append((p, 0, n))
            p.taken = n
            room -= n
            if self.on_wait is not None:
                self.on_wait(now - p.enqueued)
            self._queue.popleft()
        return parts

    async def _call(self, rows: R, threaded: bool) -> np.ndarray:
        if threaded:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._score, rows)
        return self._score(rows)

    async def _run(self, parts: list[tuple[_Pending[R], int, int]], threaded: bool = False) -> None:
        pieces = [p.rows for p, _, _ in parts]
        rows = pieces[0] if len(pieces) == 1 else self._concat(pieces)
        n = len(rows)
        try:
            scores = await self._call(rows, threaded)
        except Exception as err:
            if len(parts) > 1:
                # Score each request on its own so that only the bad one fails.
                for part in parts:
                    await self._run([part], threaded)
                return
            self._queued_rows -= n
            self._fail(parts[0][0], err)
            return
        self.batches += 1
        if self._on_batch is not None:
            self._on_batch(n)
        self._queued_rows -= n
        offset = 0
        for p, a, b in parts:
            p.scores[a:b] = scores[offset : offset + (b - a)]
            offset += b - a
            p.done += b - a
            if p.done == len(p.rows) and not p.failed and not p.future.done():
                p.future.set_result(p.scores)

    def _fail(self, p: _Pending[R], err: Exception) -> None:
        p.failed = True
        if p.future.done():
            return
        p.future.set_exception(err)
