"""`GateResult`: the verdict every gate returns, and how a person reads it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class CheckRow:
    """One line of a gate's table: which check, the number seen, the bound it was held to."""

    check: str
    status: GateStatus
    value: str
    bound: str
    detail: str = ""


@dataclass(frozen=True)
class GateResult:
    name: str
    status: GateStatus
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    checks: tuple[CheckRow, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status is GateStatus.PASS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["metrics"] = {k: _json_float(v) for k, v in self.metrics.items()}
        d["checks"] = [{**asdict(c), "status": c.status.value} for c in self.checks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(
            name=d["name"],
            status=GateStatus(d["status"]),
            reason=d["reason"],
            metrics={k: (math.nan if v is None else float(v)) for k, v in d["metrics"].items()},
            evidence=d.get("evidence", {}),
            checks=tuple(
                CheckRow(**{**c, "status": GateStatus(c["status"])}) for c in d.get("checks", [])
            ),
        )


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def worst_status(statuses: list[GateStatus]) -> GateStatus:
    """A gate made of checks is as good as its worst check; no checks at all is inconclusive."""
    if not statuses:
        return GateStatus.INCONCLUSIVE
    if GateStatus.FAIL in statuses:
        return GateStatus.FAIL
    if GateStatus.INCONCLUSIVE in statuses:
        return GateStatus.INCONCLUSIVE
    return GateStatus.PASS


def fmt_number(v: float | int | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 1):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"
