"""The temporary Prefect server a command starts before its imports (flows/prefect_server.py):
flows run against it and are recorded, it stops when the command exits, it refuses to
start where its settings or death signal could not hold, and the commands that run no flow
never start it (nor import Prefect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from flows.prefect_server import PORT_IN_USE, PrefectServer, PrefectServerError
from flows.prefect_server import start_prefect_server as start
from services.processes import pid_alive
from tests.conftest import REPO, write_config

USES_PREFECT = False  # the test that needs a server starts its own, in its own process

COMMAND = """
import json, os, sys
from pathlib import Path
from flows.runtime import use_embedded_prefect
from flows.prefect_server import start_prefect_server

use_embedded_prefect(Path(sys.argv[1]))
server = start_prefect_server()
from prefect import flow, task
from prefect.client.orchestration import get_client
server.wait_ready()

@task
def double(x):
    return 2 * x

@flow
def tiny(x):
    return double(x)

assert tiny(21) == 42
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs()
print(json.dumps({
    "api_url": server.api_url,
    "env_url": os.environ["PREFECT_API_URL"],
    "server_pid": server.process.pid,
    "runs": [[r.name, r.state_type.value] for r in runs],
}))
"""


@pytest.mark.integration
def test_a_flow_runs_against_the_early_server_is_recorded_and_the_server_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.run(
        [sys.executable, "-c", COMMAND, str(tmp_path / "store")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env_url"] == out["api_url"]
    assert [state for _, state in out["runs"]] == ["COMPLETED"]
    # Its database is the command's PREFECT_HOME: the run is there for later commands.
    assert (tmp_path / "store" / "prefect" / "prefect.db").is_file()
    deadline = time.monotonic() + 10
    while pid_alive(out["server_pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(out["server_pid"]), "the server outlived the command's exit"


@pytest.mark.fast
def test_it_refuses_to_start_once_prefect_is_imported():
    import prefect  # noqa: F401  (this process has it: its settings are read already)

    with pytest.raises(RuntimeError, match="before Prefect is imported"):
        start()


@pytest.mark.fast
def test_it_refuses_to_start_from_a_helper_thread():
    errors: list[BaseException] = []

    def helper() -> None:
        try:
            start()
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


@pytest.mark.fast
@pytest.mark.parametrize(("status", "said"), [(PORT_IN_USE, "its port was taken"), (1, "")])
def test_waiting_on_a_server_that_exited_says_so(status, said):
    child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])
    child.wait()
    server = PrefectServer(child, "http://127.0.0.1:9/api")
    with pytest.raises(PrefectServerError, match=f"status {status}") as err:
        server.wait_ready(timeout_s=5)
    assert said in str(err.value)


@pytest.mark.fast
def test_waiting_on_a_server_that_never_answers_times_out():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(PrefectServerError, match="did not answer"):
            PrefectServer(child, "http://127.0.0.1:9/api").wait_ready(timeout_s=0.5)
    finally:
        PrefectServer(child, "").stop()
    assert child.poll() is not None


NO_FLOW = """
import sys
from typer.testing import CliRunner
from flows.cli import app
for args in (["models", "list"], ["history", "churn"], ["gates", "show", "churn", "1"]):
    result = CliRunner().invoke(app, [*args, "--config", sys.argv[1]])
    print(args[0], result.exit_code)
print("prefect imported" if "prefect" in sys.modules else "no prefect")
"""


@pytest.mark.integration
def test_commands_that_run_no_flow_never_import_prefect(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.run(
        [sys.executable, "-c", NO_FLOW, str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "no prefect", proc.stdout
