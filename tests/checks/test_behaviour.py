"""The behaviour gate on made-up models: each expectation broken fails with its rows, each
held passes; slice gaps against a champion and without one; config errors name the field."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from checks.behaviour import check_behaviour
from checks.result import GateResult, GateStatus
from flows.gate_tables import gate_tables, gates_markdown
from models.config import BehaviourGateConfig, ConfigError, load_config
from tests.conftest import BUNDLED_CONFIG, BUNDLED_DATA

pytestmark = pytest.mark.fast

N = 400


def _holdout(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "customer_id": np.arange(1000, 1000 + N),
            "tenure": rng.integers(0, 72, N).astype(float),
            "group": np.where(np.arange(N) % 2 == 0, "a", "b"),
        }
    )
    y = (rng.random(N) < 1 / (1 + np.exp((frame["tenure"] - 30) / 10))).astype(int)
    return frame, y


def _churn_by_tenure(frame: pd.DataFrame) -> np.ndarray:
    """Holds every expectation: less churn with more tenure, blind to the id."""
    return 1 / (1 + np.exp((frame["tenure"].to_numpy(dtype=float) - 30) / 10))


def _cfg(**checks: Any) -> BehaviourGateConfig:
    return BehaviourGateConfig(**checks)


def _check(predict, cfg, **kw) -> GateResult:
    frame, y = _holdout()
    return check_behaviour(predict, frame, y, cfg, id_column="customer_id", **kw)


ID_INVARIANT = {"column": "customer_id", "perturbation": "shuffle", "epsilon": 0.0}
TENURE_DOWN = {"column": "tenure", "delta": 12, "direction": "non_increasing", "tolerance": 0.01}


def test_no_checks_declared_passes_and_says_so():
    r = _check(_churn_by_tenure, _cfg())
    assert r.status is GateStatus.PASS
    assert "no behavioural checks declared" in r.reason
    assert [c.check for c in r.checks] == ["behavioural checks declared"]


def test_a_model_that_holds_every_expectation_passes():
    cfg = _cfg(
        invariance=[ID_INVARIANT, {"column": "group", "values": ["a", "b"], "epsilon": 0.0}],
        directional=[TENURE_DOWN],
        slice_gap=[{"column": "group", "metric": "recall", "max_widening": 0.05, "min_rows": 20}],
    )
    r = _check(_churn_by_tenure, cfg, champion_scores=_churn_by_tenure(_holdout()[0]))
    assert r.status is GateStatus.PASS, r.reason
    assert "all 4 behavioural checks held" in r.reason
    assert r.evidence["failing_rows"] == []
    assert r.metrics["directional.tenure.rows_broken"] == 0
    assert r.metrics["slice_gap.recall.group.widening"] == pytest.approx(0.0)


def test_a_model_that_reads_the_id_breaks_invariance_with_its_rows():
    def reads_id(frame: pd.DataFrame) -> np.ndarray:
        return _churn_by_tenure(frame) * 0.5 + (frame["customer_id"].to_numpy() % 7) / 14

    r = _check(reads_id, _cfg(invariance=[ID_INVARIANT], max_failing_rows=5))
    assert r.status is GateStatus.FAIL
    assert "invariance customer_id (shuffled)" in r.reason
    row = r.checks[0]
    assert row.status is GateStatus.FAIL and "perturbed rows moved more" in row.detail
    rows = r.evidence["failing_rows"]
    assert len(rows) == 5  # capped
    assert r.evidence["checks"][0]["failing_rows"] > 5  # counted in full
    first = rows[0]
    assert first["column"] == "customer_id" and first["row"] >= 1000  # the id, not a position
    assert abs(first["change"]) > 0 and first["from"] != first["to"]
    json.dumps(r.to_dict())  # evidence is JSON for MLflow


def test_more_tenure_raising_churn_breaks_the_directional_expectation():
    def rises(frame: pd.DataFrame) -> np.ndarray:
        return 1 - _churn_by_tenure(frame)

    r = _check(rises, _cfg(directional=[TENURE_DOWN]))
    assert r.status is GateStatus.FAIL
    assert r.metrics["directional.tenure.rows_broken"] > 0
    rows = r.evidence["failing_rows"]
    assert rows and all(x["to"] == x["from"] + 12 and x["change"] > 0.01 for x in rows)
    assert rows[0]["check"].startswith("directional tenure +12")


def test_a_small_wrong_move_within_tolerance_holds():
    def wiggle(frame: pd.DataFrame) -> np.ndarray:
        return 0.3 + 0.005 * (frame["tenure"].to_numpy() >= 40)

    assert _check(wiggle, _cfg(directional=[TENURE_DOWN])).status is GateStatus.PASS
    strict = {**TENURE_DOWN, "tolerance": 0.0}
    assert _check(wiggle, _cfg(directional=[strict])).status is GateStatus.FAIL


def _unfair(frame: pd.DataFrame) -> np.ndarray:
    """Catches churners of group a, misses most of group b's."""
    p = _churn_by_tenure(frame)
    return np.where(frame["group"].to_numpy() == "b", p * 0.6, p)


GROUP_RECALL = {"column": "group", "metric": "recall", "max_widening": 0.05, "min_rows": 20}


def test_a_slice_gap_wider_than_the_champions_fails():
    champion = _churn_by_tenure(_holdout()[0])
    r = _check(_unfair, _cfg(slice_gap=[GROUP_RECALL]), champion_scores=champion)
    assert r.status is GateStatus.FAIL
    assert r.metrics["slice_gap.recall.group.widening"] > 0.05
    assert "widened by" in r.checks[0].detail
    slices = r.evidence["checks"][0]["slices"]
    assert {s["slice"] for s in slices} == {"a", "b"}
    assert all(s["positives"] >= 20 and s["champion"] is not None for s in slices)


