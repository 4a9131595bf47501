"""When drift becomes retraining: hysteresis, cooldown and a daily budget.

A pure function over the previous state and this window's gate results, so the policy is
testable without a scheduler and the state can live in any store. It also says which
windows a person must hear about (alerts): failed data quality, and no traffic at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from checks.drift import Traffic, window_traffic
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


class AlertKind(StrEnum):
    DATA_QUALITY = "data_quality"
    NO_TRAFFIC = "no_traffic"


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message}


@dataclass(frozen=True)
class TriggerDecision:
    retrain: bool
    reason: str
    state: TriggerState
    alerts: tuple[Alert, ...] = field(default_factory=tuple)


def decide_retraining(
    state: TriggerState,
    *,
    data_quality: GateResult | None,
    drift: GateResult,
    now: datetime,
    cfg: MonitorConfig,
) -> TriggerDecision:
    """Drift must hold for `consecutive_windows` windows in a row. A window with no traffic
    is an alert of its own (the service may be down or logging elsewhere) and a
    data-quality failure an alert too; neither is drift. They neither count nor reset the
    streak, and neither does a thin or otherwise inconclusive window, whatever its gate
    said: too little traffic says nothing either way."""
    traffic = window_traffic(drift)
    if traffic is Traffic.NONE:
        alert = Alert(
            AlertKind.NO_TRAFFIC,
            "no traffic: not one row in a window where the served model should have had "
            "some; is the service up, and writing its inference log where monitoring reads it?",
        )
        reason = "no traffic is an alert, not drift: no retraining, the drift streak is kept"
        return TriggerDecision(False, reason, state, (alert,))
    if data_quality is not None and not data_quality.passed:
        alert = Alert(
            AlertKind.DATA_QUALITY,
            f"data quality {data_quality.status.value}: {data_quality.reason}",
        )
        reason = "data-quality failure is an alert, not drift: no retraining"
        return TriggerDecision(False, reason, state, (alert,))
    if traffic is Traffic.THIN or drift.status is GateStatus.INCONCLUSIVE:
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
