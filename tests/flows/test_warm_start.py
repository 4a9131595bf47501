"""Warm starts (flows/warm_start.py, flows/warm_client.py): a real warm process and real
clients, each a process as the worker starts it. The run module is a small target
(tests/flows/warm_target.py) instead of Prefect's engine: what is tested here is what the
client hands over and what comes back; tests/stack/test_workers.py runs mlgate's flows
through the same path on a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.warm_start import socket_path
from services.processes import pid_alive
from tests.conftest import REPO

pytestmark = pytest.mark.integration

WORKER = "host-prefect-1"


def _wait(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sockets = tmp_path / "sockets"
    sock = socket_path(sockets, WORKER)
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "code.py").write_text("VERSION = 1\n")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.warm_start",
            str(sock),
            "--run-module",
            "tests.flows.warm_target",
            "--preload",
            "decimal,tests.flows.warm_target",
            "--watch",
            str(sources),
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    _wait("the socket", sock.exists)
    yield server, sockets
    server.terminate()
    server.wait(timeout=30)
    assert not sock.exists(), "the socket is removed at exit"


def _client(sockets: Path, cwd: Path, ask: str, *args: str, **kw) -> subprocess.Popen[str]:
    env = {**os.environ, "PREFECT__WORKER_NAME": WORKER, "WARM_TARGET": ask}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.warm_client", "--socket-dir", str(sockets), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_run_is_forked_from_the_warm_process_with_the_clients_stdio_cwd_env_and_code(
    warm, tmp_path: Path
):
    server, sockets = warm
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = _client(sockets, workdir, "stdin", "a", "b")
    out, err = client.communicate("hello from the worker\n", timeout=60)
    assert client.returncode == 3, err
    report = json.loads(out.splitlines()[0])
    assert report["ppid"] == server.pid, "forked by the warm process, not started by the client"
    assert report["pid"] == report["pgid"], "the run leads a session of its own"
    assert report["cwd"] == str(workdir)
    assert report["argv"] == ["a", "b"]
    assert report["ask"] == "stdin", "the client's environment, not the server's"
    assert report["preloaded"], "imported before the fork"
    assert report["stdin"] == "hello from the worker"


def test_the_workers_sigterm_reaches_the_run_and_its_exit_code_comes_back(warm, tmp_path: Path):
    _, sockets = warm
    client = _client(sockets, tmp_path, "sleep")
    assert client.stdout is not None
    report = json.loads(client.stdout.readline())
    client.send_signal(signal.SIGTERM)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 7, err
    assert f"got signal {signal.SIGTERM}" in out
    assert not pid_alive(report["pid"])


def test_a_client_killed_with_its_worker_takes_its_run_down(warm, tmp_path: Path):
    _, sockets = warm
    client = _client(sockets, tmp_path, "sleep")
    assert client.stdout is not None
    report = json.loads(client.stdout.readline())
    assert pid_alive(report["pid"])
    client.kill()
    client.wait(timeout=30)
    _wait("the run to go", lambda: not pid_alive(report["pid"]), timeout=10)


def test_a_warm_process_killed_takes_its_runs_down(warm, tmp_path: Path):
    server, sockets = warm
    client = _client(sockets, tmp_path, "sleep")
    assert client.stdout is not None
    report = json.loads(client.stdout.readline())
    server.kill()  # SIGKILL: no handler of the warm process runs
    server.wait(timeout=30)
    # The run got SIGTERM from the kernel (PR_SET_PDEATHSIG) and ran its own handler.
    _wait("the run to go", lambda: not pid_alive(report["pid"]), timeout=10)
    out, _ = client.communicate(timeout=60)
    assert f"got signal {signal.SIGTERM}" in out
    assert client.returncode != 0
    # A SIGKILLed process cannot remove its socket; the fixture checks a clean exit's.
    socket_path(sockets, WORKER).unlink()


def test_two_runs_at_once_are_two_children(warm, tmp_path: Path):
    _, sockets = warm
    first = _client(sockets, tmp_path, "sleep")
    second = _client(sockets, tmp_path, "sleep")
    assert first.stdout is not None and second.stdout is not None
    a, b = json.loads(first.stdout.readline()), json.loads(second.stdout.readline())
    assert a["pid"] != b["pid"]
    for client in (first, second):
        client.send_signal(signal.SIGTERM)
        client.communicate(timeout=60)
        assert client.returncode == 7


def test_without_a_warm_process_the_client_starts_prefects_engine_cold(tmp_path: Path):
    client = _client(tmp_path / "nowhere", tmp_path, "", "not-a-uuid")
    _, err = client.communicate(timeout=300)
    # What `python -m prefect.engine not-a-uuid` does: the engine itself ran here.
    assert client.returncode == 1
    assert "Invalid flow run id" in err


def test_a_warm_process_refuses_to_fork_when_an_import_started_a_thread(tmp_path: Path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.warm_start",
            str(tmp_path / "w.sock"),
            "--preload",
            "tests.flows.warm_thread",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "started threads ['warm-thread-test']" in done.stderr
    assert not (tmp_path / "w.sock").exists()


def test_changed_code_sends_runs_cold_and_the_warm_process_restarts_once_idle(warm, tmp_path: Path):
    server, sockets = warm
    sock = socket_path(sockets, WORKER)
    busy = _client(sockets, tmp_path, "sleep")
    assert busy.stdout is not None
    json.loads(busy.stdout.readline())
    (tmp_path / "sources" / "code.py").write_text("VERSION = 2\n")

    # While a run is in flight: refused, so this one starts cold (Prefect's engine here).
    cold = _client(sockets, tmp_path, "", "not-a-uuid")
    _, err = cold.communicate(timeout=300)
    assert "code changed since this process imported it" in err
    assert cold.returncode == 1 and "Invalid flow run id" in err
    assert pid_alive(server.pid) and sock.exists(), "no restart under a running run"

    busy.send_signal(signal.SIGTERM)
    busy.communicate(timeout=60)
    assert busy.returncode == 7
    # Idle now: the same process re-executes itself and listens again, warm.
    _wait("the socket to go", lambda: not sock.exists(), timeout=30)
    _wait("the socket again", sock.exists, timeout=120)
    again = _client(sockets, tmp_path, "")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 3, err
    assert json.loads(out.splitlines()[0])["ppid"] == server.pid


def test_an_idle_warm_process_restarts_on_changed_code_without_waiting_for_a_run(
    warm, tmp_path: Path
):
    server, sockets = warm
    sock = socket_path(sockets, WORKER)
    (tmp_path / "sources" / "code.py").write_text("VERSION = 3\n")
    _wait("the socket to go", lambda: not sock.exists(), timeout=30)
    _wait("the socket again", sock.exists, timeout=120)
    assert server.poll() is None, "re-executed in place, not exited"
