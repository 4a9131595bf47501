"""Reading the canary's two sides: HAProxy's per-server counters and each instance's
`/metrics`, snapshot by snapshot, turned into the windows the guardrails judge.

A `Snapshot` is one read of both (HAProxy's cumulative counters, each instance's latency
and score histograms and its CPU and GPU seconds); `window_between` is what one side did
between two snapshots, as a `checks.canary.VariantWindow`, or a window whose `problem` says
why its numbers cannot be trusted (unreadable, an instance or HAProxy that restarted,
another version served).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tenacity
from prometheus_client.parser import text_string_to_metric_families

from checks.canary import Histogram, VariantWindow
from services import haproxy
from services.canary_state import InstanceRecord
from services.haproxy import ServerStats
from services.metrics import (
    CPU_SECONDS_METRIC,
    GPU_SECONDS_METRIC,
    LATENCY_METRIC,
    SCORE_METRIC,
)

_SCRAPE_RETRY_MAX_S = 0.5


@dataclass(frozen=True)
class InstanceMetrics:
    versions: frozenset[str]
    latency: Histogram | None
    scores: Histogram | None
    # None: the instance exports no such counter (one started before they existed).
    cpu_seconds: float | None = None
    gpu_seconds: float | None = None


def parse_metrics(text: str) -> InstanceMetrics:
    """The latency and score histograms and the CPU and GPU seconds of an instance's
    `/metrics`, summed over label sets (one per model version and variant), and the model
    versions they name."""
    buckets: dict[str, dict[float, float]] = {LATENCY_METRIC: {}, SCORE_METRIC: {}}
    sums: dict[str, float] = {LATENCY_METRIC: 0.0, SCORE_METRIC: 0.0}
    counters: dict[str, float] = {}
    seen: set[str] = set()
    versions: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.name in (CPU_SECONDS_METRIC, GPU_SECONDS_METRIC):
            total = [s.value for s in family.samples if s.name == f"{family.name}_total"]
            counters[family.name] = float(sum(total))
            continue
        if family.name not in buckets:
            continue
        seen.add(family.name)
        for sample in family.samples:
            if "model_version" in sample.labels:
                versions.add(sample.labels["model_version"])
            if sample.name == f"{family.name}_bucket":
                le = float(sample.labels["le"])
                buckets[family.name][le] = buckets[family.name].get(le, 0.0) + sample.value
            elif sample.name == f"{family.name}_sum":
                sums[family.name] += sample.value

    def histogram(name: str) -> Histogram | None:
        if name not in seen or not buckets[name]:
            return None
        return Histogram.from_cumulative(sorted(buckets[name].items()), sums[name])

    return InstanceMetrics(
        frozenset(versions),
        histogram(LATENCY_METRIC),
        histogram(SCORE_METRIC),
        counters.get(CPU_SECONDS_METRIC),
        counters.get(GPU_SECONDS_METRIC),
    )


def read_metrics(url: str, timeout: float) -> InstanceMetrics | str:
    """The instance's metrics, or why they could not be read. A scrape is a read: one that
    could not connect or timed out is tried once more after a jittered pause (full jitter,
    at most `_SCRAPE_RETRY_MAX_S`), so that a single dropped connection does not cost the
    canary a window. No circuit breaker: each instance is its own dependency and an
    unreadable one is already a reason the controller reports every tick."""
    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(httpx.TransportError),
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=_SCRAPE_RETRY_MAX_S),
            stop=tenacity.stop_after_attempt(2),
            reraise=True,
        ):
            with attempt:
                response = httpx.get(f"{url}/metrics", timeout=timeout)
    except httpx.HTTPError as err:
        return f"/metrics unreachable at {url}: {type(err).__name__}: {err}"
    if response.status_code != 200:
        return f"/metrics at {url} answered {response.status_code}"
    try:
        parsed = parse_metrics(response.text)
    except Exception as err:
        return f"/metrics at {url} unparsable: {type(err).__name__}: {err}"
    missing = [
        n for n, h in ((LATENCY_METRIC, parsed.latency), (SCORE_METRIC, parsed.scores)) if h is None
    ]
    if missing:
        return f"/metrics at {url} lacks {', '.join(missing)}"
    return parsed


@dataclass(frozen=True)
class Snapshot:
    at: float
    servers: dict[str, ServerStats] | None
    haproxy_problem: str | None
    metrics: dict[str, InstanceMetrics | str]


def take_snapshot(
    socket_path: Path, instances: Mapping[str, InstanceRecord | None], timeout: float
) -> Snapshot:
    at = time.monotonic()
    servers: dict[str, ServerStats] | None = None
    problem = None
    try:
        servers = haproxy.server_stats(socket_path)
    except haproxy.HAProxyError as err:
        problem = f"HAProxy statistics unreadable: {err}"
    metrics: dict[str, InstanceMetrics | str] = {}
    for variant, record in instances.items():
        metrics[variant] = read_metrics(record.url, timeout) if record else f"no {variant} instance"
    return Snapshot(at, servers, problem, metrics)


def window_between(
    before: Snapshot, after: Snapshot, variant: str, version: str | None, weight: int
) -> VariantWindow:
    """What `variant` did between two snapshots, or a window whose `problem` says why its
    numbers cannot be trusted."""
    seconds = after.at - before.at

    def broken(problem: str) -> VariantWindow:
        return VariantWindow(variant, version, seconds, problem=problem)

    if before.servers is None or after.servers is None:
        return broken(before.haproxy_problem or after.haproxy_problem or "no HAProxy stats")
    m0, m1 = before.metrics.get(variant), after.metrics.get(variant)
    if isinstance(m0, str) or m0 is None:
        return broken(m0 or "no metrics at the window's start")
    if isinstance(m1, str) or m1 is None:
        return broken(m1 or "no metrics at the window's end")
    if version is not None and m1.versions and m1.versions != {version}:
        return broken(f"serves version(s) {sorted(m1.versions)}, expected {version}")
    s0, s1 = before.servers[variant], after.servers[variant]
    if weight > 0 and s1.status.startswith(("DOWN", "MAINT", "NOLB")):
        return broken(f"HAProxy reports the server {s1.status}")
    counts = haproxy.counts_between(s0, s1)
    if any(v < 0 for v in counts.values()):
        return broken("HAProxy counters went down (HAProxy restarted during the window)")
    assert m0.latency and m1.latency and m0.scores and m1.scores
    try:
        latency = m1.latency.minus(m0.latency)
        scores = m1.scores.minus(m0.scores)
    except ValueError as err:
        return broken(f"instance metrics: {err} (the instance restarted during the window)")
    cpu = _increase(m0.cpu_seconds, m1.cpu_seconds)
    gpu = _increase(m0.gpu_seconds, m1.gpu_seconds)
    if (cpu is not None and cpu < 0) or (gpu is not None and gpu < 0):
        return broken("instance metrics: CPU or GPU seconds went down (the instance restarted)")
    return VariantWindow(
        variant=variant,
        version=version,
        seconds=seconds,
        requests=counts["responses"] + counts["connection_errors"],
        server_errors=counts["5xx"],
        client_errors=counts["4xx"],
        connection_errors=counts["connection_errors"],
        response_errors=counts["response_errors"],
        latency=latency,
        scores=scores,
        cpu_seconds=cpu,
        gpu_seconds=gpu,
    )


def _increase(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def haproxy_counts(before: Snapshot, after: Snapshot) -> dict[str, dict[str, int]]:
    """What each server did between two snapshots, as HAProxy counted it (the evidence kept
    with a step); empty when either snapshot has no HAProxy statistics."""
    out: dict[str, dict[str, int]] = {}
    if before.servers is None or after.servers is None:
        return out
    for name in haproxy.SERVERS:
        out[name] = haproxy.counts_between(before.servers[name], after.servers[name])
    return out


def live_servers(socket_path: Path) -> dict[str, dict[str, Any]]:
    """HAProxy's view of each server now (status, weight, cumulative counters), or nothing
    when HAProxy does not answer."""
    live: dict[str, dict[str, Any]] = {}
    try:
        stats = haproxy.server_stats(socket_path)
    except haproxy.HAProxyError:
        return live
    for name, s in stats.items():
        live[name] = {
            "status": s.status,
            "weight": s.weight,
            "responses": s.responses_total,
            "5xx": s.server_errors,
            "connection_errors": s.connection_errors,
        }
    return live
