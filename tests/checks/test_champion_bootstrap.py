"""The vectorised paired bootstrap of ROC AUC gives what scikit-learn's `roc_auc_score`
gives on each resample: the same rows drawn from the same seed, the same interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from checks.champion import _draw_counts, _resampled_auc, paired_bootstrap
from models.metrics import metric_value

pytestmark = pytest.mark.fast


def _per_resample(y, a, b, resamples, confidence, seed):
    """Today's implementation before vectorising: one `metric_value` call per model and
    resample."""
    rng = np.random.default_rng(seed)
    n = len(y)
    deltas = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        d = metric_value("roc_auc", y[idx], a[idx]) - metric_value("roc_auc", y[idx], b[idx])
        if math.isfinite(d):
            deltas.append(d)
    if len(deltas) < resamples // 2:
        return len(deltas), math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(deltas), [alpha, 1.0 - alpha])
    return len(deltas), float(low), float(high)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    seed=st.integers(0, 2**32 - 1),
    decimals=st.integers(0, 3),
    rate=st.floats(0.05, 0.95),
)
def test_same_interval_as_roc_auc_score_per_resample(n, seed, decimals, rate):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    # Rounded scores: ties within and across classes.
    a = np.round(rng.random(n) + 0.3 * y, decimals)
    b = np.round(rng.random(n) + 0.1 * y, decimals)
    got = paired_bootstrap(y, a, b, "roc_auc", 200, 0.9, seed)
    used, low, high = _per_resample(y, a, b, 200, 0.9, seed)
    assert got.resamples_used == used
    if math.isnan(low):
        assert math.isnan(got.low) and math.isnan(got.high)
    else:
        assert got.low == pytest.approx(low, abs=1e-12)
        assert got.high == pytest.approx(high, abs=1e-12)


def test_each_resample_auc_equals_roc_auc_score():
    rng = np.random.default_rng(3)
    n = 500
    y = (rng.random(n) < 0.3).astype(int)
    p = np.round(rng.random(n) + 0.5 * y, 2)
    idx = rng.integers(0, n, (50, n))
    aucs = _resampled_auc(y, p, _draw_counts(idx, n))
    expected = [roc_auc_score(y[i], p[i]) for i in idx]
    np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)


def test_a_resample_with_one_class_is_nan():
    y = np.array([0, 1])
    p = np.array([0.2, 0.8])
    counts = _draw_counts(np.array([[0, 0], [1, 1], [0, 1]]), 2)
    aucs = _resampled_auc(y, p, counts)
    assert math.isnan(aucs[0]) and math.isnan(aucs[1]) and aucs[2] == 1.0


def test_chunks_draw_the_same_rows_as_one_block(monkeypatch):
    rng = np.random.default_rng(5)
    n = 300
    y = (rng.random(n) < 0.4).astype(int)
    a, b = rng.random(n) + 0.2 * y, rng.random(n)
    whole = paired_bootstrap(y, a, b, "roc_auc", 101, 0.95, 11)
    monkeypatch.setattr("checks.champion._BOOTSTRAP_CELLS", n * 7)  # chunks of 7 resamples
    chunked = paired_bootstrap(y, a, b, "roc_auc", 101, 0.95, 11)
    assert chunked == whole
