"""The HTML model report (`flows/model_report.py`) on a small made-up holdout: a page that
opens offline (inline SVG), with the gate table, the curves, and slices and drift when
there are any."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from checks.result import CheckRow, GateResult, GateStatus
from flows.model_report import render_model_report, report_sections, titled_report

pytestmark = pytest.mark.fast

USES_PREFECT = False  # pure renderers: no Prefect API to start

GATES = [
    GateResult("data", GateStatus.PASS, "all checks passed"),
    GateResult(
        "champion",
        GateStatus.FAIL,
        "roc_auc < floor | by 0.02",
        checks=(CheckRow("roc_auc floor", GateStatus.FAIL, "0.68", ">= 0.7"),),
    ),
]


def _holdout(n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    challenger = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1)
    champion = np.clip(0.2 * y + rng.uniform(0, 0.8, n), 0, 1)
    return y, challenger, champion


def test_full_report_with_champion_slices_and_drift():
    y, challenger, champion = _holdout()
    slices = pd.DataFrame({"contract": np.where(np.arange(len(y)) % 3 == 0, "a", "b")})
    page = render_model_report(
        title="churn: challenger from run <r1>",
        y=y,
        challenger=challenger,
        champion=champion,
        champion_version="3",
        slices=slices,
        gates=GATES,
        primary_metric="roc_auc",
        drift_psi={"tenure": 0.3, "contract": 0.05, "broken": float("nan")},
        facts={"estimator": "gradient_boosting", "holdout rows": str(len(y))},
    )
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    assert "<title>churn: challenger from run &lt;r1&gt;</title>" in page
    assert "<h1>churn: challenger from run &lt;r1&gt;</h1>" in page
    assert "<li><b>estimator</b>: gradient_boosting</li>" in page
    # The gate tables, as HTML, from the same markdown the CI summary uses.
    assert "<tr><th>gate</th><th>status</th><th>reason</th></tr>" in page
    assert "<td>roc_auc &lt; floor | by 0.02</td>" in page
    assert "<h3>champion</h3>" in page and "<td>roc_auc floor</td>" in page
    assert page.count("<svg") == 3  # curves, slices, drift
    for section in ("Holdout curves", "Slices", "Drift"):
        assert f"<h2>{section}</h2>" in page
    assert "champion v3" in page and "contract=a" in page


def test_minimal_report_has_no_slice_or_drift_section():
    y, challenger, _ = _holdout()
    sections = report_sections(
        y=y,
        challenger=challenger,
        champion=None,
        champion_version=None,
        slices=None,
        gates=GATES[:1],
        primary_metric="roc_auc",
    )
    assert sections.count("<svg") == 1 and "champion v" not in sections
    assert "<h2>Slices</h2>" not in sections and "<h2>Drift</h2>" not in sections
    page = titled_report("first model", sections)
    assert page.count("<h1>first model</h1>") == 1 and sections in page
