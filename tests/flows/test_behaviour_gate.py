"""The behaviour gate in the real training flow: the bundled checks hold for the champion,
and a declared expectation the challenger breaks rejects it with the reason, its rows in the
evidence, its table in `mlgate gates show` and its section in `mlgate report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from checks.result import GateStatus
from flows import registry
from flows.cli import EXIT_REJECTED, app
from flows.training import training_flow
from models.config import load_config
from tests.flows.conftest import Seed, copy_registry

pytestmark = pytest.mark.integration

# Another model than the seed's champion (an identical one would register nothing).
PARAMS = {"n_estimators": 60, "max_depth": 3, "learning_rate": 0.05}
# False for churn: more tenure lowers it.
WRONG_WAY = {"column": "tenure", "delta": 12, "direction": "non_decreasing", "tolerance": 0.0}


def test_the_bundled_checks_hold_for_the_champion(seed: Seed):
    gates = {g.name: g for g in seed.outcome.gates}
    behaviour = gates["behaviour"]
    assert behaviour.status is GateStatus.PASS, behaviour.reason
    assert len(behaviour.checks) == 4 and behaviour.evidence["failing_rows"] == []
    # No champion yet: the slice gaps are held to their max_gap alone, and say so.
    assert all("max_gap alone" in c.detail for c in behaviour.checks if "slice gap" in c.check)


def test_a_broken_expectation_rejects_the_challenger_with_its_rows(
    seed: Seed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config_path = copy_registry(seed, tmp_path, gates={"behaviour": {"directional": [WRONG_WAY]}})
    monkeypatch.setenv("MLGATE_TRAIN__PARAMS", json.dumps(PARAMS))
    out = training_flow(config_path=str(config_path))

    assert not out.accepted and out.stopped_at == "behaviour"
    assert out.version is not None and out.run_id is not None  # registered, as rejected
    version, run_id = out.version, out.run_id
    assert out.reason.startswith("behaviour gate fail: 1 of 1 behavioural check(s) not passed")
    assert "directional tenure +12" in out.reason and "rows broke it" in out.reason
    gate = next(g for g in out.gates if g.name == "behaviour")
    rows = gate.evidence["failing_rows"]
    assert 0 < len(rows) <= 20 and gate.metrics["directional.tenure.rows_broken"] >= len(rows)
    assert all(r["change"] < 0 and r["to"] == r["from"] + 12 for r in rows)

    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    assert str(client.get_model_version_by_alias("churn", "champion").version) == "1"
    mv = client.get_model_version("churn", version)
    assert mv.tags["gate.behaviour"] == "fail" and mv.tags["mlgate.outcome"] == "rejected"
    run = client.get_run(run_id)
    broken = "directional.tenure.rows_broken"
    assert run.data.metrics[f"gate.behaviour.{broken}"] == gate.metrics[broken]
    stored = {g.name: g for g in registry.version_gate_results(client, mv)}
    assert stored["behaviour"].evidence["failing_rows"] == rows

    runner = CliRunner()
    shown = runner.invoke(app, ["gates", "show", "churn", version, "--config", str(config_path)])
    assert shown.exit_code == 0, shown.output
    assert "gate: behaviour" in shown.output and "rows that broke an expectation" in shown.output
    report = runner.invoke(app, ["report", run_id, "--config", str(config_path)])
    assert report.exit_code == 0, report.output
    assert "stopped at the **behaviour** gate" in report.output
    assert "### behaviour" in report.output and "| directional tenure +12" in report.output

    again = runner.invoke(
        app,
        ["train", "--config", str(config_path)],
        env={"MLGATE_TRAIN__PARAMS": json.dumps({**PARAMS, "n_estimators": 61})},
    )
    assert again.exit_code == EXIT_REJECTED, again.output
    assert "behaviour" in again.output
