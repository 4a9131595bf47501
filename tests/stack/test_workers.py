"""Team mode's orchestration on real servers: mlgate's deployments applied to the stack's
Prefect server (`flows/deploy.py`), training and drift-triggered training run by the stack's
workers (not this process), and a worker killed mid-run: its run marked Crashed by the
heartbeat automation, no half-moved alias, and the training resubmitted once
(`flows/reconcile.py`)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows import alias_moves, registry
from flows.cli import app
from flows.deploy import (
    NEVER_STARTED_AUTOMATION,
    RESUBMIT_AUTOMATION,
    SILENT_AUTOMATION,
    Deployed,
    deploy_team,
    team_prefect,
)
from flows.deployments import (
    MONITORING_DEPLOYMENT,
    RECONCILE_NAME,
    TRAINING_DEPLOYMENT,
    TRAINING_NAME,
)
from flows.reconcile import (
    ATTEMPT_TAG,
    RECONCILED_TAG,
    RESUBMIT_OF_TAG,
    reconcile_crashed_training,
    unrecorded_alias_moves,
)
from models.config import MlgateConfig, config_from_dict
from models.registry_layout import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    EVIDENCE_ARTIFACT,
    MONITOR_EXPERIMENT,
    MONITORING_ARTIFACT,
    SHA_TAG,
)
from services import stack as st
from services.processes import pid_alive, process_tree
from tests.conftest import BUNDLED_DATA
from tests.stack.conftest import Team

# Each test waits for flow runs on 2 busy cores; the first also for the stack to start.
pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
MODEL = "churn-workers"
# Prefect's minimum heartbeat; a run silent for CRASH_AFTER_S is marked Crashed.
HEARTBEAT_S = 30
CRASH_AFTER_S = 60
T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """The stack with mlgate's deployments applied for a config of its own."""

    team: Team
    cfg: MlgateConfig
    config_path: Path
    deployed: Deployed


@pytest.fixture(scope="module")
def workers(team: Team) -> Workers:
    raw = yaml.safe_load(yaml.safe_dump(team.raw))
    raw["registry"].update(model_name=MODEL, store_dir=str(team.root / "host-workers"))
    # Small and quick: fewer trees and resamples keep each run well under a minute.
    raw["train"]["params"] = {"n_estimators": 30, "max_depth": 3, "learning_rate": 0.1}
    raw["gates"]["champion"]["bootstrap_resamples"] = 200
    raw["monitor"] = {"consecutive_windows": 1, "cooldown_hours": 0, "window_hours": 1}
    raw["orchestration"].update(
        heartbeat_s=HEARTBEAT_S, crash_after_s=CRASH_AFTER_S, crash_resubmits=1
    )
    path = team.root / "workers.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    # Paused schedules: no cron fires during the tests; runs start on demand.
    deployed = deploy_team(cfg, path, schedules_active=False)
    return Workers(team, cfg, path, deployed)


@pytest.fixture()
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.connect sets the MLflow client's credentials in os.environ; undo it after."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")


@contextmanager
def prefect(cfg: MlgateConfig) -> Iterator[Any]:
    from prefect.client.orchestration import get_client

    with team_prefect(cfg.orchestration), get_client(sync_client=True) as client:
        yield client


