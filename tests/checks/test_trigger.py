from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from checks.drift import check_drift
from checks.result import GateResult, GateStatus
from checks.trigger import AlertKind, TriggerState, decide_retraining
from models.config import DriftGateConfig, MonitorConfig
from models.reference import ReferenceHistograms, compute_feature_histogram

pytestmark = pytest.mark.fast

CFG = MonitorConfig(consecutive_windows=3, cooldown_hours=6, max_retrains_per_day=2)
T0 = datetime(2026, 11, 1, tzinfo=UTC)
DRIFT = GateResult("drift", GateStatus.FAIL, "contract psi 0.4")
CALM = GateResult("drift", GateStatus.PASS, "all below 0.1")
THIN = GateResult("drift", GateStatus.INCONCLUSIVE, "12 rows < 200")
DQ_OK = GateResult("data", GateStatus.PASS, "ok")
DQ_BAD = GateResult("data", GateStatus.FAIL, "tenure: 40% nulls")


def run(windows, state=TriggerState(), start=T0, step=timedelta(hours=1), dq=DQ_OK):
    decisions = []
    for i, drift in enumerate(windows):
        d = decide_retraining(state, data_quality=dq, drift=drift, now=start + i * step, cfg=CFG)
        decisions.append(d)
        state = d.state
    return decisions


def test_needs_n_consecutive_drifted_windows():
    ds = run([DRIFT, DRIFT, DRIFT])
    assert [d.retrain for d in ds] == [False, False, True]
    assert "2 of 3" in ds[1].reason
    assert ds[2].state.consecutive_drift == 0 and ds[2].state.last_retrain_at == T0 + timedelta(
        hours=2
    )


def test_a_calm_window_resets_the_streak():
    ds = run([DRIFT, DRIFT, CALM, DRIFT, DRIFT])
    assert not any(d.retrain for d in ds)
    assert ds[-1].state.consecutive_drift == 2


def test_inconclusive_window_neither_counts_nor_resets():
    ds = run([DRIFT, THIN, DRIFT, THIN, DRIFT])
    assert [d.retrain for d in ds] == [False, False, False, False, True]
    assert ds[1].state.consecutive_drift == 1


def test_data_quality_failure_never_triggers_and_alerts():
    ds = run([DRIFT] * 5, dq=DQ_BAD)
    assert not any(d.retrain for d in ds)
    assert all(d.state.consecutive_drift == 0 for d in ds)
    assert ds[0].alerts[0].kind is AlertKind.DATA_QUALITY and "tenure" in ds[0].alerts[0].message


def test_cooldown_then_budget():
    ds = run([DRIFT] * 3)
    fired = ds[-1].state
    during = run([DRIFT] * 3, state=fired, start=T0 + timedelta(hours=3))
    assert not any(d.retrain for d in during) and "cooldown" in during[-1].reason
    after = run([DRIFT] * 3, state=fired, start=T0 + timedelta(hours=9))
    assert after[-1].retrain
    budget_cfg = MonitorConfig(consecutive_windows=1, cooldown_hours=0, max_retrains_per_day=2)
    state = TriggerState()
    fired_count = 0
    for i in range(5):
        d = decide_retraining(
            state, data_quality=None, drift=DRIFT, now=T0 + timedelta(hours=i), cfg=budget_cfg
        )
        fired_count += d.retrain
        state = d.state
    assert fired_count == 2 and "budget" in d.reason
    nextday = decide_retraining(
        state, data_quality=None, drift=DRIFT, now=T0 + timedelta(days=1, hours=1), cfg=budget_cfg
    )
    assert nextday.retrain


def test_state_round_trips():
    state = run([DRIFT] * 3)[-1].state
    assert TriggerState.from_dict(state.to_dict()) == state


# The real drift gate on a one-feature window, so the trigger sees what monitoring hands it.
REFERENCE = ReferenceHistograms(
    {"x": compute_feature_histogram("x", np.random.default_rng(0).normal(size=2000), "numeric", 10)}
)
SHIFTED = np.random.default_rng(1).normal(3.0, 1.0, 500)


def _gate(window: pd.DataFrame) -> GateResult:
    return check_drift(window, REFERENCE, DriftGateConfig(min_rows=200))