def test_without_a_champion_the_gap_is_reported_or_held_to_max_gap():
    reported = _check(_unfair, _cfg(slice_gap=[GROUP_RECALL]))
    assert reported.status is GateStatus.PASS
    assert "no champion: gap reported, not judged" in reported.checks[0].detail
    bounded = _check(_unfair, _cfg(slice_gap=[{**GROUP_RECALL, "max_gap": 0.05}]))
    assert bounded.status is GateStatus.FAIL and "gap" in bounded.reason


def test_fpr_gap_and_too_small_slices_are_inconclusive_not_pass():
    fpr = {"column": "group", "metric": "fpr", "max_widening": 0.05, "min_rows": 10_000}
    r = _check(_churn_by_tenure, _cfg(slice_gap=[fpr]))
    assert r.status is GateStatus.INCONCLUSIVE
    assert "no gap to judge" in r.checks[0].detail


def test_an_unscoreable_champion_fails_the_slice_gap():
    r = _check(_churn_by_tenure, _cfg(slice_gap=[GROUP_RECALL]), champion_error="sha256 mismatch")
    assert r.status is GateStatus.FAIL and "could not be scored" in r.reason


def test_a_missing_column_or_a_raising_check_fails_closed_and_others_still_run():
    cfg = _cfg(
        invariance=[{"column": "gone", "values": [1], "epsilon": 0.0}],
        directional=[TENURE_DOWN],
    )
    r = _check(_churn_by_tenure, cfg)
    assert r.status is GateStatus.FAIL
    assert [c.status for c in r.checks] == [GateStatus.FAIL, GateStatus.PASS]
    assert "'gone' not in the holdout" in r.checks[0].detail

    def breaks_on_change(frame: pd.DataFrame) -> np.ndarray:
        if frame["tenure"].max() > 72:
            raise ValueError("unseen tenure")
        return _churn_by_tenure(frame)

    r = _check(breaks_on_change, _cfg(directional=[TENURE_DOWN]))
    assert r.status is GateStatus.FAIL and "ValueError: unseen tenure" in r.reason

    r = _check(lambda f: np.full(len(f), np.nan), _cfg(directional=[TENURE_DOWN]))
    assert r.status is GateStatus.FAIL and "not finite" in r.reason


def test_failing_rows_reach_the_terminal_and_markdown_tables():
    def rises(frame: pd.DataFrame) -> np.ndarray:
        return 1 - _churn_by_tenure(frame)

    r = _check(rises, _cfg(directional=[TENURE_DOWN], max_failing_rows=3))
    md = gates_markdown([r])
    assert "| behaviour | fail |" in md
    assert "### behaviour: rows that broke an expectation (3 shown of" in md
    assert "| check | row | column | from | to | score | perturbed_score | change |" in md
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(gate_tables([r], max_passed_rows=None))
    text = console.export_text()
    assert "rows that broke an expectation" in text and "tenure" in text


def _config_with(tmp_path, behaviour: dict[str, Any]):
    raw = yaml.safe_load(BUNDLED_CONFIG.read_text())
    raw["dataset"]["path"] = str(BUNDLED_DATA)
    raw["registry"]["store_dir"] = str(tmp_path / "store")
    raw["gates"]["behaviour"] = behaviour
    path = tmp_path / "mlgate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (
            {"directional": [{"column": "tenure", "delta": 1, "direction": "down"}]},
            r"gates\.behaviour\.directional\.0\.direction",
        ),
        (
            {"directional": [{"column": "contract", "delta": 1, "direction": "non_increasing"}]},
            r"gates\.behaviour\.directional\[0\]\.column: 'contract' is not a numeric feature",
        ),
        (
            {"directional": [{"column": "tenure", "delta": 0, "direction": "non_increasing"}]},
            r"gates\.behaviour\.directional\.0\.delta",
        ),
        (
            {"invariance": [{"column": "tenure", "epsilon": 0.1}]},
            r"gates\.behaviour\.invariance\.0.*either values",
        ),
        (
            {"invariance": [{"column": "tenur", "perturbation": "shuffle"}]},
            r"gates\.behaviour\.invariance\[0\]\.column: 'tenur' is not a feature",
        ),
        (
            {"invariance": [{"column": "tenure", "values": ["long"]}]},
            r"gates\.behaviour\.invariance\[0\]\.values: 'tenure' is numeric",
        ),
        (
            {"slice_gap": [{"column": "region", "metric": "recall", "max_widening": 0.1}]},
            r"gates\.behaviour\.slice_gap\[0\]\.column: 'region'.*dataset\.slice_columns",
        ),
        (
            {"slice_gap": [{"column": "contract", "metric": "auc", "max_widening": 0.1}]},
            r"gates\.behaviour\.slice_gap\.0\.metric",
        ),
        (
            {"slice_gap": [{"column": "contract", "metric": "recall"}]},
            r"gates\.behaviour\.slice_gap\.0\.max_widening",
        ),
        ({"invariants": []}, r"gates\.behaviour\.invariants: unknown field"),
    ],
)
def test_config_errors_name_the_field(tmp_path, behaviour, message):
    with pytest.raises(ConfigError, match=message):
        _config_with(tmp_path, behaviour)


def test_the_bundled_config_declares_checks_and_the_default_declares_none(bundled_cfg):
    declared = bundled_cfg.gates.behaviour
    assert declared.invariance and declared.directional and declared.slice_gap
    assert BehaviourGateConfig() == BehaviourGateConfig(invariance=(), directional=())
