"""Performance before labels: a calibrator fitted on the holdout, and the ROC AUC, precision
and recall it expects of a window from the served model's scores alone (the CBPE idea).

With calibrated probabilities p_i, each row is a positive with probability p_i, so the
confusion counts at a threshold t have expectations: TP = sum of p_i over rows scored >= t,
FP = sum of (1 - p_i) over the same rows, FN = sum of p_i over the rows below t. The
expected ROC AUC weighs every ordered pair of rows (i above j) by p_i (1 - p_j), the chance
that it is a (positive, negative) pair. The estimate is only as good as the calibration:
it holds under covariate shift (the rows change, P(y | score) does not), and it cannot see
concept drift, where the same score comes to mean something else. Realized metrics on
labelled batches show how far to trust it.

The calibrator is an isotonic regression of the labels on the holdout scores, kept with the
model version as JSON (its thresholds), never a pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from models.metrics import metric_value

FORMAT_VERSION = 1
# The threshold a score becomes a positive at: the one the f1 metric and the batch
# scorer's labels use.
DECISION_THRESHOLD = 0.5
ESTIMATED_METRICS = ("roc_auc", "precision", "recall")


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from the served model's score to P(positive): linear interpolation
    between `x` (scores) and `y` (probabilities), flat beyond the ends; with the holdout
    metrics an estimate is compared with."""

    x: list[float]
    y: list[float]
    threshold: float = DECISION_THRESHOLD
    holdout: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method": "isotonic",
            "x": list(self.x),
            "y": list(self.y),
            "threshold": self.threshold,
            # Strict JSON has no NaN: an undefined holdout metric is left out.
            "holdout": {k: v for k, v in self.holdout.items() if math.isfinite(v)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibrator:
        if d.get("format") != FORMAT_VERSION or d.get("method") != "isotonic":
            raise ValueError(
                f"calibrator in format {d.get('format')!r} ({d.get('method')!r}), expected "
                f"{FORMAT_VERSION} (isotonic)"
            )
        x, y = [float(v) for v in d["x"]], [float(v) for v in d["y"]]
        if not x or len(x) != len(y):
            raise ValueError(f"calibrator with {len(x)} scores and {len(y)} probabilities")
        return cls(
            x=x,
            y=y,
            threshold=float(d.get("threshold", DECISION_THRESHOLD)),
            holdout={str(k): float(v) for k, v in d.get("holdout", {}).items()},
        )


@dataclass(frozen=True)
class PerformanceEstimate:
    """ROC AUC, precision and recall at the threshold on `rows` rows; NaN where undefined
    (no rows, one class only, nothing scored positive)."""

    rows: int
    roc_auc: float
    precision: float
    recall: float

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{name}": getattr(self, name) for name in ESTIMATED_METRICS}


def fit_calibrator(
    y: np.ndarray, scores: np.ndarray, threshold: float = DECISION_THRESHOLD
) -> Calibrator:
    """Isotonic regression of the holdout labels on the holdout scores, and the realized
    holdout metrics that monitoring measures an estimated drop against."""
    y = np.asarray(y, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, y)
    holdout = realized_performance(y, scores, threshold)
    return Calibrator(
        x=iso.X_thresholds_.tolist(),
        y=iso.y_thresholds_.tolist(),
        threshold=threshold,
        holdout=holdout.metrics(""),
    )


def calibrate_scores(calibrator: Calibrator, scores: np.ndarray) -> np.ndarray:
    """P(positive) for each score, as IsotonicRegression.predict with out_of_bounds="clip"."""
    return np.interp(np.asarray(scores, dtype=np.float64), calibrator.x, calibrator.y)


def estimate_performance(calibrator: Calibrator, scores: np.ndarray) -> PerformanceEstimate:
    """The expected ROC AUC, precision and recall of rows with these scores, from the
    scores alone."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)):
        return PerformanceEstimate(int(s.size), math.nan, math.nan, math.nan)
    p = calibrate_scores(calibrator, s)
    predicted = s >= calibrator.threshold
    tp = float(p[predicted].sum())
    positives = float(p.sum())
    return PerformanceEstimate(
        rows=int(s.size),
        roc_auc=expected_roc_auc(p, s),
        precision=tp / int(predicted.sum()) if predicted.any() else math.nan,
        recall=tp / positives if positives > 0 else math.nan,
    )


def expected_roc_auc(p: np.ndarray, scores: np.ndarray) -> float:
    """sum over pairs i != j of p_i (1 - p_j) [s_i > s_j] (ties count half), over the
    expected number of (positive, negative) pairs. Each row enters scikit-learn's weighted
    ROC AUC twice, as a positive of weight p_i and a negative of weight 1 - p_i; that also
    pairs every row with itself (a tie of weight p_i (1 - p_i)), which is taken out."""
    p = np.asarray(p, dtype=np.float64)
    positives, negatives = float(p.sum()), float((1.0 - p).sum())
    self_pairs = float((p * (1.0 - p)).sum())
    pairs = positives * negatives - self_pairs
    if pairs <= 0.0:
        return math.nan
    labels = np.r_[np.ones(p.size), np.zeros(p.size)]
    both = np.r_[scores, scores]
    with_self = roc_auc_score(labels, both, sample_weight=np.r_[p, 1.0 - p])
    return float((with_self * positives * negatives - 0.5 * self_pairs) / pairs)


def realized_performance(
    y: np.ndarray, scores: np.ndarray, threshold: float = DECISION_THRESHOLD
) -> PerformanceEstimate:
    """The same metrics on labelled rows."""
    y = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0 or not np.all(np.isfinite(s)):
        return PerformanceEstimate(int(y.size), math.nan, math.nan, math.nan)
    predicted = (s >= threshold).astype(int)
    return PerformanceEstimate(
        rows=int(y.size),
        roc_auc=metric_value("roc_auc", y, s),
        precision=float(precision_score(y, predicted, zero_division=np.nan)),
        recall=float(recall_score(y, predicted, zero_division=np.nan)),
    )


def compare_to_realized(
    calibrator: Calibrator, y: np.ndarray, scores: np.ndarray
) -> dict[str, float]:
    """Estimated beside realized on labelled rows, and the error (estimated - realized) of
    each metric: how far an estimate made before the labels can be trusted."""
    estimated = estimate_performance(calibrator, scores)
    realized = realized_performance(y, scores, calibrator.threshold)
    errors = {
        f"estimation_error_{name}": getattr(estimated, name) - getattr(realized, name)
        for name in ESTIMATED_METRICS
    }
    return {**estimated.metrics("estimated_"), **realized.metrics("realized_"), **errors}