def wait_for(what: str, get: Callable[[], T | None], timeout: float, every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def submit(w: Workers, deployment: str, **parameters: Any) -> UUID:
    from prefect.deployments import run_deployment

    params = {"config_path": str(w.config_path), **parameters}
    with team_prefect(w.cfg.orchestration):
        run: Any = run_deployment(deployment, parameters=params, timeout=0, as_subflow=False)
    return UUID(str(run.id))


def read_run(client: Any, run_id: UUID) -> Any:
    return client.read_flow_run(run_id)


def wait_final(client: Any, run_id: UUID, timeout: float) -> Any:
    def final() -> Any:
        run = read_run(client, run_id)
        return run if run.state and run.state.is_final() else None

    return wait_for(f"flow run {run_id} final", final, timeout, every=2.0)


def flow_run_pid(client: Any, run_id: UUID, timeout: float) -> int:
    """The pid of the run's process once it runs (the worker records it)."""

    def running() -> int | None:
        run = read_run(client, run_id)
        if run.state_name != "Running" or not run.infrastructure_pid:
            return None
        return int(str(run.infrastructure_pid).rsplit(":", 1)[-1])

    return wait_for(f"flow run {run_id} running", running, timeout, every=0.5)


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        chain.append(pid)
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(raw[raw.rindex(")") + 2 :].split()[1])
    return chain


def prefect_workers(team: Team) -> dict[int, str]:
    """The stack's Prefect workers: pid -> the worker's name in its work pool."""
    cfg = team.cfg
    parts = st.stack_status(cfg.stack, cfg.registry, cfg.orchestration, cfg.dask)
    return {p.pid: p.address for p in parts if p.name.startswith("prefect-worker") and p.pid}


def worker_of(team: Team, pid: int) -> tuple[int, str]:
    """The stack's worker whose process tree holds `pid` (a process other than this one),
    and its name. The stack's processes descend from this test process, which started
    them, so the chain goes on past the worker to here."""
    assert pid != os.getpid()
    chain = ancestors(pid)
    found = [(p, name) for p, name in prefect_workers(team).items() if p in chain]
    assert found, f"process {pid} (ancestors {chain}) is no stack worker's"
    return found[0]


def run_logs(client: Any, run_id: UUID) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(str(log.message) for log in logs)


def heartbeats(cfg: MlgateConfig, run_id: UUID) -> int:
    auth = cfg.orchestration.auth_string
    assert auth is not None and cfg.orchestration.api_url
    user, _, password = auth.get_secret_value().partition(":")
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        },
        "limit": 50,
    }
    resp = httpx.post(
        f"{cfg.orchestration.api_url}/events/filter",
        json=body,
        auth=(user, password),
        timeout=10,
    )
    resp.raise_for_status()
    return len(resp.json()["events"])


def training_run_of(client: Any, cfg: MlgateConfig, run_id: UUID) -> Any:
    """The MLflow training run the flow run recorded (its facts name the flow run)."""
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{run_id}'"
    )
    return runs[0] if runs else None


def aliases(client: Any) -> dict[str, str | None]:
    out = {}
    for alias in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
        mv = registry.get_alias_version(client, MODEL, alias)
        out[alias] = str(mv.version) if mv else None
    return out


