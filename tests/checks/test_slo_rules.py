"""The rules generated from `slo:`: their shape, the config they come from, and every series
they read held to what the service's `/metrics` really exports (promtool runs them in
test_slo_rules_promtool.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from checks.cost import cost_per_1000
from checks.slo_rules import (
    COST_PER_1000,
    NOT_EXPORTED,
    SloRulesError,
    build_slo_rules,
    cost_per_1000_expr,
)
from models.config import ConfigError, CostConfig, SloConfig, load_config
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from tests.conftest import write_config

pytestmark = pytest.mark.fast

BURN_ALERTS = {
    "MlgateAvailabilityBudgetBurn",
    "MlgateLatencyP95BudgetBurn",
    "MlgateLatencyP99BudgetBurn",
}
LEADING_ALERTS = [
    "MlgateBatcherShedding",
    "MlgateBatcherSaturated",
    "MlgateBatcherQueueBacklog",
    "MlgateBatcherWaitHigh",
    "MlgateInFlightNearLimit",
    "MlgateLoadNearCapacity",
    "MlgateServingLastKnownGood",
    "MlgateInferenceLogDropping",
]


MAX_WAIT_S = 2.0


def _rules(slo: SloConfig | None = None, **fields: Any) -> dict:
    built = build_slo_rules(
        slo or SloConfig(**fields), "churn", 256, LATENCY_BUCKETS_S, max_wait_s=MAX_WAIT_S
    )
    return yaml.safe_load(built.to_yaml())


def _ratios(rules: dict) -> list[dict]:
    return [r for r in rules["groups"][1]["rules"] if "record" in r]


def _burns(rules: dict) -> list[dict]:
    return [r for r in rules["groups"][1]["rules"] if "alert" in r]


def _exposition() -> str:
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "0" * 64)
    metrics.observe_request(200, 0.004, 1)
    metrics.observe_batch(1)
    metrics.observe_wait(0.001)
    metrics.watch_load(lambda: (3, 1), 128)
    metrics.log_written(1)
    metrics.log_dropped(1)
    return metrics.render()[0].decode()


def test_every_series_the_rules_read_is_on_metrics():
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in _exposition().splitlines()
        if line and not line.startswith("#")
    }
    rules = _rules(capacity_rps=100.0)
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    # Recorded series have a colon in their name; every other name must be exported.
    read = {m for e in exprs for m in re.findall(r"(?<![\w:])(mlgate_\w+)(?=[{\[\s])", e)}
    assert read == {
        "mlgate_requests_total",
        "mlgate_request_latency_seconds_bucket",
        "mlgate_request_latency_seconds_count",
        "mlgate_batch_rows_sum",
        "mlgate_batch_rows_count",
        "mlgate_inference_log_rows_total",
        "mlgate_model_from_last_known_good",
        "mlgate_batcher_queued_rows",
        "mlgate_batcher_wait_seconds_bucket",
        "mlgate_in_flight_requests",
        "mlgate_max_in_flight",
        "mlgate_circuit_breaker_state",
    }
    assert read <= exported, read - exported
    labels = set(re.findall(r'(\w+)=~?"', "\n".join(exprs)))
    assert labels == {"model_name", "status", "le", "outcome"}


def test_leading_indicators_come_first_then_ratios_then_burn_rates():
    rules = _rules(capacity_rps=100.0)
    names = [g["name"] for g in rules["groups"]]
    assert names == [
        "mlgate-churn-leading-indicators",
        "mlgate-churn-slo",
        "mlgate-churn-dependencies",
    ]
    leading, slo, _ = (g["rules"] for g in rules["groups"])
    assert [r["alert"] for r in leading] == LEADING_ALERTS
    assert all(r["for"] == "10m" and r["labels"] == {"severity": "warning"} for r in leading)
    # In one group the alerts read the ratios recorded in the same evaluation.
    kinds = ["record" if "record" in r else "alert" for r in slo]
    assert kinds == sorted(kinds, reverse=True) and len(set(kinds)) == 2
    burns = _burns(rules)
    assert {r["alert"] for r in burns} == BURN_ALERTS
    for rule in leading + burns:
        assert set(rule["annotations"]) == {"summary", "description", "runbook", "runbook_page"}
        assert "{{ $labels.model_name }}" in rule["annotations"]["summary"]


def test_burn_rates_follow_the_workbook_defaults():
    burns = {(r["alert"], r["labels"]["severity"]): r for r in _burns(_rules())}
    assert set(burns) == {(a, s) for a in BURN_ALERTS for s in ("page", "ticket")}
    page = burns["MlgateAvailabilityBudgetBurn", "page"]["expr"]
    assert "model_name:mlgate_requests_5xx:ratio_rate1h > 0.0144" in page
    assert "model_name:mlgate_requests_5xx:ratio_rate5m > 0.0144" in page
    assert "model_name:mlgate_requests_5xx:ratio_rate6h > 0.006" in page
    assert "model_name:mlgate_requests_5xx:ratio_rate30m > 0.006" in page
    ticket = burns["MlgateAvailabilityBudgetBurn", "ticket"]["expr"]
    assert "ratio_rate1d > 0.003" in ticket and "ratio_rate3d > 0.001" in ticket
    # p99 within 200 ms: 1 % of requests may be slower; p95 within 50 ms: 5 %.
    assert "ratio_rate1h > 0.144" in burns["MlgateLatencyP99BudgetBurn", "page"]["expr"]
    assert "ratio_rate1h > 0.72" in burns["MlgateLatencyP95BudgetBurn", "page"]["expr"]
    description = burns["MlgateAvailabilityBudgetBurn", "page"]["annotations"]["description"]
    assert "99.9% of /predict answers not 5xx over 30 days" in description
    assert "1h and 5m at 14.4x" in description


def test_ratios_are_recorded_per_model_for_every_window():
    recorded = {r["record"]: r["expr"] for r in _ratios(_rules())}
    windows = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
    for bad in ("5xx", "over_p95_bound", "over_p99_bound"):
        for w in windows:
            assert f"model_name:mlgate_requests_{bad}:ratio_rate{w}" in recorded
    assert len(recorded) == 3 * len(windows)
    p99 = recorded["model_name:mlgate_requests_over_p99_bound:ratio_rate1h"]
    assert 'mlgate_request_latency_seconds_bucket{model_name="churn",le="0.2"}[1h]' in p99
    errors = recorded["model_name:mlgate_requests_5xx:ratio_rate5m"]
    assert 'mlgate_requests_total{model_name="churn",status=~"5.."}[5m]' in errors


def test_windows_factors_and_severities_come_from_config():
    slo = SloConfig(
        availability=0.99,
        latency_p95_s=None,
        burn_windows=(
            SloConfig.BurnWindow(long="2h", short="10m", factor=10, severity="critical"),
        ),
    )
    rules = _rules(slo)
    assert {r["record"].rsplit("_", 1)[1] for r in _ratios(rules)} == {"rate10m", "rate2h"}
    burns = _burns(rules)
    assert [(r["alert"], r["labels"]["severity"]) for r in burns] == [
        ("MlgateAvailabilityBudgetBurn", "critical"),
        ("MlgateLatencyP99BudgetBurn", "critical"),
    ]
    assert "ratio_rate2h > 0.1\n" in burns[0]["expr"]


def test_a_latency_bound_between_buckets_is_refused_naming_the_field():
    with pytest.raises(SloRulesError, match=r"slo\.latency_p99_s 0\.3 .*0\.2, 0\.5"):
        _rules(latency_p99_s=0.3)


def test_a_whole_second_bound_matches_both_spellings_of_le():
    recorded = _ratios(_rules(latency_p99_s=1.0))
    assert any('le=~"1|1.0"' in r["expr"] for r in recorded)


def test_capacity_alert_only_with_a_capacity_figure():
    alerts = [r.get("alert") for g in _rules()["groups"] for r in g["rules"]]
    assert "MlgateLoadNearCapacity" not in alerts
    leading = _rules(capacity_rps=400.0, max_capacity_share=0.5)["groups"][0]["rules"]
    capacity = next(r for r in leading if r["alert"] == "MlgateLoadNearCapacity")
    assert capacity["expr"].strip().endswith("> 200")


def _leading_rule(rules: dict, alert: str) -> dict:
    return next(r for r in rules["groups"][0]["rules"] if r["alert"] == alert)


def test_queue_backlog_is_little_s_law_against_the_latency_objective():
    """Rows queued over rows scored per second is the wait ahead of a new row; it warns at
    max_capacity_share of the p99 objective, else p95's, else the batcher's deadline."""
    queue = _leading_rule(_rules(), "MlgateBatcherQueueBacklog")["expr"]
    assert queue == (
        "sum by (model_name, variant, instance) "
        '(mlgate_batcher_queued_rows{model_name="churn"})\n/\n'
        "sum by (model_name, variant, instance) "
        '(rate(mlgate_batch_rows_sum{model_name="churn"}[5m]))\n> 0.16\n'
    )
    p95 = _rules(latency_p99_s=None, latency_p95_s=0.1, max_capacity_share=0.5)
    assert _leading_rule(p95, "MlgateBatcherQueueBacklog")["expr"].endswith("> 0.05\n")
    none = _rules(latency_p99_s=None, latency_p95_s=None)
    assert _leading_rule(none, "MlgateBatcherQueueBacklog")["expr"].endswith("> 1.6\n")


def test_wait_alert_only_with_the_batcher_s_deadline_and_in_flight_against_its_bound():
    wait = _leading_rule(_rules(), "MlgateBatcherWaitHigh")
    assert "histogram_quantile(\n  0.99," in wait["expr"]
    assert "mlgate_batcher_wait_seconds_bucket" in wait["expr"]
    assert wait["expr"].endswith("> 1.6\n")
    assert "serving.max_latency_ms 2000 ms" in wait["annotations"]["description"]
    built = build_slo_rules(SloConfig(), "churn", 256, LATENCY_BUCKETS_S)
    assert "MlgateBatcherWaitHigh" not in built.alert_names()
    in_flight = _leading_rule(_rules(max_capacity_share=0.9), "MlgateInFlightNearLimit")
    assert in_flight["expr"].startswith(
        'sum by (model_name, variant, instance) (mlgate_in_flight_requests{model_name="churn"})'
    )
    assert in_flight["expr"].endswith('(mlgate_max_in_flight{model_name="churn"})\n> 0.9\n')


def test_an_open_circuit_breaker_warns_after_a_short_for():
    [breaker] = _rules()["groups"][2]["rules"]
    assert breaker["alert"] == "MlgateCircuitBreakerOpen"
    assert breaker["expr"].strip() == (
        "max by (instance, dependency) (max_over_time(mlgate_circuit_breaker_state[2m])) == 2"
    )
    assert breaker["for"] == "3m" and breaker["labels"] == {"severity": "warning"}
    assert breaker["annotations"]["runbook_page"] == "docs/runbooks/dependency-down.md"
    assert "{{ $labels.dependency }}" in breaker["annotations"]["summary"]


def test_objectives_without_a_series_are_named_not_invented():
    built = build_slo_rules(
        SloConfig(champion_max_age_days=14, max_score_psi=0.25, min_estimated_metric=0.7),
        "churn",
        256,
        LATENCY_BUCKETS_S,
    )
    assert built.notes[: len(NOT_EXPORTED)] == NOT_EXPORTED
    extra = "\n".join(built.notes[len(NOT_EXPORTED) :])
    for field in ("champion_max_age_days", "max_score_psi", "min_estimated_metric"):
        assert f"slo.{field}" in extra
    text = built.to_yaml(header=("generated",))
    assert text.startswith("# generated\n# not generated: slo.champion_max_age_days")
    assert "psi" not in str(yaml.safe_load(text)).lower()


def test_runbook_url_links_each_alert():
    leading = _rules(runbook_url="https://wiki.example/mlgate")["groups"][0]["rules"]
    assert leading[0]["annotations"]["runbook_url"] == (
        "https://wiki.example/mlgate/latency-spike.md"
    )
    assert leading[0]["annotations"]["runbook_page"] == "docs/runbooks/latency-spike.md"


def test_slo_config_from_file_and_environment(tmp_path: Path, monkeypatch):
    path = write_config(tmp_path, slo={"availability": 0.995, "capacity_rps": 600})
    cfg = load_config(path)
    assert cfg.slo.availability == 0.995 and cfg.slo.capacity_rps == 600
    assert cfg.slo.burn_windows[0].factor == 14.4
    monkeypatch.setenv("MLGATE_SLO__LATENCY_P99_S", "0.5")
    assert load_config(path).slo.latency_p99_s == 0.5
    with pytest.raises(Exception, match="frozen"):
        cfg.slo.availability = 0.9


@pytest.mark.parametrize(
    ("slo", "message"),
    [
        ({"availability": 1.0}, r"slo\.availability"),
        ({"availabilty": 0.99}, r"slo\.availabilty: unknown field"),
        (
            {"burn_windows": [{"long": "5m", "short": "1h", "factor": 2, "severity": "page"}]},
            "short window 1h is not shorter than 5m",
        ),
        (
            {"burn_windows": [{"long": "1 h", "short": "5m", "factor": 2, "severity": "page"}]},
            r"slo\.burn_windows\.0\.long",
        ),
        ({"availability": 0.9}, "can never fire for availability 0.9"),
        ({"window_days": 2}, "burn window 3d/6h is longer than window_days 2"),
    ],
)
def test_bad_slo_config_is_refused_naming_the_field(tmp_path: Path, slo: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, slo=slo))


def _cost_group(cost: CostConfig) -> list[dict]:
    built = build_slo_rules(SloConfig(), "churn", 256, LATENCY_BUCKETS_S, cost)
    groups = yaml.safe_load(built.to_yaml())["groups"]
    assert [g["name"] for g in groups][-1] == "mlgate-churn-cost"
    return groups[-1]["rules"]


def test_cost_rules_only_with_prices_and_the_alert_only_with_a_budget():
    assert len(_rules()["groups"]) == 3
    rules = _cost_group(CostConfig())
    assert [r.get("record") for r in rules] == [COST_PER_1000]
    record, alert = _cost_group(CostConfig(budget_per_1000=0.002))
    assert record["record"] == COST_PER_1000 == "model_version_variant:mlgate_cost_per_1000:rate1h"
    assert alert["alert"] == "MlgateCostOverBudget"
    assert alert["expr"].strip() == f"{COST_PER_1000} > 0.002"
    assert alert["for"] == "10m" and alert["labels"] == {"severity": "ticket"}
    assert alert["annotations"]["runbook_page"] == "docs/runbooks/cost-over-budget.md"
    assert "{{ $labels.model_version }}" in alert["annotations"]["summary"]


def test_cost_rule_reads_exported_series_per_version_and_variant():
    metrics = ServiceMetrics("churn", "3", "stable", "CPUExecutionProvider", "0" * 64)
    metrics.observe_scores(np.array([0.5]))
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in metrics.render()[0].decode().splitlines()
        if line and not line.startswith("#")
    }
    (record,) = _cost_group(CostConfig())
    read = set(re.findall(r"(?<![\w:])(mlgate_\w+)(?=[{\[\s])", record["expr"]))
    assert read == {"mlgate_cpu_seconds_total", "mlgate_gpu_seconds_total", "mlgate_score_count"}
    assert read <= exported, read - exported
    assert record["expr"].count("sum by (model_name, model_version, variant)") == 3


def test_cost_rule_prices_are_the_cost_function_s():
    """The constants in the expression are checks.cost.cost_per_1000 of one CPU second and
    one GPU second over one row: the rule and the canary price alike."""
    cost = CostConfig(price_per_core_hour=0.072, price_per_gpu_hour=2.5)
    expr = cost_per_1000_expr(cost, 'model_name="churn"')
    cpu_price = cost_per_1000(1.0, 0.0, 1, cost)
    gpu_price = cost_per_1000(0.0, 1.0, 1, cost)
    assert f"[1h])) * {cpu_price:.12g}" in expr
    assert f"[1h])) * {gpu_price:.12g}" in expr
