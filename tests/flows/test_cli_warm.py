"""The `mlgate` command's warm process (flows/cli_warm.py): a warm call prints what a cold one
prints, exits with its code and is recorded in the project's Prefect database; a changed
source file sends the next call cold; an idle warm process exits and stops its Prefect
server; Ctrl-C reaches the run. Real processes, real Prefect, real MLflow on SQLite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli_warm import SOCKET, state_dir
from services.processes import pid_alive, process_tree
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.integration

# The `mlgate` script, as .venv/bin/mlgate runs it.
MLGATE = "import sys; sys.argv[0] = 'mlgate'; from flows.cli_warm import main; main()"
START_S = 240.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLGATE_"))}


def _start_warm(store: Path, idle_s: float = 600.0, watch: Path | None = None):
    code = (
        "import sys; from pathlib import Path; from flows.cli_warm import serve_project; "
        "w = sys.argv[3:]; "
        "sys.exit(serve_project(Path(sys.argv[1]), float(sys.argv[2]), "
        "**({'watch': (Path(w[0]),)} if w else {})))"
    )
    args = [sys.executable, "-c", code, str(store), str(idle_s)]
    proc = subprocess.Popen(
        [*args, *([str(watch)] if watch else [])],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    sock = state_dir(store) / SOCKET
    deadline = time.monotonic() + START_S
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"warm process exited: {_log_lines(proc)[-20:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError("warm process did not listen in time")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.stderr.close()


def _mlgate(*argv: str, cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", MLGATE, *argv],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _completed(store: Path, flow: str) -> int:
    with sqlite3.connect(store / "prefect" / "prefect.db") as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow.name = ? AND flow_run.state_type = 'COMPLETED'",
            (flow,),
        ).fetchone()
    return int(n)


def _prefect_server_of(pid: int) -> int:
    for child in process_tree(pid)[1:]:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"prefect.server.api.server:create_app" in cmdline:
            return child
    raise AssertionError(f"no Prefect server under pid {pid}")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with a champion (trained cold, `cli.warm: false`) and its warm process."""
    tmp = tmp_path_factory.mktemp("warm")
    config = write_config(tmp, cli={"warm": False})
    trained = _mlgate("train", "--config", str(config))
    assert trained.returncode == 0, trained.stderr[-3000:]
    store = tmp / "store"
    warm_config = write_config(tmp, cli={"warm": True})
    proc = _start_warm(store)
    yield warm_config, store, proc
    _stop(proc)


def test_a_warm_call_prints_and_exits_as_a_cold_one_and_prefect_records_it(project):
    config, store, proc = project
    argv = ("monitor", "--config", str(config), "--window", "1h", "--no-retrain", "--json")
    before = _completed(store, "monitoring_flow")
    cold = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    forks = _forks(proc)
    warm = _mlgate(*argv)
    assert _forks(proc) == forks + 1, "the call was not forked by the warm process"
    assert warm.returncode == cold.returncode
    assert "warm start refused" not in warm.stderr

    # Same report: the JSON, less the times and run ids that differ between any two runs.
    def stable(out: str) -> dict:
        report = json.loads(out)
        keys = ("rows", "champion_version", "decision", "retrained", "traffic", "alerts", "gates")
        return {k: report[k] for k in keys}

    assert stable(warm.stdout) == stable(cold.stdout)
    assert _completed(store, "monitoring_flow") == before + 2
    # The warm process forked it: its Prefect server is the one the run reported to.
    server = _prefect_server_of(proc.pid)
    port = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    url = f"127.0.0.1:{port[port.index(b'--port') + 1].decode()}"
    assert url in warm.stderr, warm.stderr[-2000:]


def test_ctrl_c_reaches_the_run(project):
    config, _store, proc = project
    forks = _forks(proc)
    client = subprocess.Popen(
        [sys.executable, "-c", MLGATE, "train", "--config", str(config)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The run is forked once the warm process logs it.
    deadline = time.monotonic() + 60
    while _forks(proc) == forks and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in _log_lines(proc) if "forked as pid" in line]
    run_pid = int(lines[-1].split()[-1]) if len(lines) > forks else None
    assert run_pid is not None, "the train run was not forked"
    time.sleep(1.0)
    client.send_signal(signal.SIGINT)
    client.wait(timeout=60)
    stderr = client.stderr.read()
    assert client.returncode == -signal.SIGINT, stderr[-2000:]
    assert "aborted by an interrupt signal" in stderr, stderr[-2000:]
    deadline = time.monotonic() + 30
    while pid_alive(run_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(run_pid)
    assert proc.poll() is None, "the warm process must outlive its runs"


_seen: dict[int, list[str]] = {}


def _log_lines(proc: subprocess.Popen) -> list[str]:
    """The warm process's stderr lines read so far (the tests start it with a pipe)."""
    os.set_blocking(proc.stderr.fileno(), False)
    data = proc.stderr.read()
    seen = _seen.setdefault(proc.pid, [])
    if data:
        seen.extend(data.decode().splitlines())
    return seen


def _forks(proc: subprocess.Popen) -> int:
    return sum("forked as pid" in line for line in _log_lines(proc))


def test_a_changed_source_file_sends_the_call_cold(tmp_path):
    config = write_config(tmp_path, cli={"warm": True})
    watched = tmp_path / "src"
    watched.mkdir()
    (watched / "a.py").write_text("A = 1\n")
    store = tmp_path / "store"
    proc = _start_warm(store, watch=watched)
    try:
        (watched / "a.py").write_text("A = 2  # changed\n")
        result = _mlgate("models", "list", "--config", str(config))  # never warm
        assert "warm start" not in result.stderr
        # A call now is refused (told to start cold) or, once the idle check has seen the
        # change, finds no warm process: either way it runs cold, and the process exits.
        result = _mlgate("monitor", "--config", str(config), "--no-retrain")
        assert result.returncode == 0, result.stderr[-2000:]
        assert _forks(proc) == 0
        proc.wait(timeout=60)
        assert any("code changed" in line for line in _log_lines(proc)), _log_lines(proc)
        assert not (state_dir(store) / SOCKET).exists() or _holders(state_dir(store) / "warm.lock")
    finally:
        _stop(proc)
        # The cold call started a fresh warm process for the next call: stop it too.
        _stop_started(store)


def _stop_started(store: Path) -> None:
    lock = state_dir(store) / "warm.lock"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _holders(lock)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        if not pids:
            time.sleep(0.5)
            if not _holders(lock):
                return
        time.sleep(0.5)


def _holders(path: Path) -> list[int]:
    """Processes with `path` open (the warm process holds its lock file while it runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == str(path):
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def test_an_idle_warm_process_exits_and_stops_its_server(tmp_path):
    store = tmp_path / "store"
    proc = _start_warm(store, idle_s=2.0)
    try:
        server = _prefect_server_of(proc.pid)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while pid_alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(server)
        assert not (state_dir(store) / SOCKET).exists()
    finally:
        _stop(proc)


def test_a_warm_process_exits_with_its_project_directory(tmp_path):
    store = tmp_path / "store"
    proc = _start_warm(store)
    try:
        shutil.rmtree(store)
        proc.wait(timeout=60)
    finally:
        _stop(proc)