def test_deploy_applies_the_deployments_and_the_crash_automations(workers: Workers):
    assert set(workers.deployed.deployments) == {
        TRAINING_NAME,
        "mlgate-monitoring",
        RECONCILE_NAME,
    }
    assert set(workers.deployed.automations) == {
        SILENT_AUTOMATION,
        NEVER_STARTED_AUTOMATION,
        RESUBMIT_AUTOMATION,
    }
    with prefect(workers.cfg) as client:
        training = client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        assert training.work_pool_name == workers.cfg.orchestration.work_pool
        assert training.parameters == {"config_path": str(workers.config_path)}
        assert training.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert "-m flows.warm_client --socket-dir" in training.job_variables["command"]
        assert training.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert training.paused
        (silent,) = client.read_automations_by_name(SILENT_AUTOMATION)
        assert silent.trigger.within == timedelta(seconds=CRASH_AFTER_S)
    # Applying again (through the command line) updates in place: same ids, one
    # automation of each name.
    result = CliRunner().invoke(
        app, ["stack", "deploy", "--paused", "--json", "--config", str(workers.config_path)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == asdict(workers.deployed)


def test_training_runs_on_a_worker_and_registers_a_version_with_its_evidence(
    workers: Workers, mlflow_env: None
):
    started = time.monotonic()
    run_id = submit(workers, TRAINING_DEPLOYMENT)
    with prefect(workers.cfg) as client:
        pid = flow_run_pid(client, run_id, timeout=300)
        worker_pid, worker = worker_of(workers.team, pid)
        done = wait_final(client, run_id, timeout=600)
        logs = run_logs(client, run_id)
    assert done.state_name == "Completed", done.state
    assert done.work_pool_name == workers.cfg.orchestration.work_pool
    # The worker logged taking the run, under its name.
    assert worker in logs, logs[-2000:]
    # Forked from the worker's warm process (flows/warm_start.py), not a fresh interpreter.
    logs_dir = st.stack_dir(workers.cfg.stack, workers.cfg.registry) / "logs"
    warm_logs = [log.read_text() for log in logs_dir.glob("prefect-warm-*.log")]
    assert any(f"flow run {run_id} forked" in log for log in warm_logs), warm_logs
    # The forked run's own logs reached the server (shipped at its exit, as in a cold run).
    assert "Finished in state Completed" in logs, logs[-2000:]
    print(
        f"training via {worker} (pid {worker_pid}), run pid {pid}: "
        f"{time.monotonic() - started:.0f} s"
    )

    client = registry.connect(workers.cfg.registry)
    mlrun = training_run_of(client, workers.cfg, run_id)
    assert mlrun is not None and mlrun.info.status == "FINISHED"
    version = mlrun.data.tags["model_version"]
    mv = client.get_model_version(MODEL, version)
    for gate in ("data", "parity", "behaviour", "champion"):
        assert mv.tags[f"gate.{gate}"] == "pass", mv.tags
    assert len(mv.tags[SHA_TAG]) == 64
    evidence = registry.load_json_artifact(client, mlrun.info.run_id, EVIDENCE_ARTIFACT)
    assert [g["name"] for g in evidence] == ["data", "parity", "behaviour", "champion"]
    assert aliases(client) == {CHAMPION_ALIAS: version, CHALLENGER_ALIAS: version}
    assert unrecorded_alias_moves(client, MODEL) == []
    (move,) = alias_moves.alias_history(client, MODEL, CHAMPION_ALIAS)
    assert move["to_version"] == version and move["actor"].startswith("prefect:training_flow/")


def test_drift_in_a_monitoring_run_starts_training_through_the_deployment(
    workers: Workers, mlflow_env: None
):
    """A monitoring run on a worker sees drifted traffic and starts the training deployment
    (`start_retraining` → `run_deployment`), which a worker runs too."""
    from flows.demo import shifted_batch
    from tests.flows.test_monitoring import write_log

    cfg = workers.cfg
    client = registry.connect(cfg.registry)
    champion = aliases(client)[CHAMPION_ALIAS]
    assert champion is not None, "needs the champion of the training test"
    now = datetime.now(UTC).replace(microsecond=0)
    df = pd.read_parquet(BUNDLED_DATA)
    write_log(cfg, shifted_batch(df, 800, 1), champion, now - timedelta(minutes=5))

    monitoring_id = submit(workers, MONITORING_DEPLOYMENT, now=now.isoformat())
    with prefect(cfg) as prefect_client:
        pid = flow_run_pid(prefect_client, monitoring_id, timeout=300)
        worker_of(workers.team, pid)
        monitored = wait_final(prefect_client, monitoring_id, timeout=600)
        assert monitored.state_name == "Completed", monitored.state
        exp = client.get_experiment_by_name(MONITOR_EXPERIMENT)
        assert exp is not None
        (mon,) = client.search_runs([exp.experiment_id])
        outcome = registry.load_json_artifact(client, mon.info.run_id, MONITORING_ARTIFACT)
        assert outcome["retrained"] is True, outcome["decision"]
        assert outcome["training"].startswith(f"started deployment {TRAINING_DEPLOYMENT}")
        training_id = UUID(outcome["training"].rsplit(" ", 1)[-1])
        training = read_run(prefect_client, training_id)
        assert training.deployment_id == UUID(workers.deployed.deployments[TRAINING_NAME])
        # Started from inside the monitoring run: its child in Prefect's lineage.
        assert training.parent_task_run_id is not None
        pid = flow_run_pid(prefect_client, training_id, timeout=300)
        worker_of(workers.team, pid)
        trained = wait_final(prefect_client, training_id, timeout=600)
    assert trained.state_name == "Completed", trained.state
    assert training_run_of(client, cfg, training_id) is not None
    assert unrecorded_alias_moves(client, MODEL) == []


def test_a_worker_killed_mid_run_crashes_the_run_and_training_is_resubmitted_once(
    workers: Workers, mlflow_env: None
):
    cfg, team = workers.cfg, workers.team
    client = registry.connect(cfg.registry)
    before = aliases(client)
    moves_before = len(alias_moves.alias_history(client, MODEL))
    run_id = submit(workers, TRAINING_DEPLOYMENT)
    try:
        with prefect(cfg) as prefect_client:
            pid = flow_run_pid(prefect_client, run_id, timeout=300)
            worker_pid, worker = worker_of(team, pid)
            # The server has a heartbeat of the run: the automation now watches it.
            wait_for("a heartbeat", lambda: heartbeats(cfg, run_id), timeout=60)
            killed_at = time.monotonic()
            for p in process_tree(worker_pid):
                os.kill(p, signal.SIGKILL)
            wait_for("worker gone", lambda: not pid_alive(worker_pid), timeout=30, every=0.2)
            assert read_run(prefect_client, run_id).state_name == "Running"

            crashed = wait_final(prefect_client, run_id, timeout=CRASH_AFTER_S + 120)
            crashed_after = time.monotonic() - killed_at
            assert crashed.state_name == "Crashed", crashed.state
            assert "no heartbeat" in (crashed.state.message or "")
            print(f"killed {worker} mid-run; Crashed after {crashed_after:.0f} s")

            # The Crashed event ran mlgate-reconcile on the surviving worker: one
            # resubmission, attempt 2, that completes.
            (again,) = wait_for(
                "the resubmission",
                lambda: resubmissions_of(prefect_client, run_id),
                timeout=300,
                every=2.0,
            )
            assert f"{ATTEMPT_TAG}2" in again.tags
            assert again.parameters == read_run(prefect_client, run_id).parameters
            assert RECONCILED_TAG in read_run(prefect_client, run_id).tags
            done = wait_final(prefect_client, again.id, timeout=600)
            assert done.state_name == "Completed", done.state
            print(f"resubmitted run completed {time.monotonic() - killed_at:.0f} s after kill")

            # No half-moved alias: each holder is the one its recorded moves lead to, and
            # every move since the kill belongs to a finished run.
            assert unrecorded_alias_moves(client, MODEL) == []
            after = aliases(client)
            moved = len(alias_moves.alias_history(client, MODEL)) - moves_before
            assert after == before or moved > 0, (before, after)

            # Bounded: a crashed run already on its last attempt is reported, not resubmitted.
            last = prefect_client.create_flow_run_from_deployment(
                UUID(workers.deployed.deployments[TRAINING_NAME]),
                parameters={"config_path": str(workers.config_path), "data_path": None},
                tags=[f"{ATTEMPT_TAG}2"],
                state=_crashed(),
            )
            with team_prefect(cfg.orchestration):
                here = reconcile_crashed_training(cfg)
            mine = [c for c in here if c.flow_run_id == str(last.id)]
            assert all(c.action == "gave up" for c in mine), here
            wait_for(
                "the last attempt reconciled",
                lambda: RECONCILED_TAG in read_run(prefect_client, last.id).tags,
                timeout=180,
                every=2.0,
            )
            time.sleep(5)
            assert resubmissions_of(prefect_client, last.id) == []
    finally:
        parts = st.start_stack(cfg.stack, cfg.registry, cfg.orchestration, cfg.dask)
        assert all(p.healthy for p in parts), parts


def _crashed() -> Any:
    from prefect.states import Crashed

    return Crashed(message="fabricated: a run on its last attempt")


def resubmissions_of(client: Any, run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = FlowRunFilterTags(all_=[f"{RESUBMIT_OF_TAG}{run_id}"])
    return list(client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tags)))


def test_reconcile_cli_reports_nothing_left_to_reconcile(workers: Workers):
    result = CliRunner().invoke(
        app, ["stack", "reconcile", "--json", "--config", str(workers.config_path)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
