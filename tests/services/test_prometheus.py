"""Prometheus for real: Debian's Prometheus with the generated rules scrapes a real service
after real traffic, its numbers equal the service's own counters, and every expression of
the Grafana dashboard runs on it (the ones with traffic behind them return series).

Prometheus scrapes every second here; the service's `/metrics` is read from loopback without
a proxy, as `serving.internal_endpoints: local` allows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checks.dashboard import dashboard_panels
from checks.slo_rules import build_slo_rules
from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS
from services.launcher import ServiceProcess, start_service
from services.metrics import LATENCY_BUCKETS_S
from services.prometheus import PrometheusProcess, render_prometheus_config, start_prometheus
from tests.services.conftest import AUTH, Registry, free_port

pytestmark = pytest.mark.integration

REQUESTS = 40


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    with start_service(
        registry.config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        env={"BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home"))},
    ) as proc:
        proc.wait_ready(timeout=300.0)
        yield proc


@pytest.fixture(scope="module")
def prometheus(
    registry: Registry, server: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusProcess]:
    home = tmp_path_factory.mktemp("prometheus")
    rules = home / "rules.yml"
    rules.write_text(
        build_slo_rules(
            registry.cfg.slo,
            registry.model_name,
            registry.cfg.serving.max_batch_size,
            LATENCY_BUCKETS_S,
        ).to_yaml()
    )
    config = home / "prometheus.yml"
    config.write_text(
        render_prometheus_config(
            {"service": f"127.0.0.1:{server.port}"}, [rules], scrape_interval_s=1.0
        )
    )
    with start_prometheus(config, home / "data", free_port()) as process:
        process.wait_ready()
        # A counter's rate needs a sample from before the traffic: wait for a first scrape.
        deadline = time.monotonic() + 30
        while not process.query('up{job="mlgate"} == 1') and time.monotonic() < deadline:
            time.sleep(0.3)
        yield process


def own_counts(server: ServiceProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mlgate_requests"
        for sample in family.samples
        if sample.name == "mlgate_requests_total"
    }


def send_traffic(registry: Registry, server: ServiceProcess) -> None:
    rows = registry.holdout[list(registry.cfg.dataset.features)].head(REQUESTS)
    records: list[dict[str, Any]] = [
        {k: (None if v != v else v) for k, v in r.items()} for r in rows.to_dict("records")
    ]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10.0) as client:
        for record in records:
            assert client.post("/predict", json={"rows": [record]}).status_code == 200
        for _ in range(3):
            assert client.post("/predict", json={"rows": [{"nope": 1}]}).status_code == 422


def test_prometheus_reads_what_the_service_counts_and_every_panel_runs(
    registry: Registry, server: ServiceProcess, prometheus: PrometheusProcess
) -> None:
    send_traffic(registry, server)
    expected = own_counts(server)
    assert expected["200"] >= REQUESTS and expected["422"] >= 3
    m = f'model_name="{registry.model_name}"'
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = {
            r["metric"]["status"]: float(r["value"][1])
            for r in prometheus.query(f"sum by (status) (mlgate_requests_total{{{m}}})")
        }
        if seen == expected:
            break
        time.sleep(0.5)
    assert seen == expected, (seen, expected)
    # Enough samples for a rate over the panels' window.
    time.sleep(3)

    empty = []
    for _, panels in dashboard_panels(registry.cfg):
        for panel in panels:
            for expr, _ in panel.exprs:
                result = prometheus.query(expr.replace("$__rate_interval", "2m"))
                if not result:
                    empty.append(panel.title)
    # Only panels of things that did not happen here may be empty: no 5xx (error share,
    # budget), no 503, nothing dropped... and nothing else.
    assert set(empty) <= {
        "Errors (share of answers that are 5xx)",
        "Load shed (503 with Retry-After)",
        "Availability error budget left (30d)",
    }, empty
    served = prometheus.query(f"mlgate_model_info{{{m}}}")
    assert {r["metric"]["model_version"] for r in served} == {registry.champion_version}
    p99 = prometheus.query(
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(mlgate_request_latency_seconds_bucket{{{m}}}[2m])))"
    )
    assert 0.0 < float(p99[0]["value"][1]) <= LATENCY_BUCKETS_S[-1]


def test_the_generated_rules_are_loaded_and_evaluated(
    registry: Registry, server: ServiceProcess, prometheus: PrometheusProcess
) -> None:
    if own_counts(server).get("200", 0) < REQUESTS:
        # Run without the test above (a filter, another xdist worker): its traffic too.
        send_traffic(registry, server)
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10.0).json()["data"]["groups"]
    names = [g["name"] for g in groups]
    # Prometheus lists a file's groups by name.
    assert names == [
        f"mlgate-{registry.model_name}-dependencies",
        f"mlgate-{registry.model_name}-leading-indicators",
        f"mlgate-{registry.model_name}-slo",
    ]
    health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    deadline = time.monotonic() + 30
    while "unknown" in health.values() and time.monotonic() < deadline:
        time.sleep(1)
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10.0).json()["data"]
        health = {r["name"]: r["health"] for g in groups["groups"] for r in g["rules"]}
    assert set(health.values()) == {"ok"}, health
    # The recorded ratios exist once traffic was scraped and the rules evaluated after it.
    deadline = time.monotonic() + 30
    ratio = prometheus.query("model_name:mlgate_requests_5xx:ratio_rate5m")
    while not ratio and time.monotonic() < deadline:
        time.sleep(1)
        ratio = prometheus.query("model_name:mlgate_requests_5xx:ratio_rate5m")
    assert ratio and float(ratio[0]["value"][1]) == 0.0


def test_a_bad_config_makes_prometheus_say_why(tmp_path: Path) -> None:
    from services.prometheus import PrometheusError

    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: nonsense}\n")
    process = start_prometheus(config, tmp_path / "data", free_port())
    with process, pytest.raises(PrometheusError, match="exited"):
        process.wait_ready(timeout=20)
