from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from checks.drift import (
    Traffic,
    check_drift,
    evidently_drift_report_html,
    evidently_psi,
    feature_psi,
    psi,
    window_traffic,
)
from checks.result import GateStatus
from models.config import DriftGateConfig
from models.reference import (
    ReferenceHistograms,
    bin_counts,
    compute_feature_histogram,
    compute_reference_histograms,
)

pytestmark = pytest.mark.fast

CFG = DriftGateConfig()
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
tied_floats = st.sampled_from([0.0, 1.0, 2.5, -3.0])
samples = arrays(np.float64, st.integers(1, 300), elements=finite_floats | tied_floats)


def _hist(values, bins=10):
    return compute_feature_histogram("x", np.asarray(values, dtype=float), "numeric", bins)


@settings(max_examples=200, deadline=None)
@given(x=samples, bins=st.integers(2, 20))
def test_psi_is_zero_for_identical_samples(x, bins):
    assert feature_psi(_hist(x, bins), x) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(ref=samples, cur=samples, bins=st.integers(2, 20))
def test_psi_is_finite_and_non_negative_even_with_empty_bins(ref, cur, bins):
    value = feature_psi(_hist(ref, bins), cur)
    assert math.isfinite(value) and value >= 0.0


@settings(max_examples=50, deadline=None)
@given(
    value=finite_floats,
    cur=arrays(np.float64, st.integers(1, 300), elements=finite_floats),
)
def test_single_value_reference_gives_finite_psi(value, cur):
    h = _hist([value] * 50)
    assert h.n_bins == 3
    result = feature_psi(h, cur)
    assert math.isfinite(result) and result >= 0.0
    assert feature_psi(h, np.full(20, value)) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(300, 20_000),
    bins=st.integers(5, 20),
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e3),
)
def test_psi_grows_with_the_mean_shift(seed, n, bins, loc, scale):
    # The window is the reference itself, moved: what changes is the shift alone. Shifts stop
    # at 1.5 SD because binned PSI saturates once the whole window lies past the reference's
    # top quantile, and from there on a bigger shift looks the same.
    ref = np.random.default_rng(seed).normal(loc, scale, n)
    h = _hist(ref, bins)
    values = [feature_psi(h, ref + s * ref.std()) for s in np.linspace(0.0, 1.5, 7)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in pairwise(values)), values


def test_smoothing_is_proportional_to_the_sample_size():
    # An empty bucket is weak evidence in a small window and strong evidence in a big one.
    ref = [0.5, 0.5]
    small = psi(ref, [100, 0], ref_count=10_000)
    large = psi(ref, [100_000, 0], ref_count=10_000)
    assert 0 < small < large
    assert math.isfinite(large)


def test_unsmoothed_psi_is_infinite_with_a_one_sided_empty_bucket():
    assert psi([0.5, 0.5], [10, 0], ref_count=100, alpha=0.0) == math.inf
    assert psi([0.5, 0.5, 0.0], [10, 10, 0], ref_count=100, alpha=0.0) == pytest.approx(0.0)


def test_psi_is_undefined_for_an_empty_side():
    assert math.isnan(psi([0.5, 0.5], [0, 0], ref_count=100))
    assert math.isnan(psi([0.5, 0.5], [1, 1], ref_count=0))
    with pytest.raises(ValueError, match="buckets"):
        psi([0.5, 0.5], [1, 1, 1], ref_count=10)


def test_config_rejects_warn_above_alert_and_unknown_fields():
    with pytest.raises(ValidationError):
        DriftGateConfig(psi_warn=0.3, psi_alert=0.2)
    with pytest.raises(ValidationError):
        DriftGateConfig(psi_alrt=0.3)  # type: ignore[call-arg]


def _score(df: pd.DataFrame) -> np.ndarray:
    """A stand-in for a model's score that depends on the features, so it drifts with them."""
    z = 0.03 * df["monthly_charges"] - 0.04 * df["tenure"]
    z = z + (df["contract"] == "Month-to-month") * 1.0
    return (1 / (1 + np.exp(-(z - 1.0)))).to_numpy()


@pytest.fixture(scope="module")
def reference(churn_df, bundled_cfg) -> ReferenceHistograms:
    return compute_reference_histograms(churn_df, bundled_cfg.dataset, _score(churn_df))


