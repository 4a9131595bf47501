"""Team mode's servers as real processes: `mlgate stack` up/status/down, MLflow's basic auth
(no anonymous request, not MLflow's old default password), mlgate's registry client through
the tracking server with proxied artifacts, and a Prefect flow whose tasks run on the Dask
workers, reached with the config's client settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flows import registry
from flows.cli import app
from models.config import ConfigError, config_from_dict
from services import stack as st
from services.processes import pid_alive, process_tree
from tests.stack.conftest import Team, team_raw

# The first test also waits for the stack to start (minutes on 2 busy cores).
pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]


def _slices(team: Team) -> tuple:
    return team.cfg.stack, team.cfg.registry, team.cfg.orchestration, team.cfg.dask


@pytest.fixture()
def mlflow_env(monkeypatch):
    """registry.connect sets the MLflow client's credentials in os.environ; undo it after."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")


def test_status_lists_every_part_up_on_loopback(team: Team):
    parts = {p.name: p for p in st.stack_status(*_slices(team))}
    assert list(parts) == [
        "postgres",
        "mlflow",
        "prefect",
        "prefect-worker-1",
        "prefect-warm-1",
        "prefect-worker-2",
        "prefect-warm-2",
        "dask-scheduler",
        "dask-worker-1",
        "dask-worker-2",
    ]
    for p in parts.values():
        assert p.healthy and p.managed and p.pid is not None and pid_alive(p.pid), p
    for name in ("postgres", "mlflow", "prefect", "dask-scheduler"):
        assert "127.0.0.1:" in parts[name].address
    result = CliRunner().invoke(app, ["stack", "status", "--config", str(team.config_path)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app, ["stack", "status", "--json", "--config", str(team.config_path)]
    )
    assert [p["healthy"] for p in json.loads(result.output)] == [True] * 10


def test_a_dead_part_fails_status_and_up_restarts_only_it(team: Team):
    before = {p.name: p.pid for p in st.stack_status(*_slices(team))}
    victim = before["dask-worker-2"]
    assert victim is not None
    os.killpg(victim, signal.SIGKILL)
    assert _wait(lambda: not pid_alive(victim))
    result = CliRunner().invoke(app, ["stack", "status", "--config", str(team.config_path)])
    assert result.exit_code == 1
    assert "dask-worker-2" in result.output and "DOWN" in result.output

    after = {p.name: p for p in st.start_stack(*_slices(team))}
    assert all(p.healthy for p in after.values()), after
    assert after["dask-worker-2"].pid not in (None, victim)
    assert {n: p.pid for n, p in after.items() if n != "dask-worker-2"} == {
        n: pid for n, pid in before.items() if n != "dask-worker-2"
    }


def test_mlflow_refuses_anonymous_requests_and_the_old_default_password(team: Team):
    uri = team.cfg.registry.tracking_uri
    search = f"{uri}/api/2.0/mlflow/experiments/search"
    assert httpx.get(f"{uri}/health").status_code == 200
    assert httpx.get(search, params={"max_results": 1}).status_code == 401
    legacy = ("admin", st.MLFLOW_LEGACY_PASSWORD)
    assert httpx.get(search, params={"max_results": 1}, auth=legacy).status_code == 401
    password = team.cfg.registry.password
    assert password is not None
    own = (team.cfg.registry.username, password.get_secret_value())
    assert httpx.get(search, params={"max_results": 1}, auth=own).status_code == 200


def test_prefect_refuses_requests_without_the_auth_string(team: Team):
    api = team.cfg.orchestration.api_url
    auth = team.cfg.orchestration.auth_string
    assert api is not None and auth is not None
    user, _, password = auth.get_secret_value().partition(":")
    version = f"{api}/admin/version"
    assert httpx.get(version).status_code == 401
    assert httpx.get(version, auth=(user, password + "x")).status_code == 401
    assert httpx.get(version, auth=(user, password)).status_code == 200


def test_the_registry_client_works_through_the_tracking_server(team: Team, mlflow_env, tmp_path):
    cfg = team.host_config(tmp_path / "store")
    client = registry.connect(cfg.registry)
    exp_id = registry.ensure_experiment(client, cfg.registry, "stack-smoke")
    exp = client.get_experiment(exp_id)
    # Artifacts go through the server (proxied), not to a path of this host.
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(exp_id)
    registry.log_json_artifact(client, run.info.run_id, "evidence/hello.json", {"team": True})
    assert registry.load_json_artifact(client, run.info.run_id, "evidence/hello.json") == {
        "team": True
    }
    assert (team.root / "stack" / "mlflow-artifacts").is_dir()


def test_a_flow_runs_on_the_prefect_server_with_its_tasks_on_the_dask_workers(team: Team):
    """In a fresh process, as a scheduler would: the config's client settings applied by
    flows/runtime.py, the flow run recorded by the Prefect server, its tasks run by the Dask
    workers the stack started."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("team_flow.py")), str(team.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    workers = {p.name: p.pid for p in st.stack_status(*_slices(team)) if "dask-worker" in p.name}
    worker_pids = {pid for root in workers.values() if root for pid in process_tree(root)}
    assert set(report["task_pids"]) <= worker_pids, (report, workers)
    assert report["state"] == "COMPLETED"
    auth = team.cfg.orchestration.auth_string
    assert auth is not None
    user, _, password = auth.get_secret_value().partition(":")
    resp = httpx.get(
        f"{team.cfg.orchestration.api_url}/flow_runs/{report['flow_run_id']}",
        auth=(user, password),
    )
    assert resp.status_code == 200 and resp.json()["state_type"] == "COMPLETED"


@pytest.mark.parametrize(
    ("password", "says"),
    [
        (None, "MLGATE_REGISTRY__PASSWORD"),
        (st.MLFLOW_LEGACY_PASSWORD, "default"),
        ("short", "at least 12"),
    ],
)
def test_up_refuses_a_missing_or_default_mlflow_password_before_starting(tmp_path, password, says):
    raw = team_raw(tmp_path)
    raw["registry"]["password"] = password
    cfg = config_from_dict(raw)
    with pytest.raises(st.StackError, match=says):
        st.start_stack(cfg.stack, cfg.registry, cfg.orchestration, cfg.dask)
    assert not (tmp_path / "stack" / "postgres").exists()


def _wait(cond, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_stack_without_its_own_postgres_names_the_databases_it_needs(tmp_path):
    raw = team_raw(tmp_path)
    raw["stack"]["postgres"] = {"start": False}
    with pytest.raises(ConfigError, match=r"mlflow\.backend_store_uri, mlflow\.auth_database_uri"):
        config_from_dict(raw)
    raw["stack"]["mlflow"]["start"] = False
    raw["stack"]["prefect"]["database_url"] = "postgresql+asyncpg://prefect:pw@db:5432/prefect"
    cfg = config_from_dict(raw)
    # Nothing of PostgreSQL's runs here; the lock's server elsewhere is what status checks.
    assert not cfg.stack.postgres.start and cfg.registry.lock_dsn is None
