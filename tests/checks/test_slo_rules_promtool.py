"""The generated rules under Prometheus' own tools: `promtool check rules` on what `mlgate slo
rules` writes, and `promtool test rules` feeding series that must fire each alert and series
that must not.

Each burn-rate window pair is tested alone (a rule file with that pair only): a constant
share of bad requests 5 % above its threshold fires it, 5 % below does not. The default
file then shows what the pairs do together: a fresh burst pages through the fast pair alone,
and a page resolves once its short windows are clean while the ticket stays.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from checks.cost import cost_per_1000
from checks.slo_rules import COST_PER_1000, build_slo_rules
from flows.cli import EXIT_USAGE, app
from models.config import CostConfig, SloConfig, prom_duration_s
from services.metrics import LATENCY_BUCKETS_S
from tests.conftest import write_config

pytestmark = pytest.mark.integration

# `make install` installs Prometheus (Debian's package, which brings promtool); without it
# these tests error with the install command rather than skip, so that a machine without it
# cannot pass them silently.
PROMTOOL = shutil.which("promtool")
if PROMTOOL is None:
    raise RuntimeError(
        "promtool is not installed; on Debian or Ubuntu: apt-get install -y prometheus"
    )

MODEL = "churn"
INSTANCE = {"model_name": MODEL, "variant": "stable", "instance": "stable:3001"}
REQUESTS_PER_MINUTE = 1000
BUDGETS = {"availability": 0.001, "latency_p95": 0.05, "latency_p99": 0.01}
ALERTS = {
    "availability": "MlgateAvailabilityBudgetBurn",
    "latency_p95": "MlgateLatencyP95BudgetBurn",
    "latency_p99": "MlgateLatencyP99BudgetBurn",
}
# Every alert, including the load one, which needs a capacity figure.
SLO = SloConfig(capacity_rps=100.0)
# serving.max_latency_ms's default, in seconds: the batcher's deadline.
MAX_WAIT_S = 2.0


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {**INSTANCE, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _counter(*phases: tuple[float, int]) -> str:
    """A counter sampled every minute from 0: `per_minute` more in each of `minutes`."""
    parts, value = ["0"], 0.0
    for per_minute, minutes in phases:
        parts.append(f"{value + per_minute:.10g}+{per_minute:.10g}x{minutes - 1}")
        value += per_minute * minutes
    return " ".join(parts)


def _traffic(*phases: tuple[float, float, float, int]) -> list[dict[str, str]]:
    """Requests and latencies in phases of (share answered 5xx, share slower than the p95
    bound, share slower than the p99 bound, minutes)."""
    n = REQUESTS_PER_MINUTE

    def counter(share_of: Any) -> str:
        return _counter(*((n * share_of(p), p[3]) for p in phases))

    latency = "mlgate_request_latency_seconds"
    return [
        _series("mlgate_requests_total", counter(lambda p: 1 - p[0]), status="200"),
        _series("mlgate_requests_total", counter(lambda p: p[0]), status="500"),
        _series(f"{latency}_bucket", counter(lambda p: 1 - p[1]), le="0.05"),
        _series(f"{latency}_bucket", counter(lambda p: 1 - p[2]), le="0.2"),
        _series(f"{latency}_bucket", counter(lambda p: 1), le="+Inf"),
        _series(f"{latency}_count", counter(lambda p: 1)),
    ]


def _burns(minute: int, firing: dict[str, list[str]]) -> list[dict[str, Any]]:
    """An alert test per burn-rate alert at `minute`: those in `firing` at its severities."""
    return [
        {
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [
                {"exp_labels": {"model_name": MODEL, "severity": s, "slo": slo}}
                for s in firing.get(slo, [])
            ],
        }
        for slo, alert in ALERTS.items()
    ]


def _leading(minute: int, alert: str, fires: bool) -> dict[str, Any]:
    labels = {**INSTANCE, "severity": "warning"}
    return {
        "eval_time": f"{minute}m",
        "alertname": alert,
        "exp_alerts": [{"exp_labels": labels}] if fires else [],
    }


def _without_annotations(rules: dict[str, Any]) -> dict[str, Any]:
    bare = copy.deepcopy(rules)
    for group in bare["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return bare


def _run_tests(
    tmp_path: Path,
    files: dict[str, tuple[dict[str, Any], list[dict]]],
    evaluation_interval: str = "1m",
) -> None:
    """`promtool test rules` on one test file per entry: its rules and its test groups."""
    tests = []
    for name, (rules, groups) in files.items():
        (tmp_path / f"{name}.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        test = tmp_path / f"{name}.test.yml"
        test.write_text(
            yaml.safe_dump(
                {
                    "rule_files": [f"{name}.rules.yml"],
                    "evaluation_interval": evaluation_interval,
                    "tests": [{"interval": "1m", **g} for g in groups],
                },
                sort_keys=False,
            )
        )
        tests.append(test)
    done = _promtool("test", "rules", *tests)
    assert done.returncode == 0, done.stdout + done.stderr


def _rules(slo: SloConfig) -> dict[str, Any]:
    return build_slo_rules(slo, MODEL, 256, LATENCY_BUCKETS_S, max_wait_s=MAX_WAIT_S).to_dict()


def test_cli_writes_rules_promtool_accepts(tmp_path: Path):
    config = write_config(tmp_path, slo={"capacity_rps": 300, "runbook_url": "https://wiki/x"})
    out = tmp_path / "mlgate-rules.yml"
    result = CliRunner().invoke(app, ["slo", "rules", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "not generated" not in result.output
    checked = _promtool("check", "rules", out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # 36 (the queue, wait, in-flight and breaker alerts among them), and the cost per
    # 1,000 recording rule (no budget set: no cost alert).
    assert "SUCCESS: 37 rules found" in checked.stdout
    assert out.read_text().startswith("# Prometheus rules for model churn")

    printed = CliRunner().invoke(app, ["slo", "rules", "--config", str(config)])
    assert printed.exit_code == 0 and "groups:" in printed.output


def test_cli_refuses_a_latency_bound_that_is_no_bucket(tmp_path: Path):
    config = write_config(tmp_path, slo={"latency_p95_s": 0.03})
    result = CliRunner().invoke(app, ["slo", "rules", "--config", str(config)])
    assert result.exit_code == EXIT_USAGE
    assert "slo.latency_p95_s 0.03 is not a bound" in result.output


@pytest.mark.parametrize("pair", SloConfig().burn_windows, ids=lambda p: f"{p.long}-{p.short}")
def test_each_burn_window_pair_fires_above_its_rate_and_not_below(
    tmp_path: Path, pair: SloConfig.BurnWindow
):
    rules = _without_annotations(_rules(SloConfig(burn_windows=(pair,))))
    minutes = prom_duration_s(pair.long) // 60 + 10

    def shares(scale: float) -> tuple[float, float, float, int]:
        s = {slo: scale * pair.factor * budget for slo, budget in BUDGETS.items()}
        return (s["availability"], s["latency_p95"], s["latency_p99"], minutes)

    every = {slo: [pair.severity] for slo in ALERTS}
    groups = [
        {"input_series": _traffic(shares(1.05)), "alert_rule_test": _burns(minutes, every)},
        {"input_series": _traffic(shares(0.95)), "alert_rule_test": _burns(minutes, {})},
    ]
    # Burn-rate alerts have no `for`: evaluating every 10 minutes tests the same thresholds,
    # and days of series in seconds.
    _run_tests(tmp_path, {"pair": (rules, groups)}, evaluation_interval="10m")


def test_default_burn_rates_together(tmp_path: Path):
    rules = _without_annotations(_rules(SLO))
    both = ["page", "ticket"]
    groups = [
        # The example on a 99.9 % objective: 2 % errors for an hour pages (1 % is
        # a 10x burn, under the fast pair's 14.4x; it pages through 6h/30m at 6x), and
        # 0.05 % (half the budget's rate) fires nothing.
        {
            "input_series": _traffic((0.02, 0.0, 0.0, 70)),
            "alert_rule_test": _burns(65, {"availability": both}),
        },
        {
            "input_series": _traffic((0.0005, 0.0, 0.0, 70)),
            "alert_rule_test": _burns(65, {}),
        },
        # Six clean hours, then an hour of 3 % errors and 20 % of requests over 200 ms: the
        # 6h windows are still under 6x, so only the fast pair pages.
        {
            "input_series": _traffic((0.0, 0.0, 0.0, 360), (0.03, 0.2, 0.2, 60)),
            "alert_rule_test": _burns(420, {"availability": both, "latency_p99": both}),
        },
        # The same hour at 1.3 % errors and 12 % slow: under 14.4x, so no page.
        {
            "input_series": _traffic((0.0, 0.0, 0.0, 360), (0.013, 0.12, 0.12, 60)),
            "alert_rule_test": _burns(420, {"availability": ["ticket"], "latency_p99": ["ticket"]}),
        },
        # An hour at 2 % then clean: paging while it lasts; half an hour after it stopped
        # the page's short windows (5m, 30m) are clean and it has resolved, while the
        # ticket (short windows 2h and 6h) stays.
        {
            "input_series": _traffic((0.02, 0.0, 0.0, 60), (0.0, 0.0, 0.0, 60)),
            "alert_rule_test": [
                *_burns(60, {"availability": both}),
                *_burns(91, {"availability": ["ticket"]}),
            ],
        },
    ]
    _run_tests(tmp_path, {"defaults": (rules, groups)})


def test_leading_indicators_fire_and_stay_quiet(tmp_path: Path):
    rules = _without_annotations(_rules(SLO))
    minutes = 30
    calm = [
        _series("mlgate_requests_total", _counter((3000, minutes)), status="200"),
        _series("mlgate_requests_total", _counter((0, minutes)), status="503"),
        _series("mlgate_batch_rows_sum", _counter((600, minutes))),
        _series("mlgate_batch_rows_count", _counter((60, minutes))),
        _series("mlgate_inference_log_rows_total", _counter((3000, minutes)), outcome="written"),
        _series("mlgate_inference_log_rows_total", _counter((0, minutes)), outcome="dropped"),
        # An empty queue, 2 of 128 admitted requests in flight, every wait under a second.
        _series("mlgate_batcher_queued_rows", f"0x{minutes}"),
        _series("mlgate_in_flight_requests", f"2x{minutes}"),
        _series("mlgate_max_in_flight", f"128x{minutes}"),
        *_waits(3000, 1.0, minutes),
    ]
    stressed = [
        # 90 requests/s against a capacity of 100 (warns above 80), a 0.5 % of them shed.
        _series("mlgate_requests_total", _counter((5373, minutes)), status="200"),
        _series("mlgate_requests_total", _counter((27, minutes)), status="503"),
        # 200 rows per ONNX Runtime call against a batch of at most 256 (warns above 128).
        _series("mlgate_batch_rows_sum", _counter((12000, minutes))),
        _series("mlgate_batch_rows_count", _counter((60, minutes))),
        _series("mlgate_inference_log_rows_total", _counter((5000, minutes)), outcome="written"),
        _series("mlgate_inference_log_rows_total", _counter((5, minutes)), outcome="dropped"),
        # 100 rows queued at 200 rows/s scored: 0.5 s ahead of a new row (warns above 80 %
        # of the 0.2 s p99 objective); 120 of 128 in flight; a tenth of the requests waited
        # between 1 and 2 s, so the p99 wait is about 1.9 s (warns above 1.6 s).
        _series("mlgate_batcher_queued_rows", f"100x{minutes}"),
        _series("mlgate_in_flight_requests", f"120x{minutes}"),
        _series("mlgate_max_in_flight", f"128x{minutes}"),
        *_waits(5400, 0.9, minutes),
    ]
    # Low traffic: now and then a request is in the queue at a scrape, and one alone takes
    # long at the scored rate (50 rows at 10 rows/s); the queue is empty at the next, so
    # the condition never holds for 10 minutes: a scorer that idles is not saturated.
    idle = [
        _series("mlgate_batch_rows_sum", _counter((600, minutes))),
        _series("mlgate_batch_rows_count", _counter((60, minutes))),
        _series("mlgate_batcher_queued_rows", " ".join(["0 50"] * (minutes // 2))),
    ]
    blip = [
        # One minute of 503s: its 5m rate lasts five minutes, under the 10 minutes it needs.
        _series("mlgate_requests_total", _counter((3000, minutes)), status="200"),
        _series("mlgate_requests_total", _counter((0, 15), (30, 1), (0, 14)), status="503"),
    ]
    leading = ["MlgateBatcherShedding", "MlgateBatcherSaturated", "MlgateLoadNearCapacity"]
    leading += ["MlgateInferenceLogDropping", "MlgateBatcherQueueBacklog"]
    leading += ["MlgateBatcherWaitHigh", "MlgateInFlightNearLimit"]
    groups = [
        {"input_series": calm, "alert_rule_test": [_leading(25, a, False) for a in leading]},
        {"input_series": stressed, "alert_rule_test": [_leading(25, a, True) for a in leading]},
        # Not yet: the condition holds from the first minute but warns only after 10m.
        {"input_series": stressed, "alert_rule_test": [_leading(8, a, False) for a in leading]},
        {
            "input_series": blip,
            "alert_rule_test": [_leading(m, "MlgateBatcherShedding", False) for m in (18, 25)],
        },
        {
            "input_series": idle,
            "alert_rule_test": [_leading(m, "MlgateBatcherQueueBacklog", False) for m in (15, 25)],
        },
    ]
    _run_tests(tmp_path, {"leading": (rules, groups)})


def _waits(per_minute: int, within_1s: float, minutes: int) -> list[dict[str, str]]:
    """The batcher wait histogram: `per_minute` requests, `within_1s` of them waiting at
    most 1 s and the rest between 1 and 2 s."""
    wait = "mlgate_batcher_wait_seconds"
    return [
        _series(f"{wait}_bucket", _counter((per_minute * within_1s, minutes)), le="1.0"),
        _series(f"{wait}_bucket", _counter((per_minute, minutes)), le="2.0"),
        _series(f"{wait}_bucket", _counter((per_minute, minutes)), le="+Inf"),
    ]


def test_an_open_circuit_breaker_warns_and_a_single_opening_does_not(tmp_path: Path):
    """Sampled every minute: open (2) and half-open (1) in turn while the registry stays
    down, from minute 5 to 19; the notifications breaker closed throughout."""
    rules = _without_annotations(_rules(SLO))
    alert = "MlgateCircuitBreakerOpen"
    state = "mlgate_circuit_breaker_state"
    outage = [
        _series(state, "0x4 " + "2 1 " * 7 + "2 0x10", dependency="registry"),
        _series(state, "0x30", dependency="notifications"),
    ]
    # Opened once (three failures), and the trial call 30 s later closed it.
    single = [_series(state, "0x4 2 0x25", dependency="registry")]

    def test(minute: int, fires: bool) -> dict[str, Any]:
        labels = {"instance": INSTANCE["instance"], "dependency": "registry"}
        return {
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {**labels, "severity": "warning"}}] if fires else [],
        }

    groups = [
        # Not yet at minute 7 (open for 2 of the 3 minutes it needs); firing at 8 and 15;
        # resolved at 23, its 2-minute window clean.
        {
            "input_series": outage,
            "alert_rule_test": [test(m, m in (8, 15)) for m in (7, 8, 15, 23)],
        },
        {"input_series": single, "alert_rule_test": [test(m, False) for m in (5, 6, 7, 8, 10)]},
    ]
    _run_tests(tmp_path, {"breaker": (rules, groups)})


def test_serving_the_last_known_good_copy_warns_after_leading_for(tmp_path: Path):
    rules = _without_annotations(_rules(SLO))
    alert = "MlgateServingLastKnownGood"
    registry_copy = [_series("mlgate_model_from_last_known_good", "0 0 0 0 0 1x25")]
    from_registry = [_series("mlgate_model_from_last_known_good", "0x30")]
    groups = [
        {"input_series": registry_copy, "alert_rule_test": [_leading(25, alert, True)]},
        # Switched over at minute 5: not yet ten minutes of it at minute 12.
        {"input_series": registry_copy, "alert_rule_test": [_leading(12, alert, False)]},
        {"input_series": from_registry, "alert_rule_test": [_leading(25, alert, False)]},
    ]
    _run_tests(tmp_path, {"last_known_good": (rules, groups)})


def test_annotations_render_with_the_alert_values(tmp_path: Path):
    rules = _rules(SLO)
    burns = [r for r in rules["groups"][1]["rules"] if r.get("alert") == ALERTS["availability"]]

    def rendered(annotations: dict[str, str]) -> dict[str, str]:
        return {
            key: text.replace("{{ $labels.model_name }}", MODEL).replace(
                "{{ $value | humanizePercentage }}", "2%"
            )
            for key, text in annotations.items()
        }

    expected = [
        {
            "exp_labels": {"model_name": MODEL, **r["labels"]},
            "exp_annotations": rendered(r["annotations"]),
        }
        for r in burns
    ]
    assert [e["exp_labels"]["severity"] for e in expected] == ["page", "ticket"]
    assert expected[0]["exp_annotations"]["description"].startswith(
        "2% of /predict answers were 5xx"
    )
    test = {
        "input_series": _traffic((0.02, 0.0, 0.0, 70)),
        "alert_rule_test": [
            {
                "eval_time": "65m",
                "alertname": "MlgateAvailabilityBudgetBurn",
                "exp_alerts": expected,
            }
        ],
    }
    _run_tests(tmp_path, {"annotations": (rules, [test])})


def test_cost_per_1000_is_the_cost_function_s_and_alerts_over_budget(tmp_path: Path):
    """Per version and variant: a GPU canary over the budget fires, the CPU-only stable below
    it stays quiet, and an idle instance (CPU spent, no rows) has no cost rather than an
    infinite one. The recorded value is `checks.cost.cost_per_1000` of the same counts."""
    cost = CostConfig(price_per_core_hour=0.036, price_per_gpu_hour=3.6, budget_per_1000=0.002)
    rules = build_slo_rules(SLO, MODEL, 256, LATENCY_BUCKETS_S, cost).to_dict()
    minutes = 40

    def side(variant: str, version: str, cpu: float, gpu: float, rows: float) -> list[dict]:
        labels = {"variant": variant, "model_version": version, "instance": f"{variant}:1"}
        return [
            _series("mlgate_cpu_seconds_total", _counter((cpu, minutes)), **labels),
            _series("mlgate_gpu_seconds_total", _counter((gpu, minutes)), **labels),
            _series("mlgate_score_count", _counter((rows, minutes)), **labels),
        ]

    # Per minute: one core busy and 6,000 rows; the canary also holds one GPU.
    series = [
        *side("stable", "3", 60.0, 0.0, 6000.0),
        *side("canary", "4", 60.0, 60.0, 6000.0),
        *side("idle", "4", 30.0, 0.0, 0.0),
    ]

    def _rounded(value: float) -> float:
        # promtool compares samples exactly; the two sums round differently in the last bit.
        return float(f"{value:.12g}")

    def labels(variant: str, version: str) -> str:
        return f'model_name="{MODEL}",model_version="{version}",variant="{variant}"'

    def alert(minute: int, firing: bool) -> dict[str, Any]:
        exp = {"model_name": MODEL, "model_version": "4", "variant": "canary"}
        return {
            "eval_time": f"{minute}m",
            "alertname": "MlgateCostOverBudget",
            "exp_alerts": [{"exp_labels": {**exp, "severity": "ticket"}}] if firing else [],
        }

    group = {
        "input_series": series,
        "promql_expr_test": [
            {
                "expr": COST_PER_1000,
                "eval_time": "30m",
                "exp_samples": [
                    {
                        "labels": f"{COST_PER_1000}{{{labels('canary', '4')}}}",
                        "value": _rounded(cost_per_1000(60.0, 60.0, 6000.0, cost)),
                    },
                    {
                        "labels": f"{COST_PER_1000}{{{labels('stable', '3')}}}",
                        "value": _rounded(cost_per_1000(60.0, 0.0, 6000.0, cost)),
                    },
                ],
            }
        ],
        # Over budget from the first minutes, but a ticket only after slo.leading_for.
        "alert_rule_test": [alert(5, False), alert(30, True)],
    }
    _run_tests(tmp_path, {"cost": (_without_annotations(rules), [group])})