def _shifted(df: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = df.copy()
    out.loc[rng.random(len(out)) < 0.6, "contract"] = "Month-to-month"
    out["monthly_charges"] = out["monthly_charges"] * 1.3
    return out


def test_random_resample_of_churn_passes(churn_df, reference):
    window = churn_df.sample(n=5000, replace=True, random_state=3)
    r = check_drift(window, reference, CFG, scores=_score(window))
    assert r.status is GateStatus.PASS, r.reason
    assert r.metrics["max_psi"] < CFG.psi_warn
    assert r.metrics["rows"] == 5000
    assert {f"psi.{c}" for c in reference.histograms} <= set(r.metrics)
    assert len(r.checks) == len(reference.histograms)
    assert "no drift" in r.reason


def test_shifted_churn_batch_fails_naming_the_drifted_columns(churn_df, reference):
    window = _shifted(churn_df)
    r = check_drift(window, reference, CFG, scores=_score(window))
    assert r.status is GateStatus.FAIL
    assert set(r.evidence["drifted"]) >= {"contract", "monthly_charges"}
    assert "tenure" not in r.evidence["drifted"]
    failed = {row.check for row in r.checks if row.status is GateStatus.FAIL}
    assert {"psi contract", "psi monthly_charges"} <= failed
    for row in r.checks:
        assert row.bound == "< 0.25"
    # The reason lists the drifted columns with their PSI, the largest first.
    listed = r.reason.split(": ", 1)[1].split(";")[0].split(", ")
    values = [float(item.rsplit(" ", 1)[1]) for item in listed]
    assert values == sorted(values, reverse=True)
    assert "contract" in r.reason and "monthly_charges" in r.reason
    assert r.metrics["max_psi"] == max(v for k, v in r.metrics.items() if k.startswith("psi."))


def test_warning_band_passes_but_says_so(churn_df, reference):
    window = churn_df.copy()
    rng = np.random.default_rng(5)
    window.loc[rng.random(len(window)) < 0.4, "contract"] = "Month-to-month"
    r = check_drift(window, reference, CFG, scores=_score(window))
    row = next(row for row in r.checks if row.check == "psi contract")
    assert CFG.psi_warn <= r.metrics["psi.contract"] < CFG.psi_alert
    assert row.status is GateStatus.PASS and "warning" in row.detail
    assert r.status is GateStatus.PASS and "warning" in r.reason and "contract" in r.reason


def test_too_small_window_is_inconclusive_even_when_drifted(churn_df, reference):
    window = _shifted(churn_df).head(CFG.min_rows - 1)
    r = check_drift(window, reference, CFG, scores=_score(window))
    assert r.status is GateStatus.INCONCLUSIVE
    assert "below the minimum" in r.reason
    empty = churn_df.head(0)
    assert check_drift(empty, reference, CFG, scores=np.zeros(0)).status is not GateStatus.PASS


def test_an_empty_window_is_no_traffic_never_drift(churn_df, reference):
    # No rows: PSI is undefined, which says nothing about the data, so it is no verdict
    # at all, and the window says so, whether or not the caller passed an empty score array.
    for scores in (np.zeros(0), None):
        r = check_drift(churn_df.head(0), reference, CFG, scores=scores)
        assert r.status is GateStatus.INCONCLUSIVE, r.reason
        assert r.reason.startswith("no traffic"), r.reason
        assert window_traffic(r) is Traffic.NONE and r.evidence["traffic"] == "no_traffic"
        assert r.checks and all(row.status is GateStatus.INCONCLUSIVE for row in r.checks)
        assert r.metrics["rows"] == 0


def test_traffic_of_a_window_is_named(churn_df, reference):
    thin = churn_df.head(CFG.min_rows - 1)
    assert window_traffic(check_drift(thin, reference, CFG, scores=_score(thin))) is Traffic.THIN
    full = check_drift(churn_df, reference, CFG, scores=_score(churn_df))
    assert window_traffic(full) is Traffic.ENOUGH
    errored = check_drift(churn_df.head(0).assign(tenure="x"), None, CFG)  # type: ignore[arg-type]
    assert errored.status is GateStatus.FAIL and window_traffic(errored) is Traffic.NONE


def test_missing_column_fails_naming_it(churn_df, reference):
    window = churn_df.drop(columns=["tenure"])
    r = check_drift(window, reference, CFG, scores=_score(churn_df))
    assert r.status is GateStatus.FAIL and "tenure" in r.reason
    row = next(row for row in r.checks if row.check == "psi tenure")
    assert row.status is GateStatus.FAIL and "missing" in row.detail


def test_missing_column_in_a_small_window_still_fails(churn_df, reference):
    window = churn_df.drop(columns=["tenure"]).head(10)
    r = check_drift(window, reference, CFG, scores=_score(churn_df.head(10)))
    assert r.status is GateStatus.FAIL


def test_unbinnable_column_fails_closed(churn_df, reference):
    window = churn_df.assign(tenure="many")
    r = check_drift(window, reference, CFG, scores=_score(churn_df))
    assert r.status is GateStatus.FAIL and "tenure" in r.reason


def test_an_error_inside_the_gate_fails_closed(reference):
    r = check_drift(None, reference, CFG)  # type: ignore[arg-type]
    assert r.status is GateStatus.FAIL and "error" in r.reason


def test_score_drift_is_judged_and_missing_scores_are_never_a_pass(churn_df, reference):
    inflated = np.clip(_score(churn_df) + 0.2, 0.0, 1.0)
    r = check_drift(churn_df, reference, CFG, scores=inflated)
    assert r.status is GateStatus.FAIL and "prediction score" in r.reason
    assert r.metrics["psi.__score__"] >= CFG.psi_alert
    r = check_drift(churn_df, reference, CFG)
    assert r.status is GateStatus.INCONCLUSIVE and "no scores" in r.reason
    r = check_drift(churn_df, reference, CFG, scores=np.zeros(3))
    assert r.status is GateStatus.FAIL and "3 scores" in r.reason


def test_feature_only_reference_needs_no_scores(churn_df, bundled_cfg):
    ref = compute_reference_histograms(churn_df, bundled_cfg.dataset, None)
    r = check_drift(churn_df, ref, CFG)
    assert r.status is GateStatus.PASS
    assert r.metrics["max_psi"] == pytest.approx(0.0, abs=1e-12)


def test_null_surge_is_drift(churn_df, reference):
    window = churn_df.copy()
    window.loc[window.index[: len(window) // 2], "monthly_charges"] = np.nan
    r = check_drift(window, reference, CFG, scores=_score(churn_df))
    assert "monthly_charges" in r.evidence["drifted"]


def test_result_round_trips(churn_df, reference):
    from checks.result import GateResult

    r = check_drift(_shifted(churn_df), reference, CFG, scores=_score(churn_df))
    assert GateResult.from_dict(r.to_dict()) == r


CROSS_CHECK_COLUMNS = ["tenure", "monthly_charges", "senior_citizen", "contract", "payment_method"]


def test_evidently_psi_on_our_bins_equals_ours(churn_df):
    ref = churn_df.sample(frac=0.5, random_state=11)
    cur = _shifted(churn_df.drop(ref.index), seed=2)
    # Unseen categories, nulls and bins empty on one side: every smoothing path is exercised.
    cur.loc[cur.index[:40], "payment_method"] = "Crypto"
    cur.loc[cur.index[40:60], "tenure"] = np.nan
    cur.loc[cur.index[60:90], "senior_citizen"] = 2
    theirs = evidently_psi(ref, cur, CROSS_CHECK_COLUMNS)
    assert set(theirs) == set(CROSS_CHECK_COLUMNS)
    for column in CROSS_CHECK_COLUMNS:
        kind = "categorical" if ref[column].dtype == object else "numeric"
        hist = compute_feature_histogram(column, ref[column], kind)
        ours = feature_psi(hist, cur[column])
        assert ours == pytest.approx(theirs[column], abs=1e-6), column
    assert theirs["contract"] > CFG.psi_alert and theirs["monthly_charges"] > CFG.psi_alert


def test_evidently_psi_unsmoothed_equals_ours_without_empty_bins(churn_df):
    rng = np.random.default_rng(4)
    ref = pd.DataFrame({"x": rng.normal(size=3000), "c": rng.choice(list("abc"), 3000)})
    cur = pd.DataFrame({"x": rng.normal(0.3, 1.0, 2000), "c": rng.choice(list("aabc"), 2000)})
    theirs = evidently_psi(ref, cur, ["x", "c"], smoothing="evidently")
    for column, kind in [("x", "numeric"), ("c", "categorical")]:
        hist = compute_feature_histogram(column, ref[column], kind)
        counts = bin_counts(hist, cur[column])
        ours = psi(hist.bucket_shares(), counts, ref_count=hist.count, alpha=0.0)
        assert ours == pytest.approx(theirs[column], abs=1e-6), column


def test_evidently_report_is_written(churn_df, tmp_path: Path):
    path = evidently_drift_report_html(
        churn_df, _shifted(churn_df), ["tenure", "contract"], tmp_path / "drift.html"
    )
    assert path.is_file() and path.stat().st_size > 10_000
