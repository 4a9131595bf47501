"""The leading indicators on a real `bentoml serve` under load: `/metrics`, scraped while
clients keep requests coming, shows rows in the batcher's queue and requests in flight, the
admission bound beside them, and one queue wait per scored request; idle, both gauges are
back at 0.

Bounded: 16 back-to-back clients of 100-row requests for 3 s (100 rows go to the scoring
thread, so the event loop answers a scrape while ONNX Runtime computes), scraped as fast as
the service answers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from bench.overload import closed_loop_rate, metric_sum, predict_request
from services.launcher import ServiceProcess
from tests.services.conftest import CLIENT_TOKEN, Registry, serving_with
from tests.services.test_service import request_rows

pytestmark = pytest.mark.integration

MAX_IN_FLIGHT = 32
CONNECTIONS = 16
ROWS = 100
SECONDS = 3.0


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("leading")
    # Above the clients' number: nothing is shed, every request is scored.
    with serving_with(registry, work, {"max_in_flight": MAX_IN_FLIGHT, "workers": 1}) as proc:
        yield proc


def test_under_load_the_queue_and_in_flight_are_seen_and_idle_they_are_zero(
    registry: Registry, server: ServiceProcess
) -> None:
    request = predict_request(server, request_rows(registry, ROWS), CLIENT_TOKEN)
    url = server.url
    assert metric_sum(url, "mlgate_max_in_flight") == MAX_IN_FLIGHT
    scored_before = metric_sum(url, "mlgate_requests_total", status="200")
    waits_before = metric_sum(url, "mlgate_batcher_wait_seconds_count")

    seen: list[tuple[float, float]] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            seen.append(
                (
                    metric_sum(url, "mlgate_batcher_queued_rows"),
                    metric_sum(url, "mlgate_in_flight_requests"),
                )
            )

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        rate = asyncio.run(
            closed_loop_rate(
                server.host, server.port, request, connections=CONNECTIONS, seconds=SECONDS
            )
        )
    finally:
        stop.set()
        scraper.join(30)
    assert rate > 0 and seen
    queued = [q for q, _ in seen]
    in_flight = [f for _, f in seen]
    assert max(queued) > 0, f"no queued rows in {len(seen)} scrapes under load"
    assert max(in_flight) > 0, f"no request in flight in {len(seen)} scrapes under load"
    # Whole requests of 100 rows, never more than the clients keep open.
    assert all(q % ROWS == 0 and q <= CONNECTIONS * ROWS for q in queued), sorted(set(queued))
    assert max(in_flight) <= CONNECTIONS

    time.sleep(0.5)  # the clients' last answers are out
    assert metric_sum(url, "mlgate_batcher_queued_rows") == 0
    assert metric_sum(url, "mlgate_in_flight_requests") == 0
    # Every scored request waited in the queue once, and was counted once.
    scored = metric_sum(url, "mlgate_requests_total", status="200") - scored_before
    assert scored > 0
    assert metric_sum(url, "mlgate_batcher_wait_seconds_count") - waits_before == scored
