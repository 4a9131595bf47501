"""Estimated-performance gate: the champion's ROC AUC on a window, estimated from its scores
before the labels arrive, against its holdout ROC AUC.

A drop beyond `monitor.max_estimated_drop` fails the gate, which the trigger policy counts
like a drifted window. A window too small for the drift gate is too small here as well:
inconclusive, never a drop, and so is a version stored without a calibrator.
"""

from __future__ import annotations

import math

import numpy as np

from checks.drift import Traffic
from checks.result import CheckRow, GateResult, GateStatus, fmt_number
from models.performance_estimate import Calibrator, estimate_performance

NAME = "estimated_performance"


def check_estimated_performance(
    calibrator: Calibrator | None,
    scores: np.ndarray,
    traffic: Traffic,
    max_drop: float,
) -> GateResult:
    try:
        return _check(calibrator, np.asarray(scores, dtype=np.float64), traffic, max_drop)
    except Exception as err:  # a gate fails closed; an estimate that cannot be made is no drop
        return _inconclusive(f"estimate error: {type(err).__name__}: {err}", traffic, {})


def _check(
    calibrator: Calibrator | None, scores: np.ndarray, traffic: Traffic, max_drop: float
) -> GateResult:
    rows = {"rows": float(scores.size)}
    if calibrator is None:
        return _inconclusive(
            "no calibrator stored with the champion (trained before performance estimation)",
            traffic,
            rows,
        )
    if traffic is not Traffic.ENOUGH:
        return _inconclusive(
            f"{traffic.value}: {scores.size:,} rows are too few to estimate on", traffic, rows
        )
    estimate = estimate_performance(calibrator, scores)
    holdout = calibrator.holdout.get("roc_auc", math.nan)
    drop = holdout - estimate.roc_auc
    metrics = {
        **rows,
        **estimate.metrics("estimated_"),
        "holdout_roc_auc": holdout,
        "estimated_drop": drop,
    }
    if not math.isfinite(drop):
        return _inconclusive(
            f"no estimated drop: estimated roc_auc {fmt_number(estimate.roc_auc)}, holdout "
            f"roc_auc {fmt_number(holdout)}",
            traffic,
            metrics,
        )
    status = GateStatus.FAIL if drop > max_drop else GateStatus.PASS
    row = CheckRow(
        "estimated roc_auc drop",
        status,
        fmt_number(drop),
        f"<= {fmt_number(max_drop)}",
        f"estimated {fmt_number(estimate.roc_auc)} vs holdout {fmt_number(holdout)}; "
        f"precision {fmt_number(estimate.precision)}, recall {fmt_number(estimate.recall)} "
        f"at {fmt_number(calibrator.threshold)}",
    )
    verb = "exceeds" if status is GateStatus.FAIL else "within"
    reason = (
        f"estimated roc_auc {estimate.roc_auc:.4f} vs holdout {holdout:.4f}: drop {drop:.4f} "
        f"{verb} {max_drop:g}"
    )
    return GateResult(NAME, status, reason, metrics, {"traffic": traffic.value}, (row,))


def _inconclusive(reason: str, traffic: Traffic, metrics: dict[str, float]) -> GateResult:
    return GateResult(
        NAME, GateStatus.INCONCLUSIVE, reason, metrics, evidence={"traffic": traffic.value}
    )
