"""The canary guardrails on hand-built windows: each one trips for its own reason, a small
window is never a pass, and unreadable numbers fail closed; a rollout's steps summarised."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from checks.canary import (
    GUARDRAILS,
    CanaryStep,
    Histogram,
    VariantWindow,
    analysis_gaps,
    check_canary_step,
    invalid_scores,
    merged_buckets,
    score_psi,
    summarize_steps,
)
from checks.cost import cost_per_1000
from checks.drift import psi
from checks.result import CheckRow, GateResult, GateStatus
from models.config import CanaryConfig, ConfigError, CostConfig, config_from_dict
from services.metrics import LATENCY_BUCKETS_S, SCORE_BUCKETS

pytestmark = pytest.mark.fast

# The service's buckets as `/metrics` exports them: latency in seconds; scores in twentieths
# after one bucket below 0 (invalid outputs), up to +Inf.
LATENCY_BOUNDS = (*LATENCY_BUCKETS_S, math.inf)
SCORE_BOUNDS = (*SCORE_BUCKETS, math.inf)

CFG = CanaryConfig(min_requests=100)


def histogram(values: np.ndarray, bounds: tuple[float, ...]) -> Histogram:
    """Counts per bucket as prometheus-client files them: a value goes to the first bucket
    whose upper bound is >= it."""
    finite = np.asarray(values, dtype=np.float64)
    index = np.searchsorted(np.asarray(bounds), finite, side="left")
    counts = np.bincount(index, minlength=len(bounds))[: len(bounds)]
    return Histogram(bounds, tuple(float(c) for c in counts), float(finite.sum()))


def window(
    variant: str,
    *,
    n: int = 1000,
    errors: int = 0,
    client_errors: int = 0,
    latency_ms: float | np.ndarray = 1.0,
    scores: np.ndarray | None = None,
    seed: int = 0,
    problem: str | None = None,
) -> VariantWindow:
    rng = np.random.default_rng(seed)
    if np.isscalar(latency_ms):
        lat = rng.gamma(4.0, float(latency_ms) / 4.0, n) / 1000.0
    else:
        lat = np.asarray(latency_ms) / 1000.0
    if scores is None:
        scores = rng.beta(0.8, 2.2, n)
    return VariantWindow(
        variant=variant,
        version="2" if variant == "canary" else "1",
        seconds=10.0,
        requests=n,
        server_errors=errors,
        client_errors=client_errors,
        latency=histogram(lat, LATENCY_BOUNDS),
        scores=histogram(scores, SCORE_BOUNDS),
        problem=problem,
    )


def test_twins_pass_every_guardrail() -> None:
    stable = window("stable", n=2000, seed=1)
    canary = window("canary", n=400, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=25)
    assert result.status is GateStatus.PASS, result.reason
    assert [c.status for c in result.checks] == [GateStatus.PASS] * len(GUARDRAILS)
    assert result.evidence["failed_guardrail"] is None
    assert result.metrics["score_psi"] < 0.1
    assert result.metrics["p99_ratio"] == pytest.approx(1.0, abs=0.5)


def test_canary_errors_trip_the_error_rate() -> None:
    stable = window("stable", n=1000, seed=1)
    canary = window("canary", n=200, errors=6, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "error_rate"
    assert result.metrics["error_rate_delta"] == pytest.approx(0.03)
    assert "error_rate" in result.reason


def test_client_errors_both_sides_share_cancel_out() -> None:
    # Clients that send bad rows hit both sides alike: not the canary's doing.
    stable = window("stable", n=1000, client_errors=50, seed=1)
    canary = window("canary", n=200, client_errors=11, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.PASS, result.reason
    assert result.metrics["error_rate_delta"] == pytest.approx(0.005)


def test_canary_refusing_rows_the_stable_scores_trips_the_error_rate() -> None:
    stable = window("stable", n=1000, seed=1)
    canary = window("canary", n=200, client_errors=30, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.evidence["failed_guardrail"] == "error_rate"


def test_slow_canary_trips_the_p99_ratio() -> None:
    stable = window("stable", latency_ms=1.0, seed=1)
    canary = window("canary", n=200, latency_ms=12.0, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "latency_p99"
    assert result.metrics["p99_ratio"] > 5
    assert result.metrics["canary_p99_ms"] > result.metrics["stable_p99_ms"] + 10


def test_large_ratio_within_the_absolute_slack_passes() -> None:
    # 0.6 ms against 1.5 ms at p99 is 2.5x, and scheduler noise on a busy host.
    stable = window("stable", latency_ms=0.3, seed=1)
    canary = window("canary", n=200, latency_ms=0.8, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.metrics["p99_ratio"] > CFG.max_p99_ratio
    assert result.status is GateStatus.PASS, result.reason
    latency = result.checks[GUARDRAILS.index("latency_p99")]
    assert latency.detail == "within the slack"


def test_shifted_scores_trip_the_psi() -> None:
    rng = np.random.default_rng(3)
    collapsed = np.clip(rng.normal(0.27, 0.02, 200), 0, 1)
    stable = window("stable", seed=1)
    canary = window("canary", n=200, scores=collapsed, seed=2)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "score_psi"
    assert result.metrics["score_psi"] > 1.0


@pytest.mark.parametrize("n_canary", [20, 30, 100])
def test_psi_of_twins_fails_about_once_in_a_thousand_windows(n_canary: int) -> None:
    """Raw PSI of 30 rows against 600 exceeds 0.25 in ~3 % of windows of one distribution;
    the gate fails only beyond the noise bound as well, and still catches a real shift."""
    rng = np.random.default_rng(11)
    stable_n, draws = 600, 500
    false_fails = 0
    for _ in range(draws):
        stable = window("stable", n=stable_n, scores=rng.beta(0.8, 2.2, stable_n))
        canary = window("canary", n=n_canary, scores=rng.beta(0.8, 2.2, n_canary))
        result = check_canary_step(stable, canary, CFG, step_percent=5)
        false_fails += result.checks[GUARDRAILS.index("score_psi")].status is GateStatus.FAIL
    assert false_fails <= 2
    collapsed = np.clip(rng.normal(0.27, 0.02, n_canary), 0, 1)
    shifted = check_canary_step(
        window("stable", n=stable_n),
        window("canary", n=n_canary, scores=collapsed),
        CFG,
        step_percent=5,
    )
    assert shifted.evidence["failed_guardrail"] == "score_psi"


def test_psi_is_the_drift_gate_psi_on_the_merged_bins() -> None:
    rng = np.random.default_rng(5)
    stable = histogram(rng.beta(0.8, 2.2, 1000), SCORE_BOUNDS)
    canary = histogram(rng.beta(1.2, 2.0, 300), SCORE_BOUNDS)
    value, bins = score_psi(stable, canary, 10)
    ref = np.asarray(stable.counts)
    cur = np.asarray(canary.counts)
    groups = merged_buckets(ref, 10)
    assert len(groups) == bins
    assert [i for g in groups for i in g] == list(range(len(SCORE_BOUNDS)))
    ref_m = np.array([ref[g].sum() for g in groups])
    cur_m = np.array([cur[g].sum() for g in groups])
    assert value == pytest.approx(psi(ref_m / ref_m.sum(), cur_m, ref_count=ref_m.sum()))


def test_merged_buckets_give_a_dominant_bucket_its_own_group() -> None:
    groups = merged_buckets(np.array([10.0, 0, 0, 30, 60]), 2)
    assert groups == [[0, 1, 2, 3], [4]]


def test_invalid_outputs_fail_even_in_a_small_window() -> None:
    scores = np.array([0.2] * 9 + [1.5])
    canary = window("canary", n=10, scores=scores)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "invalid_outputs"
    assert result.metrics["invalid_outputs"] == 1


def test_nan_score_is_counted_from_the_histogram_sum() -> None:
    counts = [0.0] * len(SCORE_BOUNDS)
    counts[1] = 1.0  # a score in [0, 0.05]: valid, but the sum is NaN
    h = Histogram(SCORE_BOUNDS, tuple(counts), math.nan)
    assert invalid_scores(h) == 1


def test_too_few_requests_is_inconclusive_never_pass() -> None:
    stable = window("stable", n=1000)
    canary = window("canary", n=CFG.min_requests - 1)
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.INCONCLUSIVE
    assert "inconclusive" in result.reason
    statuses = {g: result.checks[i].status for i, g in enumerate(GUARDRAILS)}
    assert statuses["min_requests"] is GateStatus.INCONCLUSIVE
    for g in ("error_rate", "latency_p99", "score_psi"):
        assert statuses[g] is GateStatus.INCONCLUSIVE


def test_errors_beyond_chance_fail_before_min_requests() -> None:
    canary = window("canary", n=15, errors=5)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "error_rate"
    assert result.metrics["error_rate_p_value"] < 0.001


def test_one_error_in_a_small_window_waits_for_more() -> None:
    canary = window("canary", n=20, errors=1)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is GateStatus.INCONCLUSIVE
    assert result.metrics["error_rate_p_value"] > 0.001


def test_psi_over_the_bound_but_within_noise_waits_for_more() -> None:
    cfg = CanaryConfig(min_requests=10)
    stable = Histogram(SCORE_BOUNDS, tuple([0.0] + [30.0] * 20 + [0.0]))
    lower, upper = [1.0] * 4 + [0.0] * 6, [2.0] * 6 + [1.0] * 4
    canary = Histogram(SCORE_BOUNDS, tuple([0.0, *lower, *upper, 0.0]))
    base = window("x")
    result = check_canary_step(
        VariantWindow("stable", "1", 10.0, requests=600, latency=base.latency, scores=stable),
        VariantWindow("canary", "2", 10.0, requests=20, latency=base.latency, scores=canary),
        cfg,
        step_percent=5,
    )
    assert cfg.max_score_psi <= result.metrics["score_psi"] < result.metrics["score_psi_noise"]
    assert result.status is GateStatus.INCONCLUSIVE
    assert "sampling noise" in result.reason


def test_too_few_requests_with_errors_is_still_not_a_pass() -> None:
    canary = window("canary", n=10, errors=10)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is not GateStatus.PASS


@pytest.mark.parametrize("side", ["stable", "canary"])
def test_unreadable_metrics_on_either_side_fail_closed(side: str) -> None:
    broken = VariantWindow(side, "1", 10.0, problem="/metrics unreachable: timed out")
    stable = broken if side == "stable" else window("stable")
    canary = broken if side == "canary" else window("canary")
    result = check_canary_step(stable, canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "metrics"
    assert "unreachable" in result.reason


def test_missing_score_histogram_fails() -> None:
    canary = VariantWindow("canary", "2", 10.0, requests=500, latency=window("x").latency)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "score_psi"


def test_an_error_inside_the_gate_fails_closed() -> None:
    other = Histogram((0.5, math.inf), (1.0, 1.0))
    canary = VariantWindow("canary", "2", 10.0, requests=500, latency=other, scores=other)
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    assert result.status is GateStatus.FAIL
    assert "canary gate error" in result.reason


def test_first_failing_guardrail_in_order_is_the_reported_one() -> None:
    rng = np.random.default_rng(3)
    canary = window("canary", n=200, errors=50, latency_ms=20.0, scores=rng.uniform(0.9, 1.0, 200))
    result = check_canary_step(window("stable"), canary, CFG, step_percent=5)
    failed = [g for i, g in enumerate(GUARDRAILS) if result.checks[i].status is GateStatus.FAIL]
    assert failed == ["error_rate", "latency_p99", "score_psi"]
    assert result.evidence["failed_guardrail"] == "error_rate"


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    h = Histogram.from_cumulative([(0.001, 50), (0.002, 90), (0.005, 100), (math.inf, 100)])
    assert h.count == 100
    assert h.quantile(0.5) == pytest.approx(0.001)
    assert h.quantile(0.99) == pytest.approx(0.002 + 0.003 * 0.9)
    beyond = Histogram.from_cumulative([(0.001, 1), (math.inf, 100)])
    assert beyond.quantile(0.99) == math.inf
    assert math.isnan(Histogram.from_cumulative([(math.inf, 0)]).quantile(0.99))


def test_histogram_difference_refuses_a_counter_reset() -> None:
    later = Histogram.from_cumulative([(0.001, 5), (math.inf, 5)])
    earlier = Histogram.from_cumulative([(0.001, 9), (math.inf, 9)])
    with pytest.raises(ValueError, match="counter reset"):
        later.minus(earlier)


def test_window_and_result_survive_json() -> None:
    stable, canary = window("stable"), window("canary", n=300)
    result = check_canary_step(stable, canary, CFG, step_percent=50)
    again = GateResult.from_dict(result.to_dict())
    assert again.status is result.status and again.checks == result.checks
    assert VariantWindow.from_dict(canary.to_dict()) == canary


@pytest.mark.parametrize(
    "steps", [(100,), (5, 25), (25, 5, 100), (5, 5, 100), (0, 50, 100), (50, 100, 150)]
)
def test_config_refuses_steps_that_do_not_climb_to_100(steps: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="steps"):
        config_from_dict(
            {
                "dataset": {"path": "x.csv", "target": "y", "numeric_features": ["a"]},
                "canary": {"steps": list(steps)},
            }
        )


def test_default_config_is_the_issue_s_plan() -> None:
    cfg = CanaryConfig()
    assert cfg.steps == (5, 25, 50, 100)
    assert cfg.max_wait_s >= cfg.interval_s


# --- a whole rollout ------------------------------------------------------------------------


def passed_step(percent: int, candidate: str = "2", **metrics: float) -> CanaryStep:
    stable = window("stable", n=2000, seed=percent)
    canary = window("canary", n=400, seed=percent + 1)
    result = check_canary_step(stable, canary, CFG, step_percent=percent)
    assert result.status is GateStatus.PASS, result.reason
    if metrics:
        result = GateResult(
            result.name,
            result.status,
            result.reason,
            {**result.metrics, **metrics},
            result.evidence,
            result.checks,
        )
    counts = {"stable": {"responses": 2000}, "canary": {"responses": 400}}
    return CanaryStep(percent, result, candidate, 0.0, 10.0, 10.0, counts)


def test_a_step_survives_its_json_shape() -> None:
    step = passed_step(25)
    d = step.to_dict()
    assert list(d) == [
        "percent",
        "candidate_version",
        "started_at",
        "ended_at",
        "seconds",
        "haproxy",
        "result",
    ]
    assert CanaryStep.from_dict(d).to_dict() == d


def test_analysis_gaps_name_what_a_rollout_lacks() -> None:
    steps = [5, 25, 100]
    done = [passed_step(5), passed_step(25), passed_step(100)]
    assert analysis_gaps(done, candidate_version="2", steps=steps) == ""
    assert "[5, 25], configured [5, 25, 100]" in analysis_gaps(
        done[:2], candidate_version="2", steps=steps
    )
    # A step analysed for the candidate this one replaced does not count.
    replaced = [passed_step(5, candidate="1"), *done[1:]]
    assert analysis_gaps(replaced, candidate_version="2", steps=steps).startswith(
        "steps analysed [25, 100]"
    )
    failed = replace(done[1], result=replace(done[1].result, status=GateStatus.FAIL))
    assert analysis_gaps([done[0], failed, done[2]], candidate_version="2", steps=steps) == (
        "steps [25] did not pass"
    )


def test_the_summary_keeps_the_worst_numbers_of_every_step() -> None:
    done = [passed_step(5, p99_ratio=1.4), passed_step(50, p99_ratio=1.1, score_psi=math.nan)]
    summary = summarize_steps(done, candidate_version="2", stable_version="1", steps=[5, 50])
    assert summary.status is GateStatus.PASS and summary.name == "canary"
    assert summary.metrics["steps"] == 2.0
    assert summary.metrics["p99_ratio"] == 1.4
    assert summary.metrics["canary_requests"] == 800.0
    assert summary.metrics["score_psi"] == done[0].result.metrics["score_psi"]
    assert summary.reason.startswith("v2 against v1 over steps 5%, 50%: 800 canary requests")
    assert [c.check for c in summary.checks] == ["step 5%", "step 50%"]
    assert [s["percent"] for s in summary.evidence["steps"]] == [5, 50]
    assert "result" not in summary.evidence["steps"][0]
    assert summary.evidence["results"] == [s.result.to_dict() for s in done]
    empty = summarize_steps([], candidate_version="2", stable_version="1", steps=[5])
    assert empty.status is GateStatus.FAIL


# --- cost -----------------------------------------------------------------------------------


def costed(w: VariantWindow, cpu_ms_per_row: float, gpu_s: float = 0.0) -> VariantWindow:
    """`w` with the CPU seconds of `cpu_ms_per_row` per row scored, and `gpu_s` GPU seconds."""
    return replace(w, cpu_seconds=w.rows * cpu_ms_per_row / 1000.0, gpu_seconds=gpu_s)


def cost_row(result: GateResult) -> CheckRow:
    return result.checks[GUARDRAILS.index("cost_ratio")]


def test_cost_ratio_is_reported_but_not_judged_unless_configured() -> None:
    stable = costed(window("stable", n=2000, seed=1), 1.0)
    canary = costed(window("canary", n=2000, seed=2), 3.0)
    result = check_canary_step(stable, canary, CFG, step_percent=50)
    assert result.status is GateStatus.PASS, result.reason
    assert result.metrics["cost_ratio"] == pytest.approx(3.0)
    # 1 ms of CPU per row at the default 0.05 per core-hour.
    assert result.metrics["cost_per_1000_stable"] == pytest.approx(0.05 / 3600)
    assert result.metrics["cost_per_1000_canary"] == pytest.approx(3 * 0.05 / 3600)
    assert cost_row(result).bound == "not judged"


def test_a_canary_that_costs_too_much_per_row_fails() -> None:
    cfg = CanaryConfig(min_requests=100, max_cost_ratio=1.5)
    stable = costed(window("stable", n=2000, seed=1), 1.0)
    dearer = costed(window("canary", n=2000, seed=2), 2.0)
    result = check_canary_step(stable, dearer, cfg, step_percent=50)
    assert result.status is GateStatus.FAIL
    assert result.evidence["failed_guardrail"] == "cost_ratio"
    assert "cost_ratio" in result.reason
    cheaper = costed(window("canary", n=2000, seed=2), 1.2)
    assert check_canary_step(stable, cheaper, cfg, step_percent=50).status is GateStatus.PASS


def test_gpu_seconds_are_priced_by_the_cost_config() -> None:
    cfg = CanaryConfig(min_requests=100, max_cost_ratio=1.5)
    stable = costed(window("stable", n=2000, seed=1), 1.0)
    # Half the CPU per row, but a GPU held for the whole 10 s window.
    gpu = costed(window("canary", n=2000, seed=2), 0.5, gpu_s=10.0)
    free_gpu = CostConfig(price_per_core_hour=0.05, price_per_gpu_hour=0.0)
    dear_gpu = CostConfig(price_per_core_hour=0.05, price_per_gpu_hour=3.0)
    assert check_canary_step(stable, gpu, cfg, step_percent=50, cost=free_gpu).passed
    result = check_canary_step(stable, gpu, cfg, step_percent=50, cost=dear_gpu)
    assert result.evidence["failed_guardrail"] == "cost_ratio"
    want = cost_per_1000(1.0, 10.0, 2000, dear_gpu) / cost_per_1000(2.0, 0.0, 2000, dear_gpu)
    assert result.metrics["cost_ratio"] == pytest.approx(want)


def test_cost_waits_for_min_requests_and_fails_closed_without_cpu_seconds() -> None:
    cfg = CanaryConfig(min_requests=100, max_cost_ratio=1.5)
    stable = costed(window("stable", n=2000, seed=1), 1.0)
    few = costed(window("canary", n=50, seed=2), 5.0)
    result = check_canary_step(stable, few, cfg, step_percent=5)
    assert result.status is GateStatus.INCONCLUSIVE
    assert cost_row(result).status is GateStatus.INCONCLUSIVE
    # A stable started before the counters existed: never a pass, said plainly.
    old = window("stable", n=2000, seed=1)
    result = check_canary_step(old, costed(window("canary", seed=2), 1.0), cfg, step_percent=5)
    assert result.evidence["failed_guardrail"] == "cost_ratio"
    assert "stable exports no CPU seconds" in cost_row(result).detail
    assert math.isnan(result.metrics["cost_ratio"])


def test_cost_survives_json_and_reaches_the_summary() -> None:
    w = costed(window("canary", n=300), 1.0, gpu_s=2.0)
    assert VariantWindow.from_dict(w.to_dict()) == w
    legacy = {k: v for k, v in w.to_dict().items() if k not in ("cpu_seconds", "gpu_seconds")}
    assert VariantWindow.from_dict(legacy).cpu_seconds is None
    done = [
        passed_step(5, cost_ratio=2.5, cost_per_1000_canary=5.0, cost_per_1000_stable=2.0),
        passed_step(50, cost_ratio=1.1, cost_per_1000_canary=2.2, cost_per_1000_stable=2.0),
        passed_step(100),
    ]
    summary = summarize_steps(done, candidate_version="2", stable_version="1", steps=[5, 50, 100])
    assert summary.metrics["cost_ratio"] == 1.1
    assert summary.metrics["cost_per_1000_canary"] == 2.2
    assert summary.metrics["cost_per_1000_stable"] == 2.0