def test_empty_windows_alert_no_traffic_and_neither_count_nor_reset():
    drifted, empty = _gate(pd.DataFrame({"x": SHIFTED})), _gate(pd.DataFrame({"x": []}))
    assert drifted.status is GateStatus.FAIL
    ds = run([drifted, empty, empty, empty, drifted, drifted], dq=None)
    assert [d.retrain for d in ds] == [False] * 5 + [True]
    assert [d.state.consecutive_drift for d in ds[:5]] == [1, 1, 1, 1, 2]
    for d in ds[1:4]:
        assert [a.kind for a in d.alerts] == [AlertKind.NO_TRAFFIC]
        assert "no traffic" in d.reason and "no traffic" in d.alerts[0].message
    assert not ds[0].alerts and not ds[4].alerts


def test_thin_windows_never_count_even_when_their_gate_fails():
    drifted = _gate(pd.DataFrame({"x": SHIFTED}))
    thin = _gate(pd.DataFrame({"x": SHIFTED[:50]}))
    broken_thin = _gate(pd.DataFrame({"y": SHIFTED[:50]}))  # the column is missing
    assert thin.status is GateStatus.INCONCLUSIVE and broken_thin.status is GateStatus.FAIL
    ds = run([drifted, thin, broken_thin, broken_thin, drifted])
    assert [d.retrain for d in ds] == [False] * 5
    assert [d.state.consecutive_drift for d in ds] == [1, 1, 1, 1, 2]
    assert all("inconclusive" in d.reason and not d.alerts for d in ds[1:4])


# An estimated performance drop counts like drift, with a streak of its own.
DROP = GateResult("estimated_performance", GateStatus.FAIL, "drop 0.12 exceeds 0.05")
HELD = GateResult("estimated_performance", GateStatus.PASS, "drop 0.01 within 0.05")
NO_ESTIMATE = GateResult("estimated_performance", GateStatus.INCONCLUSIVE, "too_thin")


def run_with_estimates(drifts, estimates, state=TriggerState()):
    decisions = []
    for i, (drift, estimate) in enumerate(zip(drifts, estimates, strict=True)):
        d = decide_retraining(
            state,
            data_quality=DQ_OK,
            drift=drift,
            now=T0 + i * timedelta(hours=1),
            cfg=CFG,
            estimate=estimate,
        )
        decisions.append(d)
        state = d.state
    return decisions


def test_an_estimated_drop_held_for_n_windows_triggers_without_drift():
    ds = run_with_estimates([CALM] * 3, [DROP] * 3)
    assert [d.retrain for d in ds] == [False, False, True]
    assert "estimated drop in 2 of 3" in ds[1].reason and "no drift" in ds[1].reason
    assert ds[2].reason.startswith("estimated drop held for 3 consecutive windows")
    fired = ds[2].state
    assert fired.consecutive_drift == fired.consecutive_estimated_drop == 0


def test_the_estimate_streak_resets_on_a_held_window_and_skips_inconclusive_ones():
    ds = run_with_estimates([CALM] * 5, [DROP, NO_ESTIMATE, DROP, HELD, DROP])
    assert not any(d.retrain for d in ds)
    assert [d.state.consecutive_estimated_drop for d in ds] == [1, 1, 2, 0, 1]
    assert "estimated-drop streak of 2 reset" in ds[3].reason


def test_thin_or_empty_windows_never_count_an_estimated_drop():
    ds = run_with_estimates([DRIFT, THIN, THIN, THIN], [DROP, DROP, DROP, DROP])
    assert not any(d.retrain for d in ds)
    assert [d.state.consecutive_estimated_drop for d in ds] == [1, 1, 1, 1]
    empty = _gate(pd.DataFrame({"x": []}))
    d = decide_retraining(
        ds[-1].state, data_quality=None, drift=empty, now=T0, cfg=CFG, estimate=DROP
    )
    assert not d.retrain and d.state.consecutive_estimated_drop == 1


def test_drift_and_an_estimated_drop_share_the_cooldown():
    fired = run_with_estimates([DRIFT] * 3, [HELD] * 3)[-1].state
    ds = run_with_estimates([CALM] * 3, [DROP] * 3, state=fired)
    assert not ds[-1].retrain and ds[-1].reason.startswith("estimated drop held, but in cooldown")


def test_state_from_before_estimates_still_reads():
    old: dict[str, Any] = {"consecutive_drift": 2, "last_retrain_at": None, "retrains": []}
    assert TriggerState.from_dict(old) == TriggerState(consecutive_drift=2)
