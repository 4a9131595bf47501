"""Our metrics, counted locally and flushed, read exactly as prometheus-client's own
`observe` would have written them."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import SCORE_BUCKETS, ServiceMetrics

pytestmark = pytest.mark.fast


def samples(text: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name.startswith(name):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k == "le"))
                out[(("name", s.name), *labels)] = s.value
    return out


def test_flushed_histograms_equal_prometheus_observe() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(500)
    scores[:3] = [0.0, 0.05, 1.0]  # on bucket bounds
    metrics = ServiceMetrics("churn", "3", "canary", "CPUExecutionProvider", "ab" * 32)
    metrics.observe_scores(scores[:1])
    metrics.observe_scores(scores[1:])
    text, _ = metrics.render()

    registry = CollectorRegistry()
    reference = Histogram("mlgate_score", "x", buckets=SCORE_BUCKETS, registry=registry)
    for s in scores:
        reference.observe(s)
    got = samples(text, "mlgate_score")
    want = samples(generate_latest(registry), "mlgate_score")
    assert {k: v for k, v in got.items() if "created" not in k[0][1]} == pytest.approx(
        {k: v for k, v in want.items() if "created" not in k[0][1]}
    )


def value(text: str, sample: str, **labels: str) -> float:
    want = {"model_name": "churn", "model_version": "3", "variant": "stable", **labels}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == want:
                return float(s.value)
    raise AssertionError(f"no sample {sample}{want}")


def test_requests_by_status_latency_batches_and_log_counters() -> None:
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "ab" * 32)
    for status in (200, 200, 422, 401):
        metrics.observe_request(status, 0.003, 1 if status == 200 else 0)
    metrics.observe_batch(2)
    metrics.log_written(2)
    metrics.log_dropped(1)
    text = metrics.render()[0].decode()
    assert value(text, "mlgate_requests_total", status="200") == 2
    assert value(text, "mlgate_requests_total", status="422") == 1
    assert value(text, "mlgate_requests_total", status="503") == 0
    assert value(text, "mlgate_request_latency_seconds_bucket", le="0.005") == 4
    assert value(text, "mlgate_request_latency_seconds_bucket", le="0.002") == 0
    assert value(text, "mlgate_request_rows_count") == 2
    assert value(text, "mlgate_batch_rows_bucket", le="2.0") == 1
    assert value(text, "mlgate_inference_log_rows_total", outcome="dropped") == 1
    assert value(text, "mlgate_inference_log_rows_total", outcome="written") == 2
    assert "mlgate_model_info{" in text and 'provider="CPUExecutionProvider"' in text
    # Counted once: a second render adds nothing.
    assert value(metrics.render()[0].decode(), "mlgate_requests_total", status="200") == 2


def test_invalid_scores_land_where_the_canary_counts_them() -> None:
    """NaN, negative and above-1 scores, one at a time and in a batch, reach the buckets
    the canary guardrail reads as invalid outputs; valid ones (0 and 1 included) do not."""
    from checks.canary import invalid_scores
    from services.canary_windows import parse_metrics

    metrics = ServiceMetrics("churn", "3", "canary", "CPUExecutionProvider", "ab" * 32)
    metrics.observe_scores(np.array([0.0, 0.5, 1.0]))
    valid = parse_metrics(metrics.render()[0].decode()).scores
    assert valid is not None and valid.count == 3 and invalid_scores(valid) == 0

    metrics.observe_scores(np.array([np.nan, -0.2, 1.5, 0.3]))
    metrics.observe_scores(np.array([np.nan]))
    scores = parse_metrics(metrics.render()[0].decode()).scores
    assert scores is not None and scores.count == 8
    # 1.5 and the batched NaN in the +Inf bucket, -0.2 and the single NaN in the one below
    # 0. (With a negative bucket prometheus-client exports no `_sum`, so the NaN sum is not
    # there to count.)
    assert invalid_scores(scores) == 4


def test_cpu_and_gpu_seconds_are_added_at_each_flush() -> None:
    """CPU seconds from the worker's clock since the last flush; GPU seconds as wall seconds
    times the GPUs held, exported at zero without GPUs so every instance has both series."""
    cpu, wall = iter([10.0, 10.25, 10.75]), iter([100.0, 101.0, 103.0])
    metrics = ServiceMetrics(
        "churn",
        "3",
        "stable",
        "CUDAExecutionProvider",
        "ab" * 32,
        gpus=0.5,
        cpu_clock=lambda: next(cpu),
        wall_clock=lambda: next(wall),
    )
    metrics.flush()
    text = metrics.render()[0].decode()
    assert value(text, "mlgate_cpu_seconds_total") == pytest.approx(0.75)
    assert value(text, "mlgate_gpu_seconds_total") == pytest.approx(1.5)

    plain = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "ab" * 32)
    text = plain.render()[0].decode()
    assert value(text, "mlgate_gpu_seconds_total") == 0
    assert value(text, "mlgate_cpu_seconds_total") >= 0


def test_queued_rows_and_in_flight_are_read_at_each_flush_and_waits_counted() -> None:
    """Zero until a runtime is watched; then the values `load()` gives at the flush before
    the scrape, and the bound. The queue wait is a histogram of the latency buckets."""
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "ab" * 32)
    load = {"queued": 0, "in_flight": 0}

    def gauge(text: str, name: str) -> float:
        labels = {"model_name": "churn", "variant": "stable"}
        return next(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and s.labels == labels
        )

    text = metrics.render()[0].decode()
    assert gauge(text, "mlgate_batcher_queued_rows") == 0
    assert gauge(text, "mlgate_max_in_flight") == 0
    metrics.watch_load(lambda: (load["queued"], load["in_flight"]), 64)
    load.update(queued=300, in_flight=7)
    metrics.observe_wait(0.004)
    metrics.observe_wait(0.3)
    text = metrics.render()[0].decode()
    assert gauge(text, "mlgate_batcher_queued_rows") == 300
    assert gauge(text, "mlgate_in_flight_requests") == 7
    assert gauge(text, "mlgate_max_in_flight") == 64
    assert value(text, "mlgate_batcher_wait_seconds_bucket", le="0.005") == 1
    assert value(text, "mlgate_batcher_wait_seconds_bucket", le="0.5") == 2
    load.update(queued=0, in_flight=0)
    text = metrics.render()[0].decode()
    assert gauge(text, "mlgate_batcher_queued_rows") == 0
    assert gauge(text, "mlgate_in_flight_requests") == 0


def _worker(directory: str, queued: int, in_flight: int, ready: Any, stop: Any) -> None:
    # prometheus-client picks its multiprocess values when imported: the variable comes
    # with the environment the process was spawned with.
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "ab" * 32)
    metrics.watch_load(lambda: (queued, in_flight), 16)
    metrics.flush()
    ready.set()
    stop.wait(60)


def test_two_workers_sum_their_queues_in_flight_and_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under `bentoml serve` with two workers: each process writes its own values to
    PROMETHEUS_MULTIPROC_DIR and `/metrics` sums them (`livesum`), the bound too, so that
    in-flight over bound stays a share of the instance's admission capacity."""
    from prometheus_client import multiprocess

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    readies = [context.Event(), context.Event()]
    workers = [
        context.Process(target=_worker, args=(str(tmp_path), q, f, r, stop))
        for (q, f), r in zip(((40, 3), (10, 2)), readies, strict=True)
    ]
    for w in workers:
        w.start()
    try:
        assert all(r.wait(60) for r in readies)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        text = generate_latest(registry).decode()
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    sums = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in ("mlgate_batcher_queued_rows", "mlgate_in_flight_requests")
        or s.name == "mlgate_max_in_flight"
    }
    assert sums == {
        "mlgate_batcher_queued_rows": 50,
        "mlgate_in_flight_requests": 5,
        "mlgate_max_in_flight": 32,
    }


