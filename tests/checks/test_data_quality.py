"""The data gate against real Great Expectations on the bundled churn data."""

from __future__ import annotations

import html
import json
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from checks.data_quality import DataProfile, check_data_quality, profile_reference
from checks.result import GateResult, GateStatus
from models.config import MlgateConfig, config_from_dict, load_config

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg() -> MlgateConfig:
    return load_config(REPO / "mlgate.yaml")


@pytest.fixture(scope="module")
def churn(cfg: MlgateConfig) -> pd.DataFrame:
    return pd.read_parquet(cfg.dataset.path)


@pytest.fixture(scope="module")
def profile(churn: pd.DataFrame, cfg: MlgateConfig) -> DataProfile:
    return profile_reference(churn, cfg.dataset)


def _gate(df: pd.DataFrame, cfg: MlgateConfig, profile: DataProfile, **kw) -> GateResult:
    return check_data_quality(df, cfg.dataset, cfg.gates.data, profile, **kw)


def _failed(result: GateResult) -> list[str]:
    return [c.check for c in result.checks if c.status is GateStatus.FAIL]


def _assert_fails_on(result: GateResult, column: str, *words: str) -> None:
    assert result.name == "data"
    assert result.status is GateStatus.FAIL, result.reason
    # A verdict, not an error inside the gate.
    assert "gate error" not in result.reason, result.reason
    assert column in result.reason, result.reason
    for word in words:
        assert word in result.reason, result.reason
    assert any(column in check for check in _failed(result)), _failed(result)
    assert result.metrics["checks_failed"] == len(_failed(result))


def test_bundled_data_passes_against_its_own_profile(churn, cfg, profile):
    result = _gate(churn, cfg, profile)

    assert result.status is GateStatus.PASS, result.reason
    assert result.name == "data"
    assert result.metrics["rows"] == len(churn)
    assert result.metrics["checks_failed"] == 0
    assert result.metrics["checks_total"] == len(result.checks) > 50
    checks = {c.check for c in result.checks}
    assert "tenure within [-7.2, 79.2]" in checks
    assert "column contract present" in checks
    assert "customer_id (id) unique" in checks
    # The evidence is JSON as it stands: it goes to MLflow without further conversion.
    evidence = json.loads(json.dumps(result.to_dict()))["evidence"]
    gx_results = [r for r in evidence["results"] if r["source"] == "great_expectations"]
    assert {r["expectation_type"] for r in gx_results} >= {
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_unique",
    }
    assert all(r["success"] for r in evidence["results"])
    assert not [k for k in evidence if k.startswith("data_docs")]


def test_renamed_column_fails_naming_the_column(churn, cfg, profile):
    renamed = churn.rename(columns={"contract": "contract_type"})

    result = _gate(renamed, cfg, profile)

    _assert_fails_on(result, "contract", "missing")
    assert "column contract present" in _failed(result)
    assert "contract_type" in result.reason


def test_strings_in_a_numeric_column_fail_naming_column_and_values(churn, cfg, profile):
    bad = churn.copy()
    bad["monthly_charges"] = bad["monthly_charges"].astype(object)
    bad.loc[:4, "monthly_charges"] = "abc"
    bad.loc[5, "monthly_charges"] = "xyz"

    result = _gate(bad, cfg, profile)

    _assert_fails_on(result, "monthly_charges", "expected numeric", "object", "'abc'", "'xyz'")
    assert _failed(result) == ["monthly_charges numeric type"]


def test_forty_percent_nulls_fail_naming_the_column(churn, cfg, profile):
    bad = churn.copy()
    bad.loc[bad.sample(frac=0.4, random_state=0).index, "contract"] = None

    result = _gate(bad, cfg, profile)

    _assert_fails_on(result, "contract", "40.0% nulls", "5.0% allowed")


def test_nulls_within_the_reference_share_plus_tolerance_pass(churn, cfg, profile):
    ok = churn.copy()
    ok.loc[ok.sample(frac=0.03, random_state=0).index, "tenure"] = np.nan

    assert _gate(ok, cfg, profile).status is GateStatus.PASS


def test_unseen_label_value_fails(churn, cfg, profile):
    bad = churn.copy()
    bad.loc[:9, "churn"] = "Maybe"

    result = _gate(bad, cfg, profile)

    _assert_fails_on(result, "churn", "'Maybe'")


def test_null_labels_fail(churn, cfg, profile):
    bad = churn.copy()
    bad.loc[:2, "churn"] = None

    _assert_fails_on(_gate(bad, cfg, profile), "churn", "null labels")


def test_duplicate_ids_fail(churn, cfg, profile):
    bad = churn.copy()
    bad.loc[1:5, "customer_id"] = bad.loc[0, "customer_id"]

    result = _gate(bad, cfg, profile)

    _assert_fails_on(result, "customer_id", "duplicated")


def test_too_few_rows_fail(churn, cfg, profile):
    result = _gate(churn.head(100), cfg, profile)

    assert result.status is GateStatus.FAIL
    assert "rows: 100 < 500 minimum" in result.reason
    assert _failed(result) == ["row count ≥ 500"]


def test_a_handful_of_outliers_pass_but_a_shifted_column_fails(churn, cfg, profile):
    few = churn.copy()
    few.loc[:9, "tenure"] = 500
    assert _gate(few, cfg, profile).status is GateStatus.PASS

    shifted = churn.copy()
    shifted["tenure"] = shifted["tenure"] * 12
    _assert_fails_on(_gate(shifted, cfg, profile), "tenure", "outside [-7.2, 79.2]")


def test_unknown_categories_beyond_the_allowed_share_fail(churn, cfg, profile):
    bad = churn.copy()
    bad.loc[:199, "payment_method"] = "Crypto"

    _assert_fails_on(_gate(bad, cfg, profile), "payment_method", "'Crypto'")


def test_without_label_passes_on_data_without_the_target(churn, cfg, profile):
    unlabelled = churn.drop(columns=[cfg.dataset.target])

    result = _gate(unlabelled, cfg, profile, with_label=False)

    assert result.status is GateStatus.PASS, result.reason
    assert not any("churn" in c.check for c in result.checks)


def test_live_traffic_is_features_only(churn, cfg, profile):
    requests = churn[list(cfg.dataset.features)]

    result = _gate(requests, cfg, profile, with_label=False)

    assert result.status is GateStatus.PASS, result.reason
    assert not any("customer_id" in c.check for c in result.checks)
    renamed = requests.rename(columns={"tenure": "tenure_months"})
    _assert_fails_on(_gate(renamed, cfg, profile, with_label=False), "tenure", "missing")


def test_missing_target_fails_when_labels_are_expected(churn, cfg, profile):
    _assert_fails_on(_gate(churn.drop(columns=["churn"]), cfg, profile), "churn", "missing")


def test_column_unknown_to_the_reference_profile_fails(churn, cfg):
    partial = profile_reference(churn.drop(columns=["tenure"]), cfg.dataset)

    result = _gate(churn, cfg, partial)

    _assert_fails_on(result, "tenure", "not in the reference profile")


def test_profile_round_trips_through_json(profile, churn):
    again = DataProfile.from_dict(json.loads(json.dumps(profile.to_dict())))

    assert again == profile
    assert profile.row_count == len(churn)
    assert profile.columns["customer_id"] == "id"
    assert profile.columns["churn"] == "label"
    assert profile.columns["tenure"] == "numeric"
    assert profile.columns["contract"] == "categorical"
    assert profile.numeric_ranges["tenure"] == (0.0, 72.0)
    assert profile.categories["contract"] == ["Month-to-month", "One year", "Two year"]
    assert profile.label_values == ["No", "Yes"]
    assert profile.null_shares["total_charges"] == pytest.approx(11 / 7043)


def test_an_error_inside_the_gate_fails_closed(cfg, profile):
    result = check_data_quality(
        "not a frame",  # type: ignore[arg-type]
        cfg.dataset,
        cfg.gates.data,
        profile,
    )

    assert result.status is GateStatus.FAIL
    assert "gate error" in result.reason
    assert result.evidence["error"]


def _events(n: int = 600, newest: datetime = datetime(2026, 3, 31)) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "event_id": np.arange(n),
            "amount": rng.normal(50, 10, n),
            "channel": rng.choice(["web", "app", "store"], n),
            "seen_at": newest - pd.to_timedelta(rng.integers(0, 30, n), unit="D"),
            "label": rng.integers(0, 2, n),
        }
    )


def _events_cfg(max_staleness_days: float) -> MlgateConfig:
    return config_from_dict(
        {
            "dataset": {
                "path": "events.parquet",
                "target": "label",
                "id_column": "event_id",
                "numeric_features": ["amount"],
                "categorical_features": ["channel"],
                "timestamp_column": "seen_at",
            },
            "gates": {"data": {"min_rows": 100, "max_staleness_days": max_staleness_days}},
        }
    )


def test_freshness_judged_against_now():
    events = _events()
    ev_cfg = _events_cfg(max_staleness_days=7)
    ref = profile_reference(events, ev_cfg.dataset)

    fresh = check_data_quality(
        events, ev_cfg.dataset, ev_cfg.gates.data, ref, now=datetime(2026, 4, 2, tzinfo=UTC)
    )
    stale = check_data_quality(
        events,
        ev_cfg.dataset,
        ev_cfg.gates.data,
        ref,
        now=datetime(2026, 4, 2, tzinfo=UTC) + timedelta(days=30),
    )

    assert fresh.status is GateStatus.PASS, fresh.reason
    _assert_fails_on(stale, "seen_at", "32.0 days old", "7 days allowed")


