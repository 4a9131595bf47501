"""Performance estimates before labels, on synthetic data whose truth is known: one feature
x, P(y | x) fixed, a served score that orders rows by x but is miscalibrated. Calibrated on
a holdout, the estimate from scores alone must match the realized metrics, and follow them
down when the rows shift to harder ones (covariate shift)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from models.performance_estimate import (
    Calibrator,
    calibrate_scores,
    compare_to_realized,
    estimate_performance,
    expected_roc_auc,
    fit_calibrator,
    realized_performance,
)

pytestmark = pytest.mark.fast


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def draw(n: int, seed: int, *, scale: float = 1.0, concept_flip: bool = False):
    """Labels and served scores for x ~ N(0, scale). A small `scale` keeps the rows near the
    decision boundary, where they are harder to tell apart; `concept_flip` changes what x
    means (P(y | x) mirrored), which no estimate from scores can see."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, scale, n)
    truth = _sigmoid((-2.5 if concept_flip else 2.5) * x - 0.5)
    y = (rng.random(n) < truth).astype(int)
    return y, _sigmoid(1.2 * x + 0.4)


@pytest.fixture(scope="module")
def calibrator() -> Calibrator:
    return fit_calibrator(*draw(5_000, seed=0))


def test_raw_scores_are_miscalibrated_so_calibration_matters(calibrator):
    y, s = draw(20_000, seed=1)
    assert s.mean() - y.mean() > 0.1  # the served score overstates the positives
    assert abs(calibrate_scores(calibrator, s).mean() - y.mean()) < 0.01


def test_calibrated_estimate_matches_realized_without_shift(calibrator):
    y, s = draw(20_000, seed=1)
    got = compare_to_realized(calibrator, y, s)
    assert got["realized_roc_auc"] == pytest.approx(0.90, abs=0.02)
    for name in ("roc_auc", "precision", "recall"):
        assert abs(got[f"estimation_error_{name}"]) < 0.01, (name, got)
    # The holdout's own metrics are what a drop is measured against.
    assert calibrator.holdout["roc_auc"] == pytest.approx(got["realized_roc_auc"], abs=0.015)


def test_shift_to_harder_rows_lowers_realized_and_estimated_alike(calibrator):
    y, s = draw(20_000, seed=2, scale=0.4)
    got = compare_to_realized(calibrator, y, s)
    before = compare_to_realized(calibrator, *draw(20_000, seed=1))
    assert before["realized_roc_auc"] - got["realized_roc_auc"] > 0.1
    assert before["estimated_roc_auc"] - got["estimated_roc_auc"] > 0.1
    assert before["realized_precision"] - got["realized_precision"] > 0.1
    assert before["estimated_precision"] - got["estimated_precision"] > 0.1
    for name in ("roc_auc", "precision", "recall"):
        assert abs(got[f"estimation_error_{name}"]) < 0.015, (name, got)
    assert calibrator.holdout["roc_auc"] - got["estimated_roc_auc"] > 0.05


def test_concept_drift_is_invisible_to_the_estimate(calibrator):
    """The limit, said as a test: the rows look the same, what they mean changed."""
    y, s = draw(20_000, seed=3, concept_flip=True)
    got = compare_to_realized(calibrator, y, s)
    assert got["realized_roc_auc"] < 0.2
    assert got["estimated_roc_auc"] == pytest.approx(calibrator.holdout["roc_auc"], abs=0.02)


def test_expected_roc_auc_is_the_weighted_pairwise_ordering():
    rng = np.random.default_rng(4)
    p = rng.random(60)
    s = np.round(rng.random(60), 1)  # ties between rows count half
    num = den = 0.0
    for i in range(60):
        for j in range(60):
            if i != j:
                w = p[i] * (1.0 - p[j])
                den += w
                num += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    assert expected_roc_auc(p, s) == pytest.approx(num / den, rel=1e-12)


def test_expected_counts_at_the_threshold():
    cal = Calibrator(x=[0.0, 1.0], y=[0.0, 1.0], threshold=0.5)  # already calibrated
    s = np.array([0.9, 0.6, 0.3, 0.2])
    est = estimate_performance(cal, s)
    # TP = 0.9 + 0.6, predicted positives 2, expected positives 0.9 + 0.6 + 0.3 + 0.2.
    assert est.precision == pytest.approx(1.5 / 2)
    assert est.recall == pytest.approx(1.5 / 2.0)
    assert est.rows == 4


def test_calibrator_round_trips_through_json_and_applies_as_isotonic(calibrator):
    y, s = draw(5_000, seed=0)
    again = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict(), allow_nan=False)))
    assert again == calibrator
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
    probe = np.r_[np.linspace(-0.5, 1.5, 401), s[:100]]
    np.testing.assert_allclose(calibrate_scores(again, probe), iso.predict(probe), atol=1e-12)
    with pytest.raises(ValueError, match="format"):
        Calibrator.from_dict({**calibrator.to_dict(), "format": 99})


def test_undefined_estimates_are_nan_never_a_number(calibrator):
    assert all(
        math.isnan(v) for v in estimate_performance(calibrator, np.array([])).metrics("").values()
    )
    nan_scores = np.array([0.2, math.nan, 0.9])
    assert math.isnan(estimate_performance(calibrator, nan_scores).roc_auc)
    low = estimate_performance(calibrator, np.full(50, 0.1))
    assert math.isnan(low.precision)  # nothing scored positive
    one_class = realized_performance(np.zeros(10, dtype=int), np.linspace(0, 1, 10))
    assert math.isnan(one_class.roc_auc) and math.isnan(one_class.recall)
    # A holdout metric that is undefined is left out of the JSON, not written as NaN.
    degenerate = fit_calibrator(np.zeros(20, dtype=int), np.linspace(0, 1, 20))
    json.dumps(degenerate.to_dict(), allow_nan=False)
    assert "roc_auc" not in Calibrator.from_dict(degenerate.to_dict()).holdout
