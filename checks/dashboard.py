"""A Grafana dashboard for one model, generated from the config: one row per plane.

- users: request rate by status, 5xx share, p95/p99 latency against the `slo:` bounds, and
  the availability error budget left over `slo.window_days`;
- capacity: rows per ONNX Runtime call against `serving.max_batch_size`, load shed (503),
  rows per request, inference-log rows written and dropped, the batcher's queue (rows) and
  the p99 of its wait against `serving.max_latency_ms`, requests in flight against the
  admission bound (`serving.max_in_flight` summed over the workers);
- model: what serves (`mlgate_model_info`: version, graph, provider), the score
  distribution by version and variant (quantiles and mean of `mlgate_score`), and the
  instances serving a last-known-good copy;
- money: cost per 1,000 predictions (CPU and GPU seconds at the `cost:` prices, the same
  formula as `checks/cost.py`) against `cost.budget_per_1000`, and spend per hour.

Every panel reads only series that `services/metrics.py` exports or that `mlgate slo rules`
records; tests/checks/test_dashboard.py checks the structure against what Grafana requires
of a dashboard (its JSON model: unique panel ids, a grid position per panel, targets with
a `refId` and an expression, a Prometheus datasource variable) and runs every expression on
a real Prometheus scraping a real service. The live score PSI and the estimated metric are
not here: the monitoring flow computes them per window into MLflow, not into Prometheus.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from models.config import MlgateConfig

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24
HEIGHT = 8


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (expression, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


def dashboard_panels(cfg: MlgateConfig) -> list[tuple[str, list[Panel]]]:
    """The rows and their panels, as data (what the JSON is rendered from)."""
    m = f'model_name="{cfg.registry.model_name}"'
    by = "model_version, variant"
    r = "$__rate_interval"
    requests = f"sum by ({by}) (rate(mlgate_requests_total{{{m}}}[{r}]))"
    slo = cfg.slo
    latency = []
    for q, bound in (("0.95", slo.latency_p95_s), ("0.99", slo.latency_p99_s)):
        latency.append(
            (
                f"histogram_quantile({q}, sum by (le, {by}) "
                f"(rate(mlgate_request_latency_seconds_bucket{{{m}}}[{r}])))",
                f"p{q[2:]} {{{{model_version}}}} {{{{variant}}}}",
            )
        )
        if bound is not None:
            latency.append((f"vector({bound:g})", f"p{q[2:]} objective"))
    budget = 1.0 - slo.availability
    days = f"{slo.window_days:g}d"
    users = [
        Panel(
            "Requests by status",
            (
                (
                    f"sum by (status) (rate(mlgate_requests_total{{{m}}}[{r}]))",
                    "{{status}}",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Errors (share of answers that are 5xx)",
            (
                (
                    f'sum by ({by}) (rate(mlgate_requests_total{{{m},status=~"5.."}}[{r}]))'
                    f"\n/\n{requests}",
                    "{{model_version}} {{variant}}",
                ),
            ),
            unit="percentunit",
        ),
        Panel("Latency against the objectives", tuple(latency), unit="s"),
        Panel(
            f"Availability error budget left ({days})",
            (
                (
                    f'1 - (sum(increase(mlgate_requests_total{{{m},status=~"5.."}}[{days}]))'
                    f"\n/ sum(increase(mlgate_requests_total{{{m}}}[{days}]))) / {budget:g}",
                    "budget left",
                ),
            ),
            unit="percentunit",
            kind="stat",
            description=(
                f"Share of the {days} error budget ({budget:g} of answers may be 5xx, "
                "slo.availability) not yet spent."
            ),
        ),
    ]
    capacity = [
        Panel(
            "Rows per ONNX Runtime call (batch size)",
            (
                (
                    f"sum by ({by}) (rate(mlgate_batch_rows_sum{{{m}}}[{r}]))\n/\n"
                    f"sum by ({by}) (rate(mlgate_batch_rows_count{{{m}}}[{r}]))",
                    "{{model_version}} {{variant}}",
                ),
                (f"vector({cfg.serving.max_batch_size})", "serving.max_batch_size"),
            ),
        ),
        Panel(
            "Load shed (503 with Retry-After)",
            (
                (
                    f'sum by ({by}) (rate(mlgate_requests_total{{{m},status="503"}}[{r}]))',
                    "{{model_version}} {{variant}}",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Rows per request",
            (
                (
                    f"sum by ({by}) (rate(mlgate_request_rows_sum{{{m}}}[{r}]))\n/\n"
                    f"sum by ({by}) (rate(mlgate_request_rows_count{{{m}}}[{r}]))",
                    "{{model_version}} {{variant}}",
                ),
            ),
        ),
        Panel(
            "Inference log rows",
            (
                (
                    f"sum by (outcome) (rate(mlgate_inference_log_rows_total{{{m}}}[{r}]))",
                    "{{outcome}}",
                ),
            ),
            unit="rowsps",
        ),
        Panel(
            "Batcher queue (rows waiting or being scored)",
            (
                (
                    f"sum by (variant, instance) (mlgate_batcher_queued_rows{{{m}}})",
                    "{{variant}} {{instance}}",
                ),
            ),
            description="A gauge read at each scrape; Little's law: queued rows over rows "
            "scored per second is the wait ahead of a new row.",
        ),
        Panel(
            "Requests in flight",
            (
                (
                    f"sum by (variant, instance) (mlgate_in_flight_requests{{{m}}})",
                    "{{variant}} {{instance}}",
                ),
                (
                    f"sum by (variant, instance) (mlgate_max_in_flight{{{m}}})",
                    "bound {{variant}} {{instance}}",
                ),
            ),
            description="Admitted and not yet scored; at the bound (serving.max_in_flight "
            "per worker) requests are shed with 503.",
        ),
        Panel(
            "Batcher wait p99",
            (
                (
                    f"histogram_quantile(0.99, sum by (le, {by}) "
                    f"(rate(mlgate_batcher_wait_seconds_bucket{{{m}}}[{r}])))",
                    "{{model_version}} {{variant}}",
                ),
                (
                    f"vector({cfg.serving.max_latency_ms / 1000:g})",
                    "serving.max_latency_ms (shed past it)",
                ),
            ),
            unit="s",
        ),
    ]
    model = [
        Panel(
            "What serves",
            (
                (
                    f"max by (model_version, variant, graph, provider) (mlgate_model_info{{{m}}})",
                    "v{{model_version}} {{variant}} {{graph}} {{provider}}",
                ),
            ),
            kind="stat",
        ),
        Panel(
            "Score distribution by version",
            tuple(
                (
                    f"histogram_quantile({q}, sum by (le, {by}) "
                    f"(rate(mlgate_score_bucket{{{m}}}[{r}])))",
                    f"q{q[2:]} {{{{model_version}}}} {{{{variant}}}}",
                )
                for q in ("0.1", "0.5", "0.9")
            ),
            unit="percentunit",
        ),
        Panel(
            "Mean score by version",
            (
                (
                    f"sum by ({by}) (rate(mlgate_score_sum{{{m}}}[{r}]))\n/\n"
                    f"sum by ({by}) (rate(mlgate_score_count{{{m}}}[{r}]))",
                    "{{model_version}} {{variant}}",
                ),
            ),
            unit="percentunit",
        ),
        Panel(
            "Serving a last-known-good copy",
            (
                (
                    f"max by ({by}) (mlgate_model_from_last_known_good{{{m}}})",
                    "{{model_version}} {{variant}}",
                ),
            ),
            kind="stat",
        ),
    ]
    price = cfg.cost
    spend = (
        f"(sum by ({by}) (rate(mlgate_cpu_seconds_total{{{m}}}[{r}])) * "
        f"{price.price_per_core_hour:g}\n+ sum by ({by}) "
        f"(rate(mlgate_gpu_seconds_total{{{m}}}[{r}])) * {price.price_per_gpu_hour:g}) / 3600"
    )
    budget_line = (
        ((f"vector({price.budget_per_1000:g})", "cost.budget_per_1000"),)
        if price.budget_per_1000 is not None
        else ()
    )
    money = [
        Panel(
            "Cost per 1,000 predictions",
            (
                (
                    f"{spend}\n/ sum by ({by}) (rate(mlgate_score_count{{{m}}}[{r}])) * 1000",
                    "{{model_version}} {{variant}}",
                ),
                *budget_line,
            ),
            unit="currencyUSD",
            description=(
                "CPU seconds the service spent (idle included) at cost.price_per_core_hour, "
                "plus held GPU seconds at cost.price_per_gpu_hour, per 1,000 rows scored: "
                "checks/cost.py's formula."
            ),
        ),
        Panel(
            "Spend per hour",
            ((f"{spend} * 3600", "{{model_version}} {{variant}}"),),
            unit="currencyUSD",
        ),
    ]
    return [("Users", users), ("Capacity", capacity), ("Model", model), ("Money", money)]


def build_dashboard(cfg: MlgateConfig) -> dict[str, Any]:
    """The dashboard's JSON model (import it in Grafana, or provision it from a file)."""
    name = cfg.registry.model_name
    panels: list[dict[str, Any]] = []
    ids = iter(range(1, 1000))
    y = 0
    for title, row in dashboard_panels(cfg):
        panels.append(
            {
                "id": next(ids),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        width = WIDTH // 2
        for i, panel in enumerate(row):
            x = (i % 2) * width
            if i and i % 2 == 0:
                y += HEIGHT
            panels.append(
                {
                    "id": next(ids),
                    "type": panel.kind,
                    "title": panel.title,
                    "description": panel.description,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": HEIGHT, "w": width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {},
                    "targets": [
                        {
                            "refId": chr(ord("A") + j),
                            "datasource": DATASOURCE,
                            "expr": expr,
                            "legendFormat": legend,
                        }
                        for j, (expr, legend) in enumerate(panel.exprs)
                    ],
                }
            )
        y += HEIGHT
    return {
        "title": f"mlgate: {name}",
        "uid": "mlgate-" + hashlib.sha256(name.encode()).hexdigest()[:12],
        "tags": ["mlgate"],
        "timezone": "utc",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }
