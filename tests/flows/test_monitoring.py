"""The monitoring flow end to end: real MLflow, real champion (a copy of the session's seed
registry per test), inference-log Parquet files in the layout the service writes, Prefect's
test harness. The retraining it triggers is the real training flow, run as a subflow."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from checks.result import GateStatus
from flows import model_versions, registry
from flows.cli import app
from flows.demo import shifted_batch
from flows.monitoring import (
    combine_training_data,
    load_trigger_state,
    monitoring_flow,
    processed_dir,
    quarantine_dir,
)
from models.config import MlgateConfig, load_config
from models.model_ref import ModelRef
from models.onnx_export import make_session, predict_proba_with_schema
from models.registry_layout import MONITORING_ARTIFACT
from services.model_store import load_registered_model
from tests.conftest import BUNDLED_DATA
from tests.flows.conftest import Seed, copy_registry

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


def write_log(cfg: MlgateConfig, rows: pd.DataFrame, version: str, at: datetime) -> None:
    """Rows as the service logs them (one Parquet part per call, date partition)."""
    loaded = load_registered_model(
        cfg.registry.resolved_tracking_uri(), ModelRef(cfg.registry.model_name, version=version)
    )
    scores = predict_proba_with_schema(make_session(loaded.content), rows, loaded.schema)
    log = rows[list(cfg.dataset.features)].copy()
    for c in cfg.dataset.numeric_features:
        log[c] = log[c].astype("float64")
    log.insert(0, "score", scores)
    log.insert(0, "latency_ms", 1.0)
    log.insert(0, "variant", "stable")
    log.insert(0, "model_version", version)
    log.insert(0, "model_name", cfg.registry.model_name)
    log.insert(0, "request_id", [f"r{i}" for i in range(len(rows))])
    log.insert(0, "ts", pd.Timestamp(at).tz_convert("UTC"))
    folder = cfg.inference_log_dir() / cfg.registry.model_name / f"date={at:%Y-%m-%d}"
    folder.mkdir(parents=True, exist_ok=True)
    log.to_parquet(folder / f"part-{int(at.timestamp() * 1000)}-{os.getpid()}-0.parquet")


@pytest.fixture()
def env(seed: Seed, tmp_path: Path) -> tuple[Path, MlgateConfig, str, pd.DataFrame]:
    path = copy_registry(
        seed, tmp_path, monitor={"consecutive_windows": 2, "cooldown_hours": 12, "window_hours": 1}
    )
    return path, load_config(path), seed.outcome.version, pd.read_parquet(BUNDLED_DATA)


def test_stable_traffic_never_triggers(env):
    path, cfg, version, df = env
    for i in range(3):
        at = NOW + timedelta(hours=i)
        write_log(cfg, df.sample(800, random_state=i), version, at - timedelta(minutes=5))
        out = monitoring_flow(config_path=str(path), now=at)
        drift = next(g for g in out.gates if g.name == "drift")
        assert drift.status is GateStatus.PASS, drift.reason
        assert not out.retrained and out.rows == 800
    assert load_trigger_state(cfg).consecutive_drift == 0


def test_shifted_traffic_triggers_exactly_one_retraining(env):
    path, cfg, version, df = env
    client = registry.connect(cfg.registry)
    versions_before = len(model_versions.list_versions(client, cfg.registry.model_name))
    outcomes = []
    for i in range(4):
        at = NOW + timedelta(hours=i)
        write_log(cfg, shifted_batch(df, 800, i), version, at - timedelta(minutes=5))
        outcomes.append(monitoring_flow(config_path=str(path), now=at))
    drifts = [next(g for g in o.gates if g.name == "drift") for o in outcomes]
    assert all(d.status is GateStatus.FAIL for d in drifts)
    assert "contract" in drifts[0].reason and "monthly_charges" in drifts[0].reason
    assert [o.retrained for o in outcomes] == [False, True, False, False]
    assert "cooldown" in outcomes[3].decision
    assert outcomes[1].training and outcomes[1].training.startswith("training subflow")
    # The retrain ran on the configured data again: byte-identical model, nothing new.
    assert "identical to champion" in outcomes[1].training
    assert len(model_versions.list_versions(client, cfg.registry.model_name)) == versions_before
    run = client.get_run(outcomes[0].run_id)
    assert run.data.metrics["psi.contract"] > 0.25
    assert {a.path for a in client.list_artifacts(outcomes[0].run_id, "evidence")} == {
        "evidence/drift_report.html"
    }


def test_thin_or_broken_windows_never_trigger(env):
    path, cfg, version, df = env
    at = NOW
    write_log(cfg, shifted_batch(df, 50, 0), version, at - timedelta(minutes=5))
    thin = monitoring_flow(config_path=str(path), now=at)
    assert next(g for g in thin.gates if g.name == "drift").status is GateStatus.INCONCLUSIVE
    broken = shifted_batch(df, 800, 1)
    broken.loc[broken.sample(frac=0.4, random_state=0).index, "tenure"] = None
    for i in range(1, 4):
        write_log(cfg, broken, version, at + timedelta(hours=i, minutes=-5))
        out = monitoring_flow(config_path=str(path), now=at + timedelta(hours=i))
        assert not out.retrained
        assert next(g for g in out.gates if g.name == "data").status is GateStatus.FAIL
    assert "alert" in out.decision


def test_empty_windows_are_no_traffic_alerts_that_keep_the_streak(env):
    """No traffic says nothing about drift: empty windows between drifted ones neither count
    towards the retrain (consecutive_windows is 2 here) nor reset the streak."""
    path, cfg, version, df = env
    write_log(cfg, shifted_batch(df, 800, 0), version, NOW - timedelta(minutes=5))
    drifted = monitoring_flow(config_path=str(path), now=NOW, retrain=False)
    assert next(g for g in drifted.gates if g.name == "drift").status is GateStatus.FAIL
    assert drifted.traffic == "enough" and not drifted.alerts
    for i in (1, 2):
        out = monitoring_flow(config_path=str(path), now=NOW + timedelta(hours=i), retrain=False)
        drift = next(g for g in out.gates if g.name == "drift")
        assert drift.status is GateStatus.INCONCLUSIVE and drift.reason.startswith("no traffic")
        assert out.rows == 0 and out.traffic == "no_traffic" and "no traffic" in out.decision
        assert [a["kind"] for a in out.alerts] == ["no_traffic"]
        assert load_trigger_state(cfg).consecutive_drift == 1
    client = registry.connect(cfg.registry)
    tags = client.get_run(out.run_id).data.tags
    assert tags["traffic"] == "no_traffic" and tags["alerts"] == "no_traffic"
    logged = registry.load_json_artifact(client, out.run_id, MONITORING_ARTIFACT)
    assert logged["traffic"] == "no_traffic" and logged["alerts"][0]["kind"] == "no_traffic"


def test_monitor_judges_the_window_it_is_given(env):
    """`mlgate monitor --until T --window D`: a backfill of a past window, its length from the
    command line rather than monitor.window_hours (1 h here)."""
    path, cfg, version, df = env
    until = NOW - timedelta(days=2)
    write_log(cfg, df.sample(300, random_state=7), version, until - timedelta(minutes=100))
    write_log(cfg, df.sample(300, random_state=8), version, until - timedelta(minutes=5))
    write_log(cfg, df.sample(300, random_state=9), version, until + timedelta(minutes=5))
    args = ["monitor", "--config", str(path), "--no-retrain", "--json"]
    window = ["--until", until.isoformat(), "--window", "2h"]
    result = CliRunner().invoke(app, [*args, *window])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert out["rows"] == 600 and out["traffic"] == "enough"
    assert datetime.fromisoformat(out["window_end"]) == until
    assert datetime.fromisoformat(out["window_start"]) == until - timedelta(hours=2)
    short = monitoring_flow(config_path=str(path), now=until, retrain=False)
    assert short.rows == 300


def test_labelled_batch_gives_the_live_metric(env):
    path, cfg, version, df = env
    cfg.incoming_dir().mkdir(parents=True, exist_ok=True)
    df.sample(600, random_state=3).to_parquet(cfg.incoming_dir() / "labels-week1.parquet")
    write_log(cfg, df.sample(400, random_state=4), version, NOW - timedelta(minutes=5))
    out = monitoring_flow(config_path=str(path), now=NOW)
    assert 0.75 < out.live_metrics["live_roc_auc"] < 0.95
    assert out.live_metrics["labelled_rows"] == 600
    assert not list(cfg.incoming_dir().glob("*.parquet"))
    assert (cfg.incoming_dir() / "processed" / "labels-week1.parquet").exists()
    # Before labels: the window's estimate, judged against the holdout; once labels land,
    # the estimate on the labelled rows beside what they realized.
    estimate = next(g for g in out.gates if g.name == "estimated_performance")
    assert estimate.status is GateStatus.PASS, estimate.reason
    assert 0.75 < estimate.metrics["estimated_roc_auc"] < 0.95
    live = out.live_metrics
    assert live["live_realized_roc_auc"] == live["live_roc_auc"]
    assert live["live_estimation_error_roc_auc"] == pytest.approx(
        live["live_estimated_roc_auc"] - live["live_realized_roc_auc"]
    )
    assert abs(live["live_estimation_error_roc_auc"]) < 0.1
    recorded = registry.connect(cfg.registry).get_run(out.run_id).data
    assert recorded.tags["gate.estimated_performance"] == "pass"
    for name in ("estimated_roc_auc", "estimated_drop", "live_estimation_error_recall"):
        assert name in recorded.metrics


def test_a_batch_that_fails_its_gate_is_quarantined_and_never_trained_on(env):
    path, cfg, _, df = env
    cfg.incoming_dir().mkdir(parents=True, exist_ok=True)
    good = df.sample(600, random_state=5).assign(customer_id=lambda d: range(900_000, 900_600))
    bad = df.sample(600, random_state=6).assign(customer_id=lambda d: range(950_000, 950_600))
    bad.loc[bad.sample(frac=0.4, random_state=0).index, "tenure"] = None
    good.to_parquet(cfg.incoming_dir() / "labels-good.parquet")
    bad.to_parquet(cfg.incoming_dir() / "labels-bad.parquet")
    out = monitoring_flow(config_path=str(path), now=NOW, retrain=False)

    gates = {g.name: g.status for g in out.gates}
    assert gates["incoming:labels-bad.parquet"] is GateStatus.FAIL
    assert gates["incoming:labels-good.parquet"] is GateStatus.PASS
    assert out.quarantined == ["labels-bad.parquet"]
    assert out.live_metrics["labelled_rows"] == 600  # the bad batch is not scored either
    assert [p.name for p in quarantine_dir(cfg).iterdir()] == ["labels-bad.parquet"]
    assert [p.name for p in processed_dir(cfg).iterdir()] == ["labels-good.parquet"]
    assert not list(cfg.incoming_dir().glob("*.parquet"))
    client = registry.connect(cfg.registry)
    run = client.get_run(out.run_id)
    assert run.data.tags["quarantined"] == "labels-bad.parquet"
    assert run.data.tags["gate.incoming:labels-bad.parquet"] == "fail"
    logged = registry.load_json_artifact(client, out.run_id, MONITORING_ARTIFACT)
    assert logged["quarantined"] == ["labels-bad.parquet"]

    data_path = combine_training_data(cfg)
    assert data_path is not None
    ids = set(pd.read_parquet(data_path)["customer_id"])
    assert set(good["customer_id"]) <= ids
    assert not ids & set(bad["customer_id"])