def test_unparseable_timestamps_fail_naming_the_column():
    events = _events()
    ev_cfg = _events_cfg(max_staleness_days=7)
    ref = profile_reference(events, ev_cfg.dataset)
    as_text = events.assign(seen_at=events["seen_at"].astype(str))
    as_text.loc[3, "seen_at"] = "yesterday"

    result = check_data_quality(
        as_text, ev_cfg.dataset, ev_cfg.gates.data, ref, now=datetime(2026, 4, 1)
    )

    _assert_fails_on(result, "seen_at", "expected timestamps", "'yesterday'")


NOW = datetime(2026, 4, 1, tzinfo=UTC)


def _page_text(path: Path) -> str:
    raw = re.sub(r"<script.*?</script>|<style.*?</style>", " ", path.read_text(), flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", raw)))


def _without_docs(result: GateResult) -> dict:
    d = result.to_dict()
    del d["metrics"]["seconds"]
    d["evidence"] = {k: v for k, v in d["evidence"].items() if not k.startswith("data_docs")}
    return d


@pytest.fixture
def offline(monkeypatch):
    """Docs must render without the network: any connection attempt fails the render."""

    def refuse(*args, **kwargs):
        raise OSError("network access during the data gate")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_data_docs_show_the_failing_column_and_leave_the_verdict_alone(
    churn, cfg, profile, tmp_path, offline
):
    bad = churn.copy()
    bad.loc[bad.sample(frac=0.4, random_state=0).index, "contract"] = None
    docs = tmp_path / "docs"

    with_docs = _gate(bad, cfg, profile, now=NOW, docs_dir=docs)
    plain = _gate(bad, cfg, profile, now=NOW)

    _assert_fails_on(with_docs, "contract", "40.0% nulls")
    assert _without_docs(with_docs) == _without_docs(plain)
    assert "data_docs_error" not in with_docs.evidence
    assert with_docs.evidence["data_docs_index"] == "index.html"
    assert (docs / "index.html").is_file()
    assert (docs / "expectations" / "data.html").is_file()
    page_path = with_docs.evidence["data_docs_validation_page"]
    assert page_path in (docs / "index.html").read_text()
    page = _page_text(docs / page_path)
    assert "Status: Failed" in page
    assert "Unsuccessful Expectations 1 " in page
    nulls = int(bad["contract"].isna().sum())
    # GX groups results under a heading per column, in prose rather than expectation names.
    contract = page[page.index(" contract Status Expectation Observed Value ") :][:300]
    assert "values must not be null, at least 95 % of the time" in contract
    assert f"{nulls} unexpected values found" in contract


def test_data_docs_of_a_passing_batch(churn, cfg, profile, tmp_path, offline):
    result = _gate(churn, cfg, profile, docs_dir=tmp_path)

    assert result.status is GateStatus.PASS, result.reason
    page = _page_text(tmp_path / result.evidence["data_docs_validation_page"])
    assert "Status: Succeeded" in page
    gx_checks = sum(r["source"] == "great_expectations" for r in result.evidence["results"])
    assert f"Evaluated Expectations {gx_checks} " in page
    assert "monthly_charges" in page


def test_docs_that_cannot_be_written_are_an_error_in_the_evidence_not_a_verdict(
    churn, cfg, profile, tmp_path
):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("taken")
    bad = churn.copy()
    bad.loc[:199, "payment_method"] = "Crypto"

    passed = _gate(churn, cfg, profile, docs_dir=not_a_dir)
    failed = _gate(bad, cfg, profile, docs_dir=not_a_dir)

    assert passed.status is GateStatus.PASS, passed.reason
    _assert_fails_on(failed, "payment_method", "'Crypto'")
    for result in (passed, failed):
        assert result.evidence["data_docs_error"]
        assert "data_docs_index" not in result.evidence


def test_a_page_gx_fails_to_render_is_an_error_in_the_evidence(
    churn, cfg, profile, tmp_path, monkeypatch
):
    from great_expectations.render.renderer import ValidationResultsPageRenderer

    def broken(self, *args, **kwargs):
        raise RuntimeError("renderer broke")

    # GX logs a failed page and goes on without it; the gate must notice the page is missing.
    monkeypatch.setattr(ValidationResultsPageRenderer, "render", broken)

    result = _gate(churn, cfg, profile, docs_dir=tmp_path)

    assert result.status is GateStatus.PASS, result.reason
    assert "validation page" in result.evidence["data_docs_error"]
    assert "renderer broke" in result.evidence["data_docs_error"]


def test_a_gate_error_with_docs_requested_says_no_docs_were_rendered(cfg, profile, tmp_path):
    result = check_data_quality(
        "not a frame",  # type: ignore[arg-type]
        cfg.dataset,
        cfg.gates.data,
        profile,
        docs_dir=tmp_path,
    )

    assert result.status is GateStatus.FAIL
    assert result.evidence["data_docs_error"]
    assert not list(tmp_path.iterdir())
