"""Reading the canary's two sides without a target: the service's own `/metrics` text
parsed, and windows between hand-made snapshots, including every reason a window cannot
be trusted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from services.canary_windows import (
    InstanceMetrics,
    Snapshot,
    haproxy_counts,
    parse_metrics,
    window_between,
)
from services.haproxy import ServerStats
from services.metrics import ServiceMetrics

pytestmark = pytest.mark.fast


def test_metrics_parser_reads_what_the_service_exports() -> None:
    metrics = ServiceMetrics("churn", "7", "canary", "CPUExecutionProvider", "0" * 64)
    metrics.observe_request(200, 0.0031, 1)
    metrics.observe_request(500, 0.2, 0)
    metrics.observe_scores(np.array([0.1, 0.42, 0.97]))
    text, _ = metrics.render()
    parsed = parse_metrics(text.decode())
    assert parsed.versions == {"7"}
    assert parsed.latency is not None and parsed.latency.count == 2
    assert parsed.latency.quantile(0.5) <= 0.005
    assert parsed.scores is not None and parsed.scores.count == 3
    # Valid scores only: nothing below 0 (the first bucket) or above 1 (+Inf).
    assert parsed.scores.counts[0] == 0 and parsed.scores.counts[-1] == 0
    assert sum(parsed.scores.counts[1:-1]) == 3


def server(name: str, ok: int, errors: int = 0, status: str = "UP") -> ServerStats:
    return ServerStats(
        name=name,
        status=status,
        weight=50,
        current_sessions=0,
        responses={"1xx": 0, "2xx": ok, "3xx": 0, "4xx": 0, "5xx": errors, "other": 0},
        connection_errors=0,
        response_errors=0,
        selected=ok + errors,
    )


def clock(start: float, then: float) -> Callable[[], float]:
    """A clock that reads `start` when the metrics are built and `then` at every flush."""
    readings = iter([start])
    return lambda: next(readings, then)


def instance(
    version: str, requests: int, scores: list[float], cpu: float = 0.0, gpu_wall: float = 0.0
) -> InstanceMetrics:
    """An instance's parsed `/metrics`, its clocks fixed: `cpu` CPU seconds spent and, on
    one GPU, `gpu_wall` wall seconds since it started."""
    metrics = ServiceMetrics(
        "churn",
        version,
        "x",
        "CPUExecutionProvider",
        "0" * 64,
        gpus=1 if gpu_wall else 0,
        cpu_clock=clock(0.0, cpu),
        wall_clock=clock(0.0, gpu_wall),
    )
    for _ in range(requests):
        metrics.observe_request(200, 0.002, 1)
    if scores:
        metrics.observe_scores(np.array(scores))
    return parse_metrics(metrics.render()[0].decode())


def snapshot(
    at: float, stable: ServerStats, canary: ServerStats, metrics: dict[str, InstanceMetrics | str]
) -> Snapshot:
    return Snapshot(at, {"stable": stable, "canary": canary}, None, metrics)


def test_a_window_is_what_both_counters_did_in_between() -> None:
    before = snapshot(
        1.0,
        server("stable", 10),
        server("canary", 2),
        {"canary": instance("2", 2, [0.5, 0.5])},
    )
    after = snapshot(
        4.5,
        server("stable", 30),
        server("canary", 9, errors=1),
        {"canary": instance("2", 10, [0.5] * 2 + [0.1] * 8)},
    )
    window = window_between(before, after, "canary", "2", weight=25)
    assert window.problem is None
    assert window.seconds == 3.5
    assert (window.requests, window.server_errors) == (8, 1)
    assert window.latency is not None and window.latency.count == 8
    assert window.scores is not None and window.scores.count == 8
    counts = haproxy_counts(before, after)
    assert counts["stable"]["responses"] == 20 and counts["canary"]["5xx"] == 1


def test_a_window_that_cannot_be_trusted_says_why() -> None:
    good = {"canary": instance("2", 1, [0.5])}
    before = snapshot(0.0, server("stable", 5), server("canary", 5), good)

    def problem(after: Snapshot, version: str = "2", weight: int = 5) -> str | None:
        return window_between(before, after, "canary", version, weight).problem

    stable, canary = server("stable", 9), server("canary", 9)
    assert "unreachable" in str(
        problem(snapshot(1.0, stable, canary, {"canary": "/metrics unreachable"}))
    )
    assert "expected 3" in str(problem(snapshot(1.0, stable, canary, good), version="3"))
    down = server("canary", 9, status="DOWN")
    assert "DOWN" in str(problem(snapshot(1.0, stable, down, good)))
    # HAProxy restarted: its counters start again from 0.
    assert "went down" in str(problem(snapshot(1.0, stable, server("canary", 1), good)))
    # The instance restarted: its histograms start again from 0.
    fresh = {"canary": instance("2", 0, [])}
    assert "restarted" in str(problem(snapshot(1.0, stable, canary, fresh)))
    no_stats = Snapshot(1.0, None, "HAProxy statistics unreadable: refused", good)
    assert problem(no_stats) == "HAProxy statistics unreadable: refused"
    assert haproxy_counts(before, no_stats) == {}


def test_a_window_carries_the_cpu_and_gpu_seconds_spent_in_between() -> None:
    before = snapshot(
        0.0,
        server("stable", 0),
        server("canary", 0),
        {"canary": instance("2", 1, [0.5], cpu=1.5, gpu_wall=10.0)},
    )
    after = snapshot(
        10.0,
        server("stable", 0),
        server("canary", 4),
        {"canary": instance("2", 4, [0.5] * 4, cpu=2.0, gpu_wall=20.0)},
    )
    window = window_between(before, after, "canary", "2", weight=5)
    assert window.problem is None
    assert window.cpu_seconds == pytest.approx(0.5)
    assert window.gpu_seconds == pytest.approx(10.0)
    assert window.rows == 3
    # Went down: the instance restarted during the window, its counters with it.
    back = snapshot(
        20.0,
        server("stable", 0),
        server("canary", 5),
        {"canary": instance("2", 5, [0.5] * 5, cpu=1.0, gpu_wall=20.0)},
    )
    assert "restarted" in str(window_between(after, back, "canary", "2", weight=5).problem)


def test_an_instance_without_the_cost_counters_still_gives_a_window() -> None:
    """A stable started before the counters existed: its window has no seconds (the cost
    guardrail, when judged, fails on that; the others are unaffected)."""
    older = InstanceMetrics(frozenset({"1"}), instance("1", 1, [0.5]).latency, None)
    assert older.cpu_seconds is None and older.gpu_seconds is None
    text = ServiceMetrics("churn", "1", "stable", "CPUExecutionProvider", "0" * 64).render()[0]
    lines = [
        line
        for line in text.decode().splitlines()
        if "mlgate_cpu_seconds" not in line and "mlgate_gpu_seconds" not in line
    ]
    parsed = parse_metrics("\n".join(lines) + "\n")
    assert parsed.cpu_seconds is None and parsed.gpu_seconds is None
    assert parsed.latency is not None
