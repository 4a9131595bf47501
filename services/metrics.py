"""The service's Prometheus metrics, served on `/metrics`.

BentoML's own metrics middleware is switched off (it costs a fifth of the request path and
knows nothing of models or scores); these are ours, on prometheus-client. `bentoml serve`
sets `PROMETHEUS_MULTIPROC_DIR` for every worker, so the values live in that directory's
files and `/metrics` of any worker sums all of them: the numbers are right for any
`serving.workers`. Without the variable (a test in one process) they live in memory.

In multiprocess mode every increment is a locked write to a memory-mapped file plus a pid
check, about a microsecond each and seven of them per request (py-spy: 8% of the event
loop at 32 connections). So the request path counts in plain Python and `flush()` adds the
counts to prometheus-client's values: every second, and before `/metrics` answers. A scrape
of another worker may therefore lag this one by up to a second.

Each flush also reads the worker's load (`watch_load`): rows waiting in the adaptive
batcher and requests admitted but not answered, against the `serving.max_in_flight` bound.
They are gauges summed over the workers (`livesum`, prometheus-client's mode for values of
running processes: a worker's are dropped when it is marked dead, not when it merely
crashes), the bound included, so that in-flight over bound is the instance's share whatever
`serving.workers` is. A gauge is the value at the flush before the scrape (a scrape flushes
first), not an average. The time each request's rows waited in the batcher's queue before
their ONNX Runtime call is a histogram, counted like the others.

Each flush also adds the CPU seconds the worker spent since the last one (`process_time`:
all its threads) and, when it holds GPUs, the wall seconds times their number: with the rows
scored (the score histogram's count) they give the cost per 1,000 predictions
(`checks/cost.py`).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Twenty equal-width bins: the canary guardrail computes a prediction PSI from them. The
# bucket below 0 and the one above 1 (+Inf, where NaN lands too) hold invalid outputs.
SCORE_BUCKETS = (-1e-9, *(round(0.05 * i, 2) for i in range(1, 21)))
FLUSH_INTERVAL_S = 1.0
# The histograms the canary controller reads from `/metrics` (services/canary_windows.py).
LATENCY_METRIC = "mlgate_request_latency_seconds"
SCORE_METRIC = "mlgate_score"
LAST_KNOWN_GOOD_METRIC = "mlgate_model_from_last_known_good"
# The counters the cost per 1,000 predictions is computed from (prometheus-client adds
# `_total` to a counter's name when it exposes it).
CPU_SECONDS_METRIC = "mlgate_cpu_seconds"
GPU_SECONDS_METRIC = "mlgate_gpu_seconds"
BREAKER_STATE_METRIC = "mlgate_circuit_breaker_state"
# Swaps to the version the served alias names (services/alias_watch.py), done or failed.
SWAPS_METRIC = "mlgate_model_swaps"
# The leading indicators of load (checks/slo_rules.py; the Kubernetes ScaledObject scales on
# the queue).
QUEUED_ROWS_METRIC = "mlgate_batcher_queued_rows"
IN_FLIGHT_METRIC = "mlgate_in_flight_requests"
MAX_IN_FLIGHT_METRIC = "mlgate_max_in_flight"
WAIT_METRIC = "mlgate_batcher_wait_seconds"
# Rows the shadow version (services/shadow.py) scored, dropped (its queue full) or failed.
SHADOW_ROWS_METRIC = "mlgate_shadow_rows"
SHADOW_OUTCOMES = ("scored", "dropped", "failed")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _LocalHistogram:
    """Bucket counts and sum of one labelled histogram child, kept in Python until
    `flush` adds them to the child's values (the per-bucket, non-cumulative counters that
    `Histogram.observe` itself increments; prometheus-client sums them on collection)."""

    def __init__(self, child: Any, bounds: Sequence[float]) -> None:
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        self._bounds = [*bounds, float("inf")]
        if buckets is None or total is None or len(buckets) != len(self._bounds):
            raise RuntimeError(
                "prometheus-client's Histogram no longer keeps `_buckets` and `_sum`; "
                "services/metrics.py must be adapted to it"
            )
        self._child_buckets = buckets
        self._child_sum = total
        self._array_bounds = np.array(self._bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # NaN compares false with every bound: bisect puts it in the first bucket (below 0)
        # and searchsorted past the last one (clamped into +Inf); the canary counts both
        # buckets as invalid outputs.
        last = len(self._bounds) - 1
        self._counts[min(bisect.bisect_left(self._bounds, value), last)] += 1
        self._sum += value

    def observe_many(self, values: np.ndarray) -> None:
        last = len(self._bounds) - 1
        index = np.minimum(np.searchsorted(self._array_bounds, values, side="left"), last)
        counts = np.bincount(index, minlength=len(self._bounds))
        for i in np.flatnonzero(counts).tolist():
            self._counts[i] += int(counts[i])
        self._sum += float(values.sum())

    def flush(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        for i, c in enumerate(counts):
            if c:
                self._child_buckets[i].inc(c)
        if total:
            self._child_sum.inc(total)


class ServiceMetrics:
    """Requests by status and model version, latency, rows per request and per ONNX Runtime
    call (the batch size), the batcher's queue wait, queued rows and requests in flight,
    scores, the inference log's written and dropped rows, whether
    the model came from the last-known-good copy rather than the registry, and the CPU and
    GPU seconds spent. `gpus` is this worker's share of the GPUs the service holds (the
    service's `serving.gpus` over its workers): held GPUs are paid for whether busy or not.

    `observe_*` and `flush` are called from the worker's event loop only; the inference
    log's counters, which its writer thread updates, go to prometheus-client directly."""

    def __init__(
        self,
        model_name: str,
        model_version: str,
        variant: str,
        provider: str,
        sha256: str,
        *,
        from_last_known_good: bool = False,
        graph: str = "cpu",
        gpus: float = 0.0,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        names = ("model_name", "model_version", "variant")
        self._labels = (model_name, model_version, variant)
        reg = self._registry
        self._requests = Counter(
            "mlgate_requests",
            "Prediction requests answered, by HTTP status.",
            (*names, "status"),
            registry=reg,
        )
        latency = Histogram(
            LATENCY_METRIC,
            "Time from a prediction request's arrival to its response, any status.",
            names,
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        rows = Histogram(
            "mlgate_request_rows",
            "Rows per scored prediction request.",
            names,
            buckets=ROW_BUCKETS,
            registry=reg,
        )
        batch = Histogram(
            "mlgate_batch_rows",
            "Rows per ONNX Runtime call: the adaptive batcher's batch size.",
            names,
            buckets=ROW_BUCKETS,
            registry=reg,
        )
        scores = Histogram(
            SCORE_METRIC,
            "Scores returned (probability of the positive class), one per row.",
            names,
            buckets=SCORE_BUCKETS,
            registry=reg,
        )
        log_rows = Counter(
            "mlgate_inference_log_rows",
            "Inference log rows: written to Parquet, or dropped (queue full, write error).",
            (*names, "outcome"),
            registry=reg,
        )
        info = Gauge(
            "mlgate_model_info",
            "The model this instance serves (value 1), with its sha256, ONNX provider and "
            "graph (cpu, or a tree ensemble's gpu graph).",
            (*names, "sha256", "provider", "graph"),
            registry=reg,
            multiprocess_mode="max",
        )
        fallback = Gauge(
            LAST_KNOWN_GOOD_METRIC,
            "1 while the model is served from the last-known-good copy because the registry "
            "could not be reached at start-up; 0 when the registry gave it.",
            names,
            registry=reg,
            multiprocess_mode="max",
        )
        # Both exported from the start, the GPU's at zero without GPUs, so that the cost
        # recording rule finds both series for every instance.
        cpu_seconds = Counter(
            CPU_SECONDS_METRIC,
            "CPU seconds the service's workers spent (all threads, idle time included).",
            names,
            registry=reg,
        )
        gpu_seconds = Counter(
            GPU_SECONDS_METRIC,
            "GPU seconds the service held: wall seconds times the GPUs it holds.",
            names,
            registry=reg,
        )
        self._swaps = Counter(
            SWAPS_METRIC,
            "Swaps to the version the served alias names: done, or failed (fetch, sha256, "
            "load or warm-up; the old model kept serving).",
            ("model_name", "variant", "outcome"),
            registry=reg,
        )
        self._wait_family = Histogram(
            WAIT_METRIC,
            "Time a request's rows waited in the adaptive batcher's queue before their ONNX "
            "Runtime call (requests shed after serving.max_latency_ms are not in it).",
            names,
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )

        # Labelled without the version: the load is the worker's, whichever model it serves.
        def load_gauge(name: str, documentation: str) -> Any:
            return Gauge(
                name,
                documentation,
                ("model_name", "variant"),
                registry=reg,
                multiprocess_mode="livesum",
            ).labels(model_name, variant)

        self._queued_rows = load_gauge(
            QUEUED_ROWS_METRIC,
            "Rows in the adaptive batcher's queue, waiting or being scored (all workers).",
        )
        self._in_flight = load_gauge(
            IN_FLIGHT_METRIC, "Prediction requests admitted and not yet scored (all workers)."
        )
        self._max_in_flight = load_gauge(
            MAX_IN_FLIGHT_METRIC,
            "Requests the workers admit at once before shedding with 503: serving.max_in_flight "
            "per worker, summed over the workers.",
        )
        self._load: Callable[[], tuple[int, int]] | None = None
        self._shadow_rows = Counter(
            SHADOW_ROWS_METRIC,
            "Rows of answered requests given to the shadow version: scored, dropped (its "
            "queue was full) or failed.",
            ("model_name", "variant", "shadow_version", "outcome"),
            registry=reg,
        )
        self._shadow: Callable[[], Any] | None = None
        # The scorer last read and its counts then: counters take the growth since.
        self._shadow_last: tuple[Any, dict[str, int]] = (None, {})
        self._families = (latency, rows, batch, scores, log_rows, info, fallback)
        self._seconds_families = (cpu_seconds, gpu_seconds)
        self._gpus = float(gpus)
        self._cpu_clock = cpu_clock
        self._wall_clock = wall_clock
        self._cpu_mark = cpu_clock()
        self._wall_mark = wall_clock()
        self._status_counts: dict[int, int] = {}
        self._flush_lock = threading.Lock()
        # The circuit breakers of this worker's outbound calls (services/breakers.py): the
        # registry's guards the model fetch at start-up and the alias poll.
        self._breaker_state = Gauge(
            BREAKER_STATE_METRIC,
            "Circuit breaker of an outbound dependency: 0 closed, 1 half-open, 2 open "
            "(the worst of the workers).",
            ("dependency",),
            registry=reg,
            multiprocess_mode="max",
        )
        self._breaker_failures = Counter(
            "mlgate_circuit_breaker_failures",
            "Failed calls of a dependency counted by its breaker (a retried call is one).",
            ("dependency",),
            registry=reg,
        )
        self._breaker_opens = Counter(
            "mlgate_circuit_breaker_opens",
            "Times a dependency's circuit breaker opened.",
            ("dependency",),
            registry=reg,
        )
        self._breaker_marks: dict[str, tuple[int, int]] = {}
        self._flush_breakers()
        self._bind(sha256, provider, graph, from_last_known_good)
        for outcome in ("done", "failed"):
            self._swaps.labels(model_name, variant, outcome)

    def _bind(self, sha256: str, provider: str, graph: str, from_last_known_good: bool) -> None:
        """Point every series at `self._labels` (the served model's version)."""
        latency, rows, batch, scores, log_rows, info, fallback = self._families
        info.labels(*self._labels, sha256, provider, graph).set(1)
        self._info_labels = (*self._labels, sha256, provider, graph)
        fallback.labels(*self._labels).set(1 if from_last_known_good else 0)
        self._cpu_seconds, self._gpu_seconds = (
            family.labels(*self._labels) for family in self._seconds_families
        )
        self._latency = _LocalHistogram(latency.labels(*self._labels), LATENCY_BUCKETS_S)
        self._rows = _LocalHistogram(rows.labels(*self._labels), ROW_BUCKETS)
        self._batch = _LocalHistogram(batch.labels(*self._labels), ROW_BUCKETS)
        self._scores = _LocalHistogram(scores.labels(*self._labels), SCORE_BUCKETS)
        self._wait = _LocalHistogram(self._wait_family.labels(*self._labels), LATENCY_BUCKETS_S)
        self._log_written = log_rows.labels(*self._labels, "written")
        self._log_dropped = log_rows.labels(*self._labels, "dropped")
        self._status_children: dict[int, Any] = {}
        # Every status the endpoint answers is exported from the start, at zero.
        for status in (200, 400, 401, 403, 413, 422, 429, 500, 503):
            self._status_child(status)

    def switch_model(
        self,
        model_version: str,
        provider: str,
        sha256: str,
        *,
        from_last_known_good: bool = False,
        graph: str = "cpu",
    ) -> None:
        """From now on, count under `model_version` (the service swapped to the version its
        alias names); what was counted before stays with the old version, whose info and
        last-known-good gauges drop to 0. Called from the event loop, like `observe_*`;
        requests still in flight on the old model at the swap are counted under the new."""
        info, fallback = self._families[-2:]
        with self._flush_lock:
            self._flush_locked()
            info.labels(*self._info_labels).set(0)
            fallback.labels(*self._labels).set(0)
            self._labels = (self._labels[0], model_version, self._labels[2])
            self._bind(sha256, provider, graph, from_last_known_good)

    def count_swap(self, done: bool) -> None:
        """A swap to the alias's version done, or failed; from the watch's thread."""
        self._swaps.labels(self._labels[0], self._labels[2], "done" if done else "failed").inc()

    def _status_child(self, status: int) -> Any:
        child = self._status_children.get(status)
        if child is None:
            child = self._requests.labels(*self._labels, str(status))
            self._status_children[status] = child
        return child

    def observe_request(self, status: int, latency_s: float, rows: int) -> None:
        counts = self._status_counts
        counts[status] = counts.get(status, 0) + 1
        self._latency.observe(latency_s)
        if rows:
            self._rows.observe(rows)

    def observe_batch(self, rows: int) -> None:
        self._batch.observe(rows)

    def observe_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def watch_load(self, load: Callable[[], tuple[int, int]], max_in_flight: int) -> None:
        """Read `load()` (rows queued in the batcher, requests in flight) at every flush;
        `max_in_flight` is this worker's admission bound. A swapped-in runtime replaces the
        old one's reader."""
        self._load = load
        self._max_in_flight.set(max_in_flight)

    def watch_shadow(self, scorer: Callable[[], Any]) -> None:
        """Read `scorer()` (the shadow scorer now, or None) at every flush: its rows scored,
        dropped and failed (`stats()`) grow `mlgate_shadow_rows_total` by what they grew
        since the last read; a new scorer counts from zero."""
        self._shadow = scorer

    def observe_scores(self, scores: np.ndarray) -> None:
        if len(scores) == 1:
            self._scores.observe(float(scores[0]))
        else:
            self._scores.observe_many(scores)

    def log_written(self, rows: int) -> None:
        self._log_written.inc(rows)

    def log_dropped(self, rows: int) -> None:
        self._log_dropped.inc(rows)

    def flush(self) -> None:
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        counts, self._status_counts = self._status_counts, {}
        for status, n in counts.items():
            self._status_child(status).inc(n)
        for histogram in (self._latency, self._rows, self._batch, self._scores, self._wait):
            histogram.flush()
        if self._load is not None:
            queued, in_flight = self._load()
            self._queued_rows.set(queued)
            self._in_flight.set(in_flight)
        if self._shadow is not None:
            self._flush_shadow(self._shadow())
        self._flush_seconds()
        self._flush_breakers()

    def _flush_shadow(self, scorer: Any) -> None:
        if scorer is None:
            return
        stats = scorer.stats()
        last_scorer, last = self._shadow_last
        if scorer is not last_scorer:
            last = {}
        now = {outcome: int(stats[f"{outcome}_rows"]) for outcome in SHADOW_OUTCOMES}
        for outcome, n in now.items():
            if n > last.get(outcome, 0):
                self._shadow_rows.labels(
                    self._labels[0], self._labels[2], str(stats["version"]), outcome
                ).inc(n - last.get(outcome, 0))
        self._shadow_last = (scorer, now)

    def _flush_breakers(self) -> None:
        from services import breakers

        for dependency, (state, failures, opens) in breakers.states().items():
            self._breaker_state.labels(dependency).set(state)
            seen_failures, seen_opens = self._breaker_marks.get(dependency, (0, 0))
            self._breaker_failures.labels(dependency).inc(max(0, failures - seen_failures))
            self._breaker_opens.labels(dependency).inc(max(0, opens - seen_opens))
            self._breaker_marks[dependency] = (failures, opens)

    def _flush_seconds(self) -> None:
        cpu, wall = self._cpu_clock(), self._wall_clock()
        cpu_spent, self._cpu_mark = cpu - self._cpu_mark, cpu
        wall_spent, self._wall_mark = wall - self._wall_mark, wall
        if cpu_spent > 0:
            self._cpu_seconds.inc(cpu_spent)
        if self._gpus > 0 and wall_spent > 0:
            self._gpu_seconds.inc(wall_spent * self._gpus)

    def render(self) -> tuple[bytes, str]:
        self.flush()
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self._registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
