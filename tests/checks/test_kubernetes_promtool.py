"""The Kubernetes manifests' PromQL under `promtool test rules` (checks/kubernetes.py): each
AnalysisTemplate guardrail's success and failure conditions turned into alerting rules over
synthetic series of the service's metric names, agreeing with checks/canary.py on the same
numbers (the cost ratio included, priced as checks/cost.py prices it), and the
ScaledObject's queue-depth and in-flight queries giving the replicas KEDA would ask for.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from checks.canary import GUARDRAILS, Histogram, VariantWindow, check_canary_step
from checks.kubernetes import guardrails, scaling_queries
from checks.result import GateStatus
from models.config import MlgateConfig, load_config
from services.metrics import LATENCY_BUCKETS_S, SCORE_BUCKETS
from tests.conftest import write_config

# Each case runs promtool (about 4 s).
pytestmark = pytest.mark.integration

PROMTOOL = shutil.which("promtool")
STEP_S = 15
WINDOW_STEPS = 4  # canary.interval_s 60 s: four 15 s scrapes
CANARY, STABLE = "c4n4ry", "st4bl3"
MAX_COST_RATIO = 1.5


def _cfg(tmp_path: Path) -> MlgateConfig:
    return load_config(
        write_config(
            tmp_path,
            slo={"capacity_rps": 100.0},
            kubernetes={"expected_peak_rps": 250.0},
            canary={"max_cost_ratio": MAX_COST_RATIO},
            cost={"price_per_core_hour": 0.05, "price_per_gpu_hour": 3.0},
        )
    )


def _promtool(tmp_path: Path, rules: list[dict[str, Any]], test: dict[str, Any]) -> str:
    """Run `promtool test rules` on `rules` and one test; its output, asserted passing."""
    # Like tests/checks/test_slo_rules_promtool.py: no promtool is an error, never a skip.
    if PROMTOOL is None:
        pytest.fail("promtool is not installed; on Debian or Ubuntu: apt-get install -y prometheus")
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "k8s", "rules": rules}]})
    )
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": f"{STEP_S}s",
                "tests": [{"interval": f"{STEP_S}s", **test}],
            }
        )
    )
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return f"rc {run.returncode}\n{run.stdout}\n{run.stderr}"


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


# One side's numbers per 15 s scrape: requests answered 200 and 500, latency and score
# bucket counts (not cumulative), CPU seconds (None: not exported) and GPU seconds.
Side = tuple[int, int, list[int], list[int], float | None, float]


def _side_series(model: str, side: str, numbers: Side) -> list[dict[str, str]]:
    """Counters growing by these amounts every scrape."""
    ok, err, latency, scores, cpu, gpu = numbers
    base = f'model_name="{model}",rollouts_pod_template_hash="{side}"'
    out = [
        {"series": f"mlgate_model_info{{{base}}}", "values": "1+0x40"},
        {"series": f'mlgate_requests_total{{{base},status="200"}}', "values": f"0+{ok}x40"},
        {"series": f'mlgate_requests_total{{{base},status="500"}}', "values": f"0+{err}x40"},
        {"series": f"mlgate_gpu_seconds_total{{{base}}}", "values": f"0+{gpu}x40"},
    ]
    if cpu is not None:
        out.append({"series": f"mlgate_cpu_seconds_total{{{base}}}", "values": f"0+{cpu}x40"})
    for metric, bounds, counts in (
        ("mlgate_request_latency_seconds", (*LATENCY_BUCKETS_S, float("inf")), latency),
        ("mlgate_score", (*SCORE_BUCKETS, float("inf")), scores),
    ):
        assert len(bounds) == len(counts)
        cumulative = 0
        for bound, c in zip(bounds, counts, strict=True):
            cumulative += c
            out.append(
                {
                    "series": f'{metric}_bucket{{{base},le="{_le(bound)}"}}',
                    "values": f"0+{cumulative}x40",
                }
            )
        out.append({"series": f"{metric}_count{{{base}}}", "values": f"0+{cumulative}x40"})
    return out


def _window(side: str, numbers: Side) -> VariantWindow:
    ok, err, latency, scores, cpu, gpu = numbers
    n = WINDOW_STEPS
    return VariantWindow(
        variant=side,
        version="1",
        seconds=STEP_S * n,
        requests=(ok + err) * n,
        server_errors=err * n,
        latency=Histogram((*LATENCY_BUCKETS_S, float("inf")), tuple(float(c * n) for c in latency)),
        scores=Histogram((*SCORE_BUCKETS, float("inf")), tuple(float(c * n) for c in scores)),
        cpu_seconds=None if cpu is None else cpu * n,
        gpu_seconds=gpu * n,
    )


def _latency(fast: int, slow: int = 0) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    counts[3] = fast  # <= 5 ms
    counts[7] = slow  # 50-100 ms
    return counts


def _scores(low: int, high: int, invalid: int = 0) -> list[int]:
    counts = [0] * (len(SCORE_BUCKETS) + 1)
    counts[5] = low  # 0.2-0.25
    counts[16] = high  # 0.75-0.8
    counts[-1] = invalid  # above 1 or NaN
    return counts


HEALTHY: Side = (99, 1, _latency(100), _scores(70, 30), 0.5, 0.0)
QUIET: Side = (10, 0, _latency(10), _scores(7, 3), 0.5, 0.0)
P, F, W = GateStatus.PASS, GateStatus.FAIL, GateStatus.INCONCLUSIVE  # W: waits
# name: (stable, canary, the statuses canary.py gives, its verdict).
SCENARIOS: dict[str, tuple[Side, Side, set[GateStatus], GateStatus]] = {
    "passing": (HEALTHY, HEALTHY, {P}, P),
    "failing": (
        HEALTHY,
        (70, 30, _latency(40, 60), _scores(20, 78, invalid=2), 1.5, 0.0),
        {F, P},
        F,
    ),
    "too-little-traffic": (QUIET, QUIET, {W, P}, W),
    # Below min_requests, but errors and a score shift that chance would not give: failures.
    "early-failure": (QUIET, (5, 15, _latency(20), _scores(0, 20), 0.5, 0.0), {F, W, P}, F),
    # 1.4 times the stable's CPU per row: within canary.max_cost_ratio 1.5.
    "costlier-within-bound": (HEALTHY, (*HEALTHY[:4], 0.7, 0.0), {P}, P),
    # The same CPU, but GPU seconds at 3 an hour: 3.4 times the stable's cost per row.
    "gpu-bill": (HEALTHY, (*HEALTHY[:4], 0.5, 0.02), {F, P}, F),
    # A canary that exports no CPU seconds fails the cost check even before min_requests.
    "unpriced-canary": (QUIET, (*QUIET[:4], None, 0.0), {F, W, P}, F),
}
# checks/canary.py's guardrail for each AnalysisTemplate metric.
CANARY_NAMES = {
    "metrics-readable": "metrics",
    "invalid-outputs": "invalid_outputs",
    "error-rate": "error_rate",
    "latency-p99": "latency_p99",
    "score-psi": "score_psi",
    "cost-ratio": "cost_ratio",
    "min-requests": "min_requests",
}


def _alert(name: str, which: str) -> str:
    return f"{name.replace('-', '_')}_{which}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_analysis_queries_agree_with_canary_gate(tmp_path: Path, scenario: str) -> None:
    cfg = _cfg(tmp_path)
    assert cfg.canary.interval_s == STEP_S * WINDOW_STEPS
    stable_numbers, canary_numbers, seen, verdict = SCENARIOS[scenario]
    result = check_canary_step(
        _window("stable", stable_numbers),
        _window("canary", canary_numbers),
        cfg.canary,
        step_percent=25,
        cost=cfg.cost,
    )
    # With both sides readable every guardrail has its row, in GUARDRAILS order.
    assert len(result.checks) == len(GUARDRAILS)
    statuses = {g: row.status for g, row in zip(GUARDRAILS, result.checks, strict=True)}
    # The scenarios do what their names say, so the agreement is not trivially all-waiting.
    assert set(statuses.values()) == seen, statuses
    assert result.status is verdict
    rendered = guardrails(cfg)
    assert [g.name for g in rendered] == list(CANARY_NAMES)

    rules = []
    tests = []
    for g in rendered:
        query = g.query.replace("{{args.canary-hash}}", CANARY).replace(
            "{{args.stable-hash}}", STABLE
        )
        for which, (op, bound) in (("success", g.success), ("failure", g.failure)):
            rules.append(
                {
                    "alert": _alert(g.name, which),
                    "expr": f"({query}) {op} {bound!r}",
                    "labels": {"guardrail": g.name},
                }
            )
        expected = statuses[CANARY_NAMES[g.name]]
        for which, status in (("success", GateStatus.PASS), ("failure", GateStatus.FAIL)):
            tests.append(
                {
                    "eval_time": "5m",
                    "alertname": _alert(g.name, which),
                    "exp_alerts": [{"exp_labels": {"guardrail": g.name}}]
                    if expected is status
                    else [],
                }
            )
    model = cfg.registry.model_name
    series = [
        *_side_series(model, STABLE, stable_numbers),
        *_side_series(model, CANARY, canary_numbers),
    ]
    out = _promtool(tmp_path, rules, {"input_series": series, "alert_rule_test": tests})
    assert out.startswith("rc 0"), f"canary.py: {statuses}\n{out}"


def test_scaling_queries_ask_for_the_replicas_their_targets_give(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    model = cfg.registry.model_name
    queries = scaling_queries(cfg)
    # Three pods of this model (two stable, one canary) and one of another model.
    pods = {
        ("st4bl3", "a"): {"mlgate_batcher_queued_rows": 6, "mlgate_in_flight_requests": 60},
        ("st4bl3", "b"): {"mlgate_batcher_queued_rows": 5, "mlgate_in_flight_requests": 90},
        ("c4n4ry", "c"): {"mlgate_batcher_queued_rows": 3, "mlgate_in_flight_requests": 20},
    }
    series = [
        {"series": f'{metric}{{model_name="other",pod="x"}}', "values": "500+0x40"}
        for metric in ("mlgate_batcher_queued_rows", "mlgate_in_flight_requests")
    ]
    for (template_hash, pod), values in pods.items():
        labels = f'model_name="{model}",rollouts_pod_template_hash="{template_hash}",pod="{pod}"'
        for metric, value in values.items():
            series.append({"series": f"{metric}{{{labels}}}", "values": f"{value}+0x40"})
    metric_of = {
        "queue-depth": "mlgate_batcher_queued_rows",
        "in-flight": "mlgate_in_flight_requests",
    }
    rules, tests = [], []
    for trigger, (query, target) in queries.items():
        total = sum(v[metric_of[trigger]] for v in pods.values())
        # KEDA's AverageValue target: the HPA asks for ceil(total / target) replicas.
        replicas = math.ceil(total / target)
        alert = trigger.replace("-", "_")
        rules.append({"alert": alert, "expr": f"ceil(({query}) / {target}) == {replicas}"})
        tests.append({"eval_time": "5m", "alertname": alert, "exp_alerts": [{"exp_labels": {}}]})
    # 14 queued rows over 4 per replica; 170 in flight over 102 per replica.
    assert [t for _, t in queries.values()] == [4, 102]
    out = _promtool(tmp_path, rules, {"input_series": series, "alert_rule_test": tests})
    assert out.startswith("rc 0"), out
