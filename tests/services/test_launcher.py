"""Service processes on one host: each keeps its own metrics, and `mlgate serve` leaves
nothing behind however it is stopped. Real `bentoml serve` processes on the serving tests'
registry (tests/services/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS
from services.launcher import start_service
from services.processes import pid_alive, process_tree
from tests.services.conftest import AUTH, ENV_KEYS, REPO_ROOT, Registry, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300.0


def _requests_answered(url: str) -> float:
    """`mlgate_requests_total` with status 200 on the service at `url`, all variants."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mlgate_requests_total" and sample.labels.get("status") == "200"
    )


def _predict(url: str, registry: Registry, n: int) -> None:
    frame = registry.holdout[list(registry.cfg.dataset.features)].head(1)
    body = {"rows": json.loads(frame.to_json(orient="records"))}
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        for _ in range(n):
            assert client.post("/predict", json=body).status_code == 200


def test_two_services_on_one_host_keep_their_own_metrics(registry: Registry, monkeypatch):
    """BentoML empties its Prometheus directory when a server starts: with one home for
    both (the default before), starting the second wiped the first's counters."""
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    ref = ModelRef(registry.model_name, alias=CHAMPION_ALIAS)
    env = {"MLGATE_API_KEYS": ENV_KEYS}
    with start_service(registry.config_path, ref, port=free_port(), env=env) as first:
        first.wait_ready(timeout=START_TIMEOUT_S)
        _predict(first.url, registry, 7)
        # The service adds its counts to the shared values every second.
        assert _eventually(lambda: _requests_answered(first.url) == 7)
        with start_service(registry.config_path, ref, port=free_port(), env=env) as second:
            second.wait_ready(timeout=START_TIMEOUT_S)
            _predict(second.url, registry, 3)
            assert _eventually(lambda: _requests_answered(second.url) == 3)
            assert _requests_answered(first.url) == 7


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _serve(registry: Registry, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MLGATE_API_KEYS": ENV_KEYS}
    env.pop("BENTOML_HOME", None)
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--config", str(registry.config_path)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, "mlgate serve exited before it was ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "mlgate serve was not ready in time"
        time.sleep(0.5)


def _all_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_mlgate_serve_leaves_nothing_behind(registry: Registry, sig: signal.Signals):
    """SIGTERM is handled as Ctrl-C; SIGKILL reaches the server through PR_SET_PDEATHSIG.
    Either way the BentoML server and its workers are gone and the port is free."""
    port = free_port()
    proc = _serve(registry, port)
    servers = [p for p in process_tree(proc.pid) if p != proc.pid]
    try:
        assert servers, "no BentoML process under mlgate serve"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        left = _all_gone(servers, timeout_s=60)
    finally:  # whatever a failure left, so that the test leaks nothing
        if proc.poll() is None:
            proc.kill()
        for pid in servers:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert left == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
