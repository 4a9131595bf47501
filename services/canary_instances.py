"""The canary target's BentoML instances: launched, checked and stopped.

An instance is one `bentoml serve` of a model version (`variant` stable or canary) on a
free port of 127.0.0.1, with a BentoML home of its own under the canary's directory. It
runs in a session of its own and outlives the controller that launched it; the state file
knows it by its `InstanceRecord` (pid and process start time, see `services/processes.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS
from services.canary_state import InstanceRecord
from services.launcher import ServiceProcess, start_service
from services.processes import pid_alive, process_start_time, signal_tree

# ServiceProcess objects of the instances this process launched: stopping through them
# also reaps the child and closes its log.
_LAUNCHED: dict[int, ServiceProcess] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_instance(
    config_path: Path,
    instances_dir: Path,
    variant: str,
    *,
    model_name: str,
    version: str | None,
    env: Mapping[str, str],
) -> tuple[ServiceProcess, InstanceRecord]:
    """Start an instance of `version` of `model_name` (None: `@champion`) and return at
    once, before it is ready; its record names the version `?` until the instance says which
    it loaded."""
    port = free_port()
    label = f"v{version}" if version else "champion"
    home = instances_dir / f"{variant}-{label}-{port}"
    home.mkdir(parents=True, exist_ok=True)
    child_env = {
        **env,
        # Each instance needs a BentoML home of its own: `bentoml serve` empties the
        # Prometheus directory under it at start, which would wipe the other
        # instance's metrics.
        "BENTOML_HOME": str(home / "bentoml"),
    }
    proc = start_service(
        config_path,
        ModelRef(model_name, version=version)
        if version
        else ModelRef(model_name, alias=CHAMPION_ALIAS),
        port=port,
        variant=variant,
        host="127.0.0.1",
        log_path=home / "service.log",
        env=child_env,
    )
    _LAUNCHED[proc.pid] = proc
    record = InstanceRecord(
        variant=variant,
        version=version or "?",
        port=port,
        pid=proc.pid,
        start_time=process_start_time(proc.pid),
        home=str(home),
    )
    return proc, record


def served_version(url: str, timeout: float = 5.0) -> str | None:
    """The model version the instance at `url` says it serves, or None."""
    try:
        response = httpx.get(f"{url}/model", timeout=timeout)
        if response.status_code == 200:
            return str(response.json()["version"])
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    return None


def instance_ok(record: InstanceRecord, timeout: float = 3.0) -> bool:
    """The recorded process is alive, ready and serves the recorded version."""
    if not pid_alive(record.pid, record.start_time):
        return False
    try:
        if httpx.get(f"{record.url}/readyz", timeout=timeout).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    return served_version(record.url, timeout) == record.version


def stop_instance(record: InstanceRecord, timeout: float = 15.0) -> None:
    """A graceful stop: SIGCONT to the whole process tree first (a frozen instance cannot act
    on SIGTERM), SIGTERM to the server, which stops its workers; SIGKILL to whatever of the
    tree is left after `timeout`. The instance's BentoML home (its metrics files) goes, its
    log stays."""
    proc = _LAUNCHED.pop(record.pid, None)
    if pid_alive(record.pid, record.start_time):
        tree = signal_tree(record.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in tree:
            if pid_alive(p):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
    if proc is not None:
        proc.stop(timeout=5.0)
    shutil.rmtree(Path(record.home) / "bentoml", ignore_errors=True)