class _Shadow:
    def __init__(self, version: str) -> None:
        self.version, self.scored, self.dropped = version, 0, 0

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "scored_rows": self.scored,
            "dropped_rows": self.dropped,
            "failed_rows": 0,
        }


def test_shadow_rows_grow_by_what_the_scorer_counted_and_a_new_scorer_counts_from_zero() -> None:
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "ab" * 32)
    current: dict[str, _Shadow | None] = {"scorer": None}
    metrics.watch_shadow(lambda: current["scorer"])

    def rows() -> dict[tuple[str, str], float]:
        return {
            (s.labels["shadow_version"], s.labels["outcome"]): s.value
            for f in text_string_to_metric_families(metrics.render()[0].decode())
            for s in f.samples
            if s.name == "mlgate_shadow_rows_total"
        }

    assert rows() == {}
    first = _Shadow("4")
    current["scorer"] = first
    first.scored, first.dropped = 10, 2
    assert rows() == {("4", "scored"): 10.0, ("4", "dropped"): 2.0}
    first.scored = 15
    assert rows() == {("4", "scored"): 15.0, ("4", "dropped"): 2.0}
    second = _Shadow("5")  # the watch swapped in another version: its counts start at 0
    second.scored = 3
    current["scorer"] = second
    assert rows() == {("4", "scored"): 15.0, ("4", "dropped"): 2.0, ("5", "scored"): 3.0}
    current["scorer"] = None  # shadowing stopped: the totals stay
    assert rows()[("5", "scored")] == 3.0
