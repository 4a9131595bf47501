"""The stack tier's one stack: team mode's servers started once for the tier, as real local
processes, in a temp dir with free ports, and stopped (and checked gone) after its tests."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.config import MlgateConfig, config_from_dict
from services import stack as st
from services.processes import pid_alive
from tests.conftest import BUNDLED_CONFIG, BUNDLED_DATA


@dataclass(frozen=True)
class Team:
    """The running stack and what a host's client needs to use it."""

    root: Path
    raw: dict[str, Any]  # the config (with client settings) as a dict, for other "hosts"
    cfg: MlgateConfig
    config_path: Path

    def host_config(self, store_dir: Path, **registry: Any) -> MlgateConfig:
        raw = yaml.safe_load(yaml.safe_dump(self.raw))
        raw["registry"].update(store_dir=str(store_dir), **registry)
        return config_from_dict(raw)


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def team_raw(root: Path) -> dict[str, Any]:
    pg, mlflow, prefect, dask, dashboard = free_ports(5)
    raw = yaml.safe_load(BUNDLED_CONFIG.read_text())
    raw["dataset"]["path"] = str(BUNDLED_DATA)
    raw["registry"] = {
        **raw.get("registry", {}),
        "store_dir": str(root / "host-0"),
        "tracking_uri": f"http://127.0.0.1:{mlflow}",
        "password": secrets.token_urlsafe(16),
    }
    raw["orchestration"] = {
        "api_url": f"http://127.0.0.1:{prefect}/api",
        "auth_string": f"mlgate:{secrets.token_urlsafe(16)}",
    }
    raw["dask"] = {"scheduler_address": f"tcp://127.0.0.1:{dask}"}
    raw["stack"] = {
        "dir": str(root / "stack"),
        "start_timeout_s": 420,
        "postgres": {"port": pg},
        # One worker process: this tier runs on 2 cores.
        "mlflow": {"port": mlflow, "workers": 1},
        "prefect": {"port": prefect, "workers": 2},
        "dask": {"port": dask, "dashboard_port": dashboard, "workers": 2},
    }
    return raw


@pytest.fixture(scope="package")
def team() -> Iterator[Team]:
    try:
        st.postgres_bin()
    except st.StackError as err:
        pytest.fail(f"the stack tier needs PostgreSQL: {err}", pytrace=False)
    # Under /tmp, not pytest's 0700 folder: PostgreSQL's system user must pass through it.
    root = Path(tempfile.mkdtemp(prefix="mlgate-stack-test-"))
    root.chmod(0o711)
    raw = team_raw(root)
    cfg = config_from_dict(raw)
    slices = (cfg.stack, cfg.registry, cfg.orchestration, cfg.dask)
    try:
        started = time.monotonic()
        parts = st.start_stack(*slices)
        print(f"stack up in {time.monotonic() - started:.0f} s")
        assert all(p.healthy for p in parts), parts
        raw["registry"]["lock_dsn"] = st.client_settings(*slices)["MLGATE_REGISTRY__LOCK_DSN"]
        config_path = root / "mlgate.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        yield Team(root, raw, config_from_dict(raw), config_path)
    finally:
        running = {p.name: p.pid for p in st.stack_status(*slices) if p.pid is not None}
        stopped = st.stop_stack(cfg.stack, cfg.registry)
        shutil.rmtree(root, ignore_errors=True)
    # `down` stops every process it started, and frees every port.
    assert sorted(stopped) == sorted(running)
    assert not [n for n, pid in running.items() if pid_alive(pid)]
    ports = [cfg.stack.postgres.port, cfg.stack.mlflow.port, cfg.stack.prefect.port]
    assert not [port for port in ports if st.port_in_use(port)]
