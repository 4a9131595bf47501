"""The temporary Prefect API server a command's flows run against in the embedded default:
started first, so it starts while the command imports its libraries, and dying with it.

Prefect would start the same server itself (`SubprocessASGIServer`), but only on a flow's
first API call, after the command's imports, and from a module whose own imports cost the
command seconds; the command then waited for both in turn. Here the server is the same
uvicorn child with the same settings (`prefect.server.api.server:create_app`, UI off,
ephemeral services, the command's `PREFECT_HOME` database), started before anything imports
Prefect, whose client then finds it through `PREFECT_API_URL` like any configured server.
The child gets SIGTERM when this process dies, SIGKILL included (PR_SET_PDEATHSIG), and is
stopped at a normal exit after Prefect's own exit handlers have sent it the run's last
events and logs.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.processes import die_with_parent_preexec

# Prefect's own default is 20 s, too short on a busy 2-core machine when a fresh database
# is migrated.
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 5.0
# What Prefect's `SubprocessASGIServer` sets for its child: no UI, only the services an
# ephemeral server runs (events, task-run recording), and the app built once.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
# uvicorn's exit status when the port was taken between choosing and binding it.
PORT_IN_USE = 3


class PrefectServerError(RuntimeError):
    """The temporary server exited or did not answer in time."""


@dataclass
class PrefectServer:
    """A running temporary server: its process and its API address."""

    process: subprocess.Popen[bytes]
    api_url: str
    # The process that started it: a child forked from that one (flows/warm_start.py runs
    # the parent's exit handlers in each run) must not stop the server its parent shares.
    owner_pid: int = field(default_factory=os.getpid)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the API answers its health check; raise `PrefectServerError` if the
        server exits first or does not answer within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.process.poll()
            if status is not None:
                why = " (its port was taken)" if status == PORT_IN_USE else ""
                raise PrefectServerError(
                    f"Prefect's temporary API server exited with status {status}{why} "
                    "before it was ready; its output is above"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"Prefect's temporary API server at {self.api_url} did not answer in "
                    f"{timeout_s:g} s"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`; idempotent; only from its owner."""
        if os.getpid() != self.owner_pid or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_prefect_server() -> PrefectServer:
    """Start the temporary server on a free local port and point Prefect's client at it
    (`PREFECT_API_URL`). Call it from the main thread (the death signal follows the thread
    that starts the child) and before Prefect is imported (Prefect reads its settings
    once); it does not wait: `wait_ready` before the first flow."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start the Prefect server from the main thread")
    if "prefect" in sys.modules:
        raise RuntimeError("start the Prefect server before Prefect is imported")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(_prefect_package_dir().parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env={**os.environ, **SERVER_ENV},
        preexec_fn=die_with_parent_preexec(),
    )
    server = PrefectServer(process, f"http://127.0.0.1:{port}/api")
    # Registered before Prefect is imported, so it runs after Prefect's exit handlers.
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _prefect_package_dir() -> Path:
    """Where Prefect is installed, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise PrefectServerError("Prefect is not installed")
    return Path(next(iter(spec.submodule_search_locations)))
