"""End to end: the real training flow on the bundled data, real MLflow on SQLite in a temp
dir, Prefect's test harness. Each test that trains or changes the registry does so on its
own copy of the session's seed registry (champion v1), so no test depends on another."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from checks.result import GateStatus
from flows import alias_moves, model_versions, registry, training
from flows.cli import EXIT_REJECTED, EXIT_USAGE, app
from flows.training import training_flow
from models.config import load_config
from models.data import DataError
from models.performance_estimate import Calibrator
from models.registry_layout import CALIBRATOR_ARTIFACT
from tests.conftest import BUNDLED_DATA, write_config
from tests.flows.conftest import Seed, copy_registry

pytestmark = pytest.mark.integration

SMALL = {"estimator": "gradient_boosting", "params": {"n_estimators": 5, "max_depth": 1}}


@pytest.fixture()
def config_path(seed: Seed, tmp_path: Path) -> Path:
    """This test's own registry, holding the seed's champion (v1)."""
    return copy_registry(seed, tmp_path)


@pytest.fixture()
def first(seed: Seed):
    return seed.outcome


def test_first_run_registers_champion_on_floor_alone(seed: Seed):
    first, config_path = seed.outcome, seed.config_path
    assert first.accepted, first.reason
    assert [g.name for g in first.gates] == ["data", "parity", "behaviour", "champion"]
    assert all(g.status is GateStatus.PASS for g in first.gates)
    assert "no champion yet" in first.gates[-1].reason
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    mv = client.get_model_version_by_alias("churn", "champion")
    assert str(mv.version) == first.version == "1"
    assert str(registry.get_alias_version(client, "churn", "challenger").version) == "1"
    tags = mv.tags
    assert tags["gate.data"] == tags["gate.parity"] == tags["gate.champion"] == "pass"
    assert tags["gate.behaviour"] == "pass"
    assert len(tags[registry.SHA_TAG]) == 64 and tags["data_hash"] == first.data_hash
    assert tags["git_commit"]
    assert tags["evidence.report"].endswith("evidence/model_report.html")
    run = client.get_run(mv.run_id)
    assert run.data.metrics["roc_auc"] > 0.8
    assert run.data.params["estimator"] == "gradient_boosting"
    evidence = registry.version_gate_results(client, mv)
    assert [g.name for g in evidence] == ["data", "parity", "behaviour", "champion"]
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "evidence")}
    assert {"evidence/gates.json", "evidence/model_report.html", "evidence/data_docs"} <= artifacts
    report = Path(client.download_artifacts(mv.run_id, registry.REPORT_ARTIFACT))
    assert "<svg" in report.read_text() and "roc_auc floor" in report.read_text()
    hist = registry.load_json_artifact(client, mv.run_id, registry.HISTOGRAMS_ARTIFACT)
    assert {h["column"] for h in hist["histograms"]} >= {"tenure", "contract", "__score__"}
    calibrator = Calibrator.from_dict(
        registry.load_json_artifact(client, mv.run_id, CALIBRATOR_ARTIFACT)
    )
    assert calibrator.holdout["roc_auc"] == pytest.approx(run.data.metrics["roc_auc"], abs=1e-3)
    history = alias_moves.alias_history(client, "churn", "champion")
    assert history[0]["to_version"] == "1" and history[0]["from_version"] == "None"
    assert history[0]["actor"].startswith("prefect:training_flow")


def test_small_challenger_is_rejected_and_champion_kept(config_path, first, monkeypatch):
    monkeypatch.setenv("MLGATE_TRAIN__ESTIMATOR", SMALL["estimator"])
    monkeypatch.setenv("MLGATE_TRAIN__PARAMS", json.dumps(SMALL["params"]))
    out = training_flow(config_path=str(config_path))
    assert not out.accepted and out.stopped_at == "champion"
    gate = out.gates[-1]
    assert gate.status is GateStatus.FAIL
    assert gate.metrics["delta_ci_low"] < -0.01
    assert f"champion v{first.version}" in gate.reason
    client = registry.connect(load_config(config_path).registry)
    assert str(client.get_model_version_by_alias("churn", "champion").version) == first.version
    rejected = client.get_model_version("churn", out.version)
    assert rejected.tags["gate.champion"] == "fail"
    drift = registry.load_json_artifact(client, out.run_id, registry.DRIFT_ARTIFACT)
    assert drift["name"] == "drift" and drift["metrics"]["max_psi"] < 0.1  # same data
    assert rejected.tags["mlgate.outcome"] == "rejected"


def test_data_gate_failure_stops_before_training(config_path, tmp_path):
    df = pd.read_parquet(BUNDLED_DATA)
    df.loc[df.sample(frac=0.4, random_state=0).index, "tenure"] = None
    bad = tmp_path / "nulls.parquet"
    df.to_parquet(bad)
    client = registry.connect(load_config(config_path).registry)
    versions_before = len(model_versions.list_versions(client, "churn"))
    out = training_flow(config_path=str(config_path), data_path=str(bad))
    assert not out.accepted and out.stopped_at == "data"
    assert [g.name for g in out.gates] == ["data"]
    assert "tenure" in out.gates[0].reason
    assert len(model_versions.list_versions(client, "churn")) == versions_before
    run = client.get_run(out.run_id)
    assert run.data.tags["gate.data"] == "fail" and run.info.status == "FINISHED"


def test_missing_column_fails_with_its_name(tmp_path):
    config_path = write_config(tmp_path)
    df = pd.read_parquet(BUNDLED_DATA).drop(columns=["monthly_charges"])
    bad = tmp_path / "no_charges.parquet"
    df.to_parquet(bad)
    with pytest.raises(DataError, match="monthly_charges"):
        training_flow(config_path=str(config_path), data_path=str(bad))


def test_cli_train_exit_codes_and_gate_table(config_path, tmp_path):
    runner = CliRunner()
    (tmp_path / "bad").mkdir()
    bad_cfg = write_config(tmp_path / "bad", gates={"champion": {"flor": 0.5}})
    result = runner.invoke(app, ["train", "--config", str(bad_cfg)])
    assert result.exit_code == EXIT_USAGE
    assert "gates.champion.flor" in result.output

    result = runner.invoke(
        app,
        ["train", "--config", str(config_path)],
        env={"MLGATE_TRAIN__PARAMS": json.dumps(SMALL["params"])},
    )
    assert result.exit_code == EXIT_REJECTED, result.output
    assert "REJECTED" in result.output

    shown = runner.invoke(app, ["gates", "show", "churn", "1", "--config", str(config_path)])
    assert shown.exit_code == 0, shown.output
    assert "champion" in shown.output and "roc_auc floor" in shown.output

    listed = runner.invoke(app, ["models", "list", "--config", str(config_path), "--json"])
    rows = json.loads(listed.output)
    assert rows[-1]["version"] == "1" and "champion" in rows[-1]["aliases"]


def test_cli_init_then_config_loads(tmp_path):
    out = tmp_path / "mlgate.yaml"
    result = CliRunner().invoke(
        app, ["init", "--data", str(BUNDLED_DATA), "--target", "churn", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.dataset.path == BUNDLED_DATA and cfg.dataset.id_column == "customer_id"
    again = CliRunner().invoke(
        app, ["init", "--data", str(BUNDLED_DATA), "--target", "churn", "--output", str(out)]
    )
    assert again.exit_code == EXIT_USAGE and "exists" in again.output


def test_retraining_an_identical_model_registers_nothing(config_path, first):
    client = registry.connect(load_config(config_path).registry)
    before = len(model_versions.list_versions(client, "churn"))
    again = training_flow(config_path=str(config_path))
    assert again.accepted and "identical to champion" in again.reason
    assert again.gates[-1].metrics["delta"] == 0.0
    assert len(model_versions.list_versions(client, "churn")) == before
    assert client.get_run(again.run_id).data.tags["identical_to_version"] == first.version


def test_unreadable_champion_fails_the_gate_not_passes(config_path):
    """A champion whose file no longer matches its registered sha256 cannot be scored: the
    challenger must not be waved through as if there were no champion."""
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    champ = client.get_model_version_by_alias("churn", "champion")
    client.set_model_version_tag("churn", str(champ.version), registry.SHA_TAG, "f" * 64)
    out = training_flow(config_path=str(config_path))
    # The bundled slice-gap checks compare with the champion too: both gates fail.
    assert not out.accepted and out.stopped_at == "behaviour"
    assert "could not be scored" in out.gates[-2].reason
    assert "could not be scored" in out.gates[-1].reason
    assert "sha256" in out.gates[-1].reason


def test_a_crash_before_the_registry_writes_leaves_nothing(config_path, monkeypatch):
    """MLflow is written only once the evidence is complete: a step that fails after the
    champion gate leaves no run (not even a failed one) and no version behind."""

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setenv("MLGATE_TRAIN__PARAMS", json.dumps(SMALL["params"]))
    monkeypatch.setattr(training, "build_histograms", broken)
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    experiment = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    runs_before = len(client.search_runs([experiment]))
    versions_before = len(model_versions.list_versions(client, "churn"))
    with pytest.raises(RuntimeError, match="disk full"):
        training_flow(config_path=str(config_path))
    assert len(client.search_runs([experiment])) == runs_before
    assert len(model_versions.list_versions(client, "churn")) == versions_before
