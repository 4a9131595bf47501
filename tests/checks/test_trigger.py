from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from checks.result import GateResult, GateStatus
from checks.trigger import TriggerState, decide_retraining
from models.config import MonitorConfig

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
    assert "tenure" in ds[0].alerts[0]


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
