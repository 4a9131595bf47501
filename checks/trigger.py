"""When drift or an estimated performance drop becomes retraining: hysteresis, cooldown and
a daily budget.

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
    consecutive_estimated_drop: int = 0
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
            consecutive_estimated_drop=int(d.get("consecutive_estimated_drop", 0)),
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
    estimate: GateResult | None = None,
) -> TriggerDecision:
    """Drift, or an estimated performance drop (`estimate`, checks/performance.py), must
    hold for `consecutive_windows` windows in a row; each signal keeps its own streak, and
    a window where its gate passes resets it. A window with no traffic is an alert of its
    own (the service may be down or logging elsewhere) and a data-quality failure an alert
    too; neither is drift nor a drop. They neither count nor reset a streak, and neither
    does a thin or otherwise inconclusive window, whatever its gates said: too little
    traffic says nothing either way."""
    traffic = window_traffic(drift)
    if traffic is Traffic.NONE:
        alert = Alert(
            AlertKind.NO_TRAFFIC,
            "no traffic: not one row in a window where the served model should have had "
            "some; is the service up, and writing its inference log where monitoring reads it?",
        )
        reason = "no traffic is an alert, not drift: no retraining, the streaks are kept"
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

    counted = replace(
        state,
        consecutive_drift=_streak(state.consecutive_drift, drift),
        consecutive_estimated_drop=_streak(state.consecutive_estimated_drop, estimate),
    )
    signals = [
        (f"drift held for {counted.consecutive_drift} consecutive windows: {drift.reason}")
        if counted.consecutive_drift >= cfg.consecutive_windows
        else None,
        (
            f"estimated drop held for {counted.consecutive_estimated_drop} consecutive "
            f"windows: {estimate.reason}"
        )
        if estimate is not None and counted.consecutive_estimated_drop >= cfg.consecutive_windows
        else None,
    ]
    held = [s for s in signals if s is not None]
    if not held:
        return TriggerDecision(False, _streaks_reason(state, counted, estimate, cfg), counted)
    what = "drift held" if signals[0] is not None else "estimated drop held"
    if state.last_retrain_at is not None:
        ready_at = state.last_retrain_at + timedelta(hours=cfg.cooldown_hours)
        if now < ready_at:
            return TriggerDecision(
                False, f"{what}, but in cooldown until {ready_at.isoformat()}", counted
            )
    recent = tuple(t for t in state.retrains if now - t < timedelta(days=1))
    if len(recent) >= cfg.max_retrains_per_day:
        return TriggerDecision(
            False,
            f"{what}, but the budget of {cfg.max_retrains_per_day} retrains per day is spent",
            replace(counted, retrains=recent),
        )
    fired = TriggerState(last_retrain_at=now, retrains=(*recent, now))
    return TriggerDecision(True, "; ".join(held), fired)


def _streak(streak: int, gate: GateResult | None) -> int:
    """A failed gate extends the streak, a passed one resets it, no verdict keeps it."""
    if gate is None or gate.status is GateStatus.INCONCLUSIVE:
        return streak
    return streak + 1 if gate.status is GateStatus.FAIL else 0


def _streaks_reason(
    before: TriggerState, after: TriggerState, estimate: GateResult | None, cfg: MonitorConfig
) -> str:
    needed = cfg.consecutive_windows
    parts = []
    if after.consecutive_drift:
        parts.append(f"drift in {after.consecutive_drift} of {needed} consecutive windows needed")
    else:
        was = before.consecutive_drift
        parts.append("no drift" + (f" (drift streak of {was} reset)" if was else ""))
    if after.consecutive_estimated_drop > before.consecutive_estimated_drop:
        parts.append(
            f"estimated drop in {after.consecutive_estimated_drop} of {needed} consecutive "
            "windows needed"
        )
    elif before.consecutive_estimated_drop and not after.consecutive_estimated_drop:
        parts.append(f"estimated-drop streak of {before.consecutive_estimated_drop} reset")
    elif estimate is not None and estimate.status is GateStatus.INCONCLUSIVE:
        parts.append(f"no estimate: {estimate.reason}")
    return "; ".join(parts)
