"""The Grafana dashboard's JSON model, without Grafana: the structure Grafana requires of an
imported dashboard, one row per plane, and expressions that read only exported or recorded
series. tests/services/test_prometheus.py runs every expression on a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from checks.dashboard import build_dashboard, dashboard_panels
from flows.cli import app
from models.config import load_config
from tests.conftest import BUNDLED_CONFIG, write_config

pytestmark = pytest.mark.fast

EXPORTED = {
    "mlgate_requests_total",
    "mlgate_request_latency_seconds_bucket",
    "mlgate_request_rows_sum",
    "mlgate_request_rows_count",
    "mlgate_batch_rows_sum",
    "mlgate_batch_rows_count",
    "mlgate_score_bucket",
    "mlgate_score_sum",
    "mlgate_score_count",
    "mlgate_inference_log_rows_total",
    "mlgate_model_info",
    "mlgate_model_from_last_known_good",
    "mlgate_cpu_seconds_total",
    "mlgate_gpu_seconds_total",
    "mlgate_batcher_queued_rows",
    "mlgate_batcher_wait_seconds_bucket",
    "mlgate_in_flight_requests",
    "mlgate_max_in_flight",
}


def test_the_json_model_has_what_grafana_requires() -> None:
    board = build_dashboard(load_config(BUNDLED_CONFIG))
    json.dumps(board)  # plain JSON
    assert {"title", "uid", "schemaVersion", "panels", "templating", "time"} <= set(board)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    [variable] = board["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} == set(grid) and grid["x"] + grid["w"] <= 24
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in panel["targets"])


def test_one_row_per_plane_in_order() -> None:
    board = build_dashboard(load_config(BUNDLED_CONFIG))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Users", "Capacity", "Model", "Money"]


def test_every_series_read_is_exported_and_the_model_is_the_configs(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, registry={"model_name": "loans"}))
    exprs = [e for _, panels in dashboard_panels(cfg) for p in panels for e, _ in p.exprs]
    read = {m for e in exprs for m in re.findall(r"(?<![\w:])(mlgate_\w+)(?=[{\[\s])", e)}
    assert read <= EXPORTED, read - EXPORTED
    assert all('model_name="loans"' in e for e in exprs if "mlgate_" in e)
    # The objectives of slo: are drawn beside the latency quantiles.
    latency = next(p for _, ps in dashboard_panels(cfg) for p in ps if "Latency" in p.title)
    assert ("vector(0.2)", "p99 objective") in latency.exprs


def test_the_capacity_row_shows_the_queue_wait_and_in_flight_against_their_bounds() -> None:
    cfg = load_config(BUNDLED_CONFIG)
    capacity = dict(dashboard_panels(cfg))["Capacity"]
    titles = [p.title for p in capacity]
    assert {"Batcher queue (rows waiting or being scored)", "Requests in flight"} <= set(titles)
    in_flight = next(p for p in capacity if p.title == "Requests in flight")
    assert [re.findall(r"mlgate_\w+", e) for e, _ in in_flight.exprs] == [
        ["mlgate_in_flight_requests"],
        ["mlgate_max_in_flight"],
    ]
    wait = next(p for p in capacity if p.title == "Batcher wait p99")
    deadline = f"vector({cfg.serving.max_latency_ms / 1000:g})"
    assert wait.exprs[1][0] == deadline and wait.unit == "s"


def test_cli_writes_the_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    config = write_config(tmp_path)
    result = CliRunner().invoke(app, ["slo", "dashboard", "--config", str(config), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["title"] == "mlgate: churn"
