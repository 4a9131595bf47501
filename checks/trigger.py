"""When drift becomes retraining: hysteresis, cooldown and a daily budget.

A pure function over the previous state and this window's gate results, so the policy is
testable without a scheduler and the state can live in any store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from checks.result import GateResult, GateStatus
from models.config import MonitorConfig


@dataclass(frozen=True)
class TriggerState:
    consecutive_drift: int = 0
    last_retrain_at: datetime | None = None
    retrains: tuple[datetime, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_retrain_at"] = self.last_retrain_at.isoformat() if self.last_retrain_at else None
        d["retrains"] = [t.isoformat() for t in self.retrains]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerState:
        last = d.get("last_retrain_at")
        return cls(
            consecutive_drift=int(d.get("consecutive_drift", 0)),
            last_retrain_at=datetime.fromisoformat(last) if last else None,
            retrains=tuple(datetime.fromisoformat(t) for t in d.get("retrains", [])),
        )


@dataclass(frozen=True)
class TriggerDecision:
    retrain: bool
    reason: str
    state: TriggerState
    alerts: tuple[str, ...] = field(default_factory=tuple)


def decide_retraining(
    state: TriggerState,
    *,
    data_quality: GateResult | None,
    drift: GateResult,
    now: datetime,
    cfg: MonitorConfig,
) -> TriggerDecision:
    """Drift must hold for `consecutive_windows` windows in a row. A data-quality failure is
    an alert, not drift: it neither counts nor resets the streak, and neither does an
    inconclusive window (too little traffic says nothing either way)."""
    alerts: list[str] = []
    if data_quality is not None and not data_quality.passed:
        alerts.append(f"data quality {data_quality.status.value}: {data_quality.reason}")
        reason = "data-quality failure is an alert, not drift: no retraining"
        return TriggerDecision(False, reason, state, tuple(alerts))
    if drift.status is GateStatus.INCONCLUSIVE:
        return TriggerDecision(False, f"inconclusive window: {drift.reason}", state)
    if drift.status is GateStatus.PASS:
        streak_was = state.consecutive_drift
        calm = replace(state, consecutive_drift=0)
        note = f" (drift streak of {streak_was} reset)" if streak_was else ""
        return TriggerDecision(False, f"no drift{note}", calm)

    streak = state.consecutive_drift + 1
    drifting = replace(state, consecutive_drift=streak)
    if streak < cfg.consecutive_windows:
        return TriggerDecision(
            False,
            f"drift in {streak} of {cfg.consecutive_windows} consecutive windows needed",
            drifting,
        )
    if state.last_retrain_at is not None:
        ready_at = state.last_retrain_at + timedelta(hours=cfg.cooldown_hours)
        if now < ready_at:
            return TriggerDecision(
                False, f"drift held, but in cooldown until {ready_at.isoformat()}", drifting
            )
    recent = tuple(t for t in state.retrains if now - t < timedelta(days=1))
    if len(recent) >= cfg.max_retrains_per_day:
        return TriggerDecision(
            False,
            f"drift held, but the budget of {cfg.max_retrains_per_day} retrains per day is spent",
            replace(drifting, retrains=recent),
        )
    fired = TriggerState(consecutive_drift=0, last_retrain_at=now, retrains=(*recent, now))
    return TriggerDecision(
        True, f"drift held for {streak} consecutive windows: {drift.reason}", fired
    )
