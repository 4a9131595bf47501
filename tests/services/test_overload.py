"""Overload, open-loop, against a real `bentoml serve`: above its measured capacity the
service sheds early (503 with Retry-After, each one counted in `/metrics`), and the requests
it accepts keep a bounded p99; at half its capacity it sheds nothing.

Bounded: about 3 s of capacity measurement and two loads of 3 s each, at most 3,000
requests per load. The shape is asserted, not timings: the bound on the accepted p99 is
generous and comes from the config (the batcher's deadline plus a margin for a loaded
2-core host); bench/overload.py measures the numbers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.overload import (
    closed_loop_rate,
    http_request,
    metric_sum,
    open_loop,
    predict_request,
    summarize,
)
from services.launcher import ServiceProcess
from tests.services.conftest import CLIENT_TOKEN, Registry, serving_with
from tests.services.test_service import request_rows

pytestmark = pytest.mark.integration

MAX_LATENCY_MS = 250
MAX_IN_FLIGHT = 16
ROWS = 100
SECONDS = 3.0
MAX_REQUESTS = 3000
# The margin over the batcher's deadline that a shared, loaded 2-core host may add.
MARGIN_S = 1.5


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("overload")
    with serving_with(
        registry, work, {"max_latency_ms": MAX_LATENCY_MS, "max_in_flight": MAX_IN_FLIGHT}
    ) as proc:
        yield proc


def test_above_capacity_sheds_with_retry_after_counted_and_accepted_p99_bounded(
    registry: Registry, server: ServiceProcess
) -> None:
    request = predict_request(server, request_rows(registry, ROWS), CLIENT_TOKEN)
    capacity = asyncio.run(
        closed_loop_rate(server.host, server.port, request, connections=8, seconds=SECONDS)
    )
    assert capacity > 0

    def load(factor: float) -> tuple[dict[str, Any], float]:
        before = metric_sum(server.url, "mlgate_requests_total", status="503")
        outcomes = asyncio.run(
            open_loop(
                server.host,
                server.port,
                request,
                rate=factor * capacity,
                seconds=SECONDS,
                max_requests=MAX_REQUESTS,
            )
        )
        time.sleep(1.5)  # the worker flushes its counters every second
        counted = metric_sum(server.url, "mlgate_requests_total", status="503") - before
        return summarize(outcomes), counted

    over, over_counted = load(2.5)
    assert over["no_answer"] == 0 and over["other_status"] == 0, over
    assert over["shed"] > 0, f"nothing shed at 2.5x of {capacity:.0f}/s: {over}"
    assert over["shed_with_retry_after"] == over["shed"]
    assert over_counted == over["shed"]
    assert over["accepted"] > 0
    bound_ms = (MAX_LATENCY_MS / 1000 + MARGIN_S) * 1000
    assert float(over["p99_ms"]) < bound_ms, over

    under, under_counted = load(0.5)
    assert under["no_answer"] == 0 and under["other_status"] == 0, under
    assert under_counted == under["shed"]
    # Half the capacity: (almost) nothing shed, on a host other tests may load too.
    assert int(under["shed"]) <= 0.02 * int(under["sent"]), under
    assert float(under["p99_ms"]) < bound_ms, under


def test_load_generator_is_open_loop() -> None:
    """The schedule does not wait for answers: against a server that never answers, every
    request is still sent on time (they all time out together)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        port = listener.getsockname()[1]
        started = time.monotonic()
        outcomes = asyncio.run(
            open_loop(
                "127.0.0.1",
                port,
                http_request("127.0.0.1", port, "/", b"", {}),
                rate=200.0,
                seconds=0.5,
                max_requests=100,
                timeout_s=1.0,
            )
        )
        took = time.monotonic() - started
    assert len(outcomes) == 100
    assert all(o.status == 0 and o.error == "TimeoutError" for o in outcomes)
    # A closed loop of one connection would take 100 timeouts (100 s); this one sends all
    # on its 0.5 s schedule and they time out together.
    assert took < 4.0
    # Latency counts from each request's scheduled start, so none is below the timeout.
    assert min(o.latency_s for o in outcomes) >= 1.0
