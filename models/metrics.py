"""Classification metrics on the holdout."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    roc_auc_score,
)

# Metrics where larger is better; log loss and Brier are negated for the gate so that every
# primary metric reads the same way.
_METRICS = {
    "roc_auc": lambda y, p: roc_auc_score(y, p),
    "pr_auc": lambda y, p: average_precision_score(y, p),
    "f1": lambda y, p: f1_score(y, (p >= 0.5).astype(int), zero_division=0),
    "neg_log_loss": lambda y, p: -log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]),
    "neg_brier": lambda y, p: -brier_score_loss(y, p),
}


def metric_value(name: str, y: np.ndarray, p: np.ndarray) -> float:
    """NaN when the metric is undefined (empty input, a single class, NaN scores)."""
    if len(y) == 0 or not np.all(np.isfinite(p)):
        return math.nan
    if name in ("roc_auc", "pr_auc") and len(np.unique(y)) < 2:
        return math.nan
    return float(_METRICS[name](y, p))


def evaluate(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "roc_auc": metric_value("roc_auc", y, p),
        "pr_auc": metric_value("pr_auc", y, p),
        "log_loss": -metric_value("neg_log_loss", y, p),
        "brier": -metric_value("neg_brier", y, p),
        "f1": metric_value("f1", y, p),
    }
