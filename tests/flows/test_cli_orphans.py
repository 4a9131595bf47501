"""A CLI command killed with SIGKILL leaves no Prefect temporary server behind: the server
the command starts for its flow gets SIGTERM when the command dies (PR_SET_PDEATHSIG,
`flows.prefect_server.start_prefect_server`). Real CLI process, real Prefect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.processes import pid_alive, process_tree
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.integration


def _prefect_server_under(pid: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in process_tree(pid)[1:]:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"prefect.server.api.server:create_app" in cmdline:
                return child
        time.sleep(0.2)
    raise AssertionError(f"no Prefect temporary server under pid {pid} in {timeout_s:g} s")


def test_a_killed_monitor_command_leaves_no_prefect_server(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "monitor", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = _prefect_server_under(cli.pid, timeout_s=180)
    finally:
        # Still running: a command that had ended would have stopped its server itself.
        assert cli.poll() is None, "monitor ended before it could be killed"
        cli.kill()
        cli.wait(timeout=30)
    deadline = time.monotonic() + 30
    while pid_alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = pid_alive(server)
    if alive:
        os.kill(server, signal.SIGKILL)
    assert not alive, "Prefect's temporary server outlived the killed command"
