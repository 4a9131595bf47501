"""Shadow scoring in a serving worker: the version that shadows the champion scores every
request off the request path, and each of its scores goes to the inference log beside the
champion's.

- `ShadowScorer`: a bounded queue and one thread. `/predict` hands it a request's decoded
  rows after the champion's answer is sent (`submit`, which never blocks: past
  `serving.shadow_queue_rows` queued rows it drops the request and counts it); the thread
  takes everything queued, scores it in one ONNX Runtime call (ORT releases the GIL, so the
  event loop goes on) and writes the rows with the shadow's scores to the inference log as
  variant `shadow`, with the request's id and arrival time. A row's position in its request
  matches the champion's, which is how `checks/shadow.py` pairs them. The latency logged for
  a shadow row is the scoring time of the call it was in (the champion's is its whole
  request).
- `ShadowWatch`: a thread (`services.registry_watch`) that asks the registry every
  `serving.shadow_poll_s` which version shadows the model (the registered model's
  `mlgate.shadow` tag, which `mlgate shadow start` sets), loads it verified by sha256,
  and swaps the worker's scorer; the tag gone,
  the scorer stops after writing what it holds. A version whose features differ from the
  champion's is refused (logged), and a registry that cannot be reached leaves the current
  shadow as it is.

Written here rather than with BentoML's batching: the shadow must never hold the champion's
answer, so it stays out of the request's task altogether.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from services.registry_watch import RegistryPoll
from services.schema import RowBlock

if TYPE_CHECKING:
    from services.inference_log import InferenceLogWriter
    from services.model_store import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    ts: float
    request_id: str
    rows: RowBlock


class ShadowScorer:
    """Scores queued requests with the shadow model on a thread of its own."""

    def __init__(
        self,
        model: LoadedModel,
        score: Callable[[RowBlock], np.ndarray],
        writer: InferenceLogWriter,
        max_queued_rows: int,
    ) -> None:
        self.model = model
        self._score = score
        self.writer = writer
        self._max_queued_rows = max_queued_rows
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._stopping = False
        self.scored_rows = 0
        self.dropped_rows = 0
        self.failed_rows = 0
        self._thread = threading.Thread(
            target=self._run, name=f"shadow-{model.version}", daemon=True
        )

    @property
    def version(self) -> str:
        return self.model.version

    def start(self) -> None:
        self.writer.start()
        self._thread.start()

    def submit(self, ts: float, request_id: str, rows: RowBlock) -> bool:
        """Queue a request's rows; False (counted) when the queue is full or stopping."""
        with self._lock:
            if self._stopping or self._queued_rows + rows.n > self._max_queued_rows:
                self.dropped_rows += rows.n
                return False
            self._queue.append(_Pending(ts, request_id, rows))
            self._queued_rows += rows.n
        self._wake.set()
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "scored_rows": self.scored_rows,
            "dropped_rows": self.dropped_rows,
            "failed_rows": self.failed_rows,
            "queued_rows": self._queued_rows,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Score what is queued, write it, stop."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.writer.close(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                batch, self._queue = self._queue, []
                self._queued_rows = 0
                stopping = self._stopping
            if batch:
                self._score_batch(batch)
            if stopping and not self._queue:
                return

    def _score_batch(self, batch: list[_Pending]) -> None:
        rows = RowBlock.concat([p.rows for p in batch])
        started = time.perf_counter()
        try:
            scores = self._score(rows)
        except Exception:
            self.failed_rows += rows.n
            logger.exception("shadow v%s could not score %d rows", self.version, rows.n)
            return
        latency_ms = (time.perf_counter() - started) * 1000.0
        offset = 0
        for pending in batch:
            n = pending.rows.n
            self.writer.submit(
                pending.ts,
                pending.request_id,
                latency_ms,
                pending.rows,
                scores[offset : offset + n],
            )
            offset += n
        self.scored_rows += rows.n


class ShadowWatch:
    """Keeps `on_change(scorer or None)` told which version shadows (see the module); the
    polling is `services.registry_watch.RegistryPoll`'s."""

    def __init__(
        self,
        read_tag: Callable[[], str | None],
        make_scorer: Callable[[str], ShadowScorer],
        on_change: Callable[[ShadowScorer | None], None],
        poll_s: float,
    ) -> None:
        self._make_scorer = make_scorer
        self._on_change = on_change
        self._current: ShadowScorer | None = None
        self._refused: str | None = None
        self._poll = RegistryPoll("shadow-watch", read_tag, self._follow, poll_s, "shadow")

    def start(self) -> None:
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()
        self._switch(None)

    def check(self) -> None:
        """One look at the registry (the thread's step)."""
        self._poll.check()

    def _follow(self, wanted: str | None) -> None:
        current = self._current.version if self._current is not None else None
        if wanted == current or (wanted is not None and wanted == self._refused):
            return
        if wanted is None:
            logger.info("shadow of v%s stopped", current)
            self._switch(None)
            return
        try:
            scorer = self._make_scorer(wanted)
        except Exception as err:
            self._refused = wanted
            logger.error("shadow: v%s refused: %s", wanted, err)
            self._switch(None)
            return
        self._refused = None
        scorer.start()
        self._switch(scorer)
        logger.info("shadow: v%s scores every request off the request path", wanted)

    def _switch(self, scorer: ShadowScorer | None) -> None:
        old, self._current = self._current, scorer
        self._on_change(scorer)
        if old is not None:
            old.close()
