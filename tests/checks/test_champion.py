from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from checks.champion import ScoredModel, compare_to_champion, paired_bootstrap
from checks.parity import check_parity
from checks.result import GateStatus
from models.config import ChampionGateConfig, ParityGateConfig

pytestmark = pytest.mark.fast

CFG = ChampionGateConfig(floor=0.7, max_regression=0.01, bootstrap_resamples=300)


def _data(n=2000, signal=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = signal * (y - 0.5) + rng.normal(0, 1, n)
    return y, 1 / (1 + np.exp(-logit))


def _scored(p):
    return ScoredModel(p, version="1", latency_us_per_row=50.0, size_bytes=1000)


def test_first_model_judged_on_floor_alone_and_says_so():
    y, p = _data()
    r = compare_to_champion(y, _scored(p), None, CFG, holdout_hash="h")
    assert r.status is GateStatus.PASS
    assert "no champion yet" in r.reason and "floor alone" in r.reason
    assert r.evidence["holdout_hash"] == "h"


def test_first_model_below_floor_fails():
    y, _ = _data()
    noise = np.random.default_rng(1).random(len(y))
    r = compare_to_champion(y, _scored(noise), None, CFG, holdout_hash="h")
    assert r.status is GateStatus.FAIL and "floor" in r.reason


def test_clearly_worse_challenger_fails_on_the_interval():
    y, good = _data(signal=2.5)
    rng = np.random.default_rng(3)
    flipped = np.where(rng.random(len(y)) < 0.3, 1 - good, good)
    r = compare_to_champion(y, _scored(flipped), _scored(good), CFG, holdout_hash="h")
    assert r.status is GateStatus.FAIL
    assert r.metrics["delta_ci_high"] < -0.01
    assert "vs champion" in r.reason


def test_identical_models_pass_as_no_difference_not_as_better():
    y, p = _data()
    r = compare_to_champion(y, _scored(p), _scored(p.copy()), CFG, holdout_hash="h")
    assert r.status is GateStatus.PASS
    assert r.metrics["delta_ci_low"] == 0.0 == r.metrics["delta_ci_high"]
    row = next(c for c in r.checks if "vs champion" in c.check)
    assert row.detail == "no detectable difference"


def test_tiny_improvement_within_noise_is_not_called_better():
    y, p = _data(n=800)
    jitter = p + np.random.default_rng(5).normal(0, 0.01, len(p))
    ci = paired_bootstrap(y, jitter, p, "roc_auc", 500, 0.95, 7)
    assert ci.low < 0 < ci.high


def test_nan_scores_and_empty_holdout_never_pass():
    y, p = _data()
    bad = p.copy()
    bad[0] = np.nan
    nan_result = compare_to_champion(y, _scored(bad), None, CFG, holdout_hash="h")
    assert nan_result.status is GateStatus.FAIL
    empty = compare_to_champion(np.array([]), _scored(np.array([])), None, CFG, holdout_hash="h")
    assert empty.status is GateStatus.FAIL and "empty holdout" in empty.reason


def test_champion_that_cannot_be_scored_is_not_treated_as_absent():
    y, p = _data()
    r = compare_to_champion(
        y, _scored(p), None, CFG, holdout_hash="h", champion_error="artifact missing"
    )
    assert r.status is GateStatus.FAIL and "artifact missing" in r.reason


def test_first_model_is_not_blocked_by_slices_too_small_to_judge():
    # Issue 15.2: `init` picked a marital-status slice with rare categories on a credit
    # table; the slices too small to judge made the first model's gate inconclusive, and
    # it was rejected although the first model is judged on the floor alone.
    y, p = _data(n=1000)
    marital = ["married"] * 600 + ["single"] * 330 + ["divorced"] * 40
    marital += ["separated"] * 20 + ["widow"] * 10
    slices = pd.DataFrame({"marital": marital})
    r = compare_to_champion(y, _scored(p), None, CFG, holdout_hash="h", slices=slices)
    assert r.status is GateStatus.PASS, r.reason
    small = {c.check: c for c in r.checks if c.status is GateStatus.INCONCLUSIVE}
    assert set(small) == {
        "slice marital=divorced (n=40)",
        "slice marital=separated (n=20)",
        "slice marital=widow (n=10)",
    }
    assert all(c.bound == "n >= 100" and "not blocking" in c.detail for c in small.values())
    assert "floor alone" in r.reason and "marital=widow (n=10)" in r.reason
    assert r.evidence["slices_not_judged"] == [
        {"column": "marital", "value": "divorced", "rows": 40, "why": "too small"},
        {"column": "marital", "value": "separated", "rows": 20, "why": "too small"},
        {"column": "marital", "value": "widow", "rows": 10, "why": "too small"},
    ]


def test_small_slice_does_not_block_a_challenger_either():
    y, p = _data(n=1000)
    slices = pd.DataFrame({"plan": ["big"] * 950 + ["tiny"] * 50})
    r = compare_to_champion(y, _scored(p), _scored(p.copy()), CFG, holdout_hash="h", slices=slices)
    tiny = next(c for c in r.checks if "tiny" in c.check)
    assert tiny.status is GateStatus.INCONCLUSIVE and tiny.check == "slice plan=tiny (n=50)"
    assert r.status is GateStatus.PASS, r.reason


def test_slice_with_one_class_is_reported_not_judged():
    y, p = _data(n=1000)
    plan = np.where(y == 1, "a", "b")
    plan[:300] = "c"
    slices = pd.DataFrame({"plan": plan})
    r = compare_to_champion(y, _scored(p), _scored(p.copy()), CFG, holdout_hash="h", slices=slices)
    assert r.status is GateStatus.PASS, r.reason
    one_class = [c for c in r.checks if c.status is GateStatus.INCONCLUSIVE]
    assert {c.check.split(" (")[0] for c in one_class} == {"slice plan=a", "slice plan=b"}
    assert {s["why"] for s in r.evidence["slices_not_judged"]} == {"one class only"}


def test_a_judged_slice_that_regresses_still_fails():
    y, p = _data(n=2000)
    plan = np.array(["a", "b"] * 1000)
    worse = p.copy()
    on_b = plan == "b"
    worse[on_b] = np.random.default_rng(2).permutation(worse[on_b])
    loose = CFG.model_copy(update={"floor": 0.5, "max_regression": 0.5})
    slices = pd.DataFrame({"plan": plan})
    r = compare_to_champion(y, _scored(worse), _scored(p), loose, holdout_hash="h", slices=slices)
    row = next(c for c in r.checks if c.check.startswith("slice plan=b"))
    assert row.status is GateStatus.FAIL
    assert r.status is GateStatus.FAIL and "slice plan=b" in r.reason


def test_guard_metrics_bound_size_and_latency():
    y, p = _data()
    slow = ScoredModel(p, latency_us_per_row=1e6, size_bytes=10**9)
    r = compare_to_champion(y, slow, None, CFG, holdout_hash="h")
    failed = {c.check for c in r.checks if c.status is GateStatus.FAIL}
    assert failed == {"guard latency_us_per_row", "guard model_mb"}


@pytest.mark.parametrize(
    ("onnx_shift", "expected"), [(5e-5, GateStatus.PASS), (2e-4, GateStatus.FAIL)]
)
def test_parity_tolerance(onnx_shift, expected):
    p = np.linspace(0.1, 0.9, 50)
    r = check_parity(p, p + onnx_shift, ParityGateConfig(tolerance=1e-4))
    assert r.status is expected
    assert math.isclose(r.metrics["max_abs_diff"], onnx_shift, rel_tol=1e-6)


def test_parity_flags_invalid_outputs_and_shape_mismatch():
    p = np.array([0.2, 0.5])
    assert check_parity(p, np.array([0.2, np.nan]), ParityGateConfig()).status is GateStatus.FAIL
    assert check_parity(p, np.array([0.2]), ParityGateConfig()).status is GateStatus.FAIL


def test_real_model_on_30pct_flipped_labels_fails_against_real_champion(bundled_cfg, churn_df):
    """The crafted case on real data: same pipeline, same holdout, 30% of train labels
    flipped. The paired interval must show the regression."""
    from models.config import TrainConfig
    from models.data import encode_target, split_data
    from models.train import predict_proba, train_model

    ds = bundled_cfg.dataset
    parts = split_data(churn_df, ds, bundled_cfg.train)
    tc = TrainConfig(estimator="logistic_regression")
    champion = train_model(parts.train, ds, tc)
    noisy = parts.train.copy()
    flip = np.random.default_rng(0).random(len(noisy)) < 0.3
    noisy.loc[flip, ds.target] = np.where(noisy.loc[flip, ds.target] == "Yes", "No", "Yes")
    challenger = train_model(noisy, ds, tc)
    y = encode_target(parts.holdout, ds)
    r = compare_to_champion(
        y,
        _scored(predict_proba(challenger.pipeline, parts.holdout, ds)),
        _scored(predict_proba(champion.pipeline, parts.holdout, ds)),
        ChampionGateConfig(floor=0.7, max_regression=0.01, bootstrap_resamples=300),
        holdout_hash=parts.holdout_hash,
    )
    assert r.status is GateStatus.FAIL
    assert r.metrics["delta_ci_low"] < -0.01, r.metrics
