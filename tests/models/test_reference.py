from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.reference import (
    SCORE_COLUMN,
    UNSEEN,
    FeatureHistogram,
    ReferenceHistograms,
    bin_counts,
    compute_feature_histogram,
    compute_reference_histograms,
)

pytestmark = pytest.mark.fast

finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
# Few distinct values force heavy ties, the case quantile bins get wrong.
tied_floats = st.sampled_from([0.0, 1.0, 2.5, -3.0])


def _numeric(values, bins=10) -> FeatureHistogram:
    return compute_feature_histogram("x", np.asarray(values, dtype=float), "numeric", bins)


def test_binary_column_isolates_zero_and_one_and_keeps_below_between_above():
    h = _numeric([0, 1] * 50 + [1] * 10)
    assert h.edges[0] == -math.inf and h.edges[-1] == math.inf
    assert h.bucket_labels() == ["[-inf, 0)", "= 0", "(0, 1)", "= 1", "(1, inf)", "null"]
    assert bin_counts(h, [-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]).tolist() == [1, 1, 1, 1, 1, 1]
    assert h.shares == pytest.approx([0.0, 50 / 110, 0.0, 60 / 110, 0.0])


def test_single_value_column_gets_below_at_above():
    h = _numeric([5.0] * 300)
    assert h.n_bins == 3
    assert h.shares == [0.0, 1.0, 0.0]
    assert bin_counts(h, [4.0, 5.0, 6.0, 5.0]).tolist() == [1, 2, 1, 0]


def test_values_outside_the_reference_range_land_in_the_outer_bins():
    h = _numeric(np.arange(1000.0))
    counts = bin_counts(h, [-1e9, -math.inf, 1e9, math.inf])
    assert counts[0] == 2 and counts[h.n_bins - 1] == 2 and counts.sum() == 4


def test_continuous_reference_gets_equal_quantile_bins():
    x = np.random.default_rng(0).normal(size=10_000)
    h = _numeric(x)
    assert h.n_bins == 10
    assert h.shares == pytest.approx([0.1] * 10, abs=1e-3)


def test_nulls_are_their_own_bucket():
    h = _numeric([1.0, 2.0, 3.0, np.nan] * 25)
    assert h.null_share == pytest.approx(0.25)
    assert sum(h.shares) == pytest.approx(1.0)
    assert h.bucket_shares().sum() == pytest.approx(1.0)
    counts = bin_counts(h, pd.Series([1, None, 2, pd.NA], dtype="Int64"))
    assert counts[-1] == 2 and counts.sum() == 4


def test_all_null_reference_still_bins():
    h = _numeric([np.nan] * 10)
    assert h.null_share == 1.0 and h.bucket_shares().tolist() == [0.0, 1.0]
    assert bin_counts(h, [1.0, np.nan]).tolist() == [1, 1]


def test_numeric_bins_refuse_strings():
    h = _numeric([1.0, 2.0, 3.0])
    with pytest.raises((TypeError, ValueError)):
        bin_counts(h, pd.Series(["a", "b"]))


def test_categorical_unseen_and_null_buckets():
    ref = pd.Series(["a", "b", "b", None])
    h = compute_feature_histogram("c", ref, "categorical")
    assert h.categories == ["a", "b", UNSEEN]
    assert h.shares == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert h.null_share == pytest.approx(0.25)
    cur = pd.Series(["b", "z", "y", None, np.nan, "a"])
    assert bin_counts(h, cur).tolist() == [1, 1, 2, 2]


def test_categories_match_by_string_form():
    h = compute_feature_histogram("c", pd.Series([1, 2, 2, 3]), "categorical")
    assert h.categories == ["1", "2", "3", UNSEEN]
    assert bin_counts(h, pd.Series(["2", "3", "4"])).tolist() == [0, 1, 1, 1, 0]
    assert bin_counts(h, pd.Series([2, 2]).astype("category")).tolist() == [0, 2, 0, 0, 0]


def test_bins_and_empty_reference_are_rejected():
    with pytest.raises(ValueError, match="bins"):
        compute_feature_histogram("x", [1.0], "numeric", bins=1)
    with pytest.raises(ValueError, match="no reference rows"):
        compute_feature_histogram("x", [], "numeric")


@settings(max_examples=200, deadline=None)
@given(
    ref=arrays(np.float64, st.integers(1, 300), elements=finite_floats | tied_floats),
    cur=arrays(np.float64, st.integers(0, 300), elements=finite_floats | tied_floats),
    bins=st.integers(2, 20),
)
def test_numeric_bins_are_half_open_and_cover_everything(ref, cur, bins):
    h = _numeric(ref, bins)
    pairs = list(pairwise(h.edges))
    assert all(lo < hi for lo, hi in pairs)
    assert sum(h.shares) == pytest.approx(1.0)
    expected = [int(((cur >= lo) & (cur < hi)).sum()) for lo, hi in pairs]
    assert bin_counts(h, cur)[:-1].tolist() == expected


@pytest.fixture(scope="module")
def churn_reference(churn_df, bundled_cfg) -> ReferenceHistograms:
    scores = np.random.default_rng(0).random(len(churn_df))
    return compute_reference_histograms(churn_df, bundled_cfg.dataset, scores)


def test_churn_reference_covers_every_feature_and_the_score(churn_reference, bundled_cfg):
    assert list(churn_reference.features) == list(bundled_cfg.dataset.features)
    assert churn_reference.score is not None and churn_reference.score.column == SCORE_COLUMN
    assert churn_reference.histograms["contract"].kind == "categorical"
    assert churn_reference.histograms["total_charges"].null_share == pytest.approx(11 / 7043)


def test_reference_round_trips_through_strict_json(churn_reference):
    text = json.dumps(churn_reference.to_dict(), allow_nan=False)
    back = ReferenceHistograms.from_dict(json.loads(text))
    assert back == churn_reference
    assert back.histograms["tenure"].edges[0] == -math.inf


@settings(max_examples=50, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 200), elements=finite_floats | tied_floats),
    bins=st.integers(2, 15),
)
def test_any_numeric_histogram_round_trips(values, bins):
    h = _numeric(values, bins)
    assert FeatureHistogram.from_dict(json.loads(json.dumps(h.to_dict(), allow_nan=False))) == h


def test_unknown_format_is_refused(churn_reference):
    d = {**churn_reference.to_dict(), "format": 99}
    with pytest.raises(ValueError, match="format"):
        ReferenceHistograms.from_dict(d)


def test_missing_reference_column_and_bad_scores_are_named(churn_df, bundled_cfg):
    with pytest.raises(ValueError, match="contract"):
        compute_reference_histograms(churn_df.drop(columns="contract"), bundled_cfg.dataset, None)
    with pytest.raises(ValueError, match="scores"):
        compute_reference_histograms(churn_df, bundled_cfg.dataset, np.zeros(3))
