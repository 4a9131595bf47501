"""The estimated-performance gate on synthetic scores whose truth is known (the generator
of tests/models/test_performance_estimate.py): a calibrated champion passes on rows like its
holdout, fails on a shift to harder rows, and says nothing on thin or empty windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from checks.drift import Traffic
from checks.performance import NAME, check_estimated_performance
from checks.result import GateStatus
from models.performance_estimate import fit_calibrator
from tests.models.test_performance_estimate import draw

pytestmark = pytest.mark.fast

CALIBRATOR = fit_calibrator(*draw(5_000, seed=0))
_, SAME = draw(2_000, seed=1)
_, HARDER = draw(2_000, seed=2, scale=0.4)


def test_rows_like_the_holdout_pass():
    g = check_estimated_performance(CALIBRATOR, SAME, Traffic.ENOUGH, 0.05)
    assert g.name == NAME and g.status is GateStatus.PASS, g.reason
    assert abs(g.metrics["estimated_drop"]) < 0.02
    assert g.metrics["holdout_roc_auc"] == CALIBRATOR.holdout["roc_auc"]
    assert {"estimated_roc_auc", "estimated_precision", "estimated_recall"} <= set(g.metrics)
    assert g.evidence["traffic"] == "enough" and g.checks[0].bound == "<= 0.05"


def test_a_shift_to_harder_rows_is_an_estimated_drop():
    g = check_estimated_performance(CALIBRATOR, HARDER, Traffic.ENOUGH, 0.05)
    assert g.status is GateStatus.FAIL and "exceeds 0.05" in g.reason
    assert g.metrics["estimated_drop"] > 0.1


@pytest.mark.parametrize("traffic", [Traffic.NONE, Traffic.THIN])
def test_empty_or_thin_windows_are_never_a_drop(traffic):
    scores = HARDER[:0] if traffic is Traffic.NONE else HARDER[:50]
    g = check_estimated_performance(CALIBRATOR, scores, traffic, 0.05)
    assert g.status is GateStatus.INCONCLUSIVE and traffic.value in g.reason
    assert g.evidence["traffic"] == traffic.value


def test_no_calibrator_or_no_estimate_is_inconclusive():
    g = check_estimated_performance(None, HARDER, Traffic.ENOUGH, 0.05)
    assert g.status is GateStatus.INCONCLUSIVE and "no calibrator" in g.reason
    broken = np.r_[HARDER, math.nan]
    g = check_estimated_performance(CALIBRATOR, broken, Traffic.ENOUGH, 0.05)
    assert g.status is GateStatus.INCONCLUSIVE and math.isnan(g.metrics["estimated_roc_auc"])
