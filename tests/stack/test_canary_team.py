"""The canary in team mode: a candidate promoted through the MLflow tracking server, and the
controller lock that every host shares (a PostgreSQL advisory lock per model).

Two "hosts" are two store directories with their own canary state, HAProxy and BentoML
instances, and the same servers. Host A's controller walks a real canary with clients
replayed through its HAProxy; host B's controller for the same model waits for A's instead
of acting, and when A has promoted, finds nothing left to judge. A controller waiting for
another host's is ended by an abort on its own host.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.traffic import Replayer
from flows import alias_moves
from flows import registry as reg
from flows.canary import MlflowCanaryRegistry
from models.config import MlgateConfig, TrainConfig, load_config
from services import haproxy, pg_lock
from services.canary import (
    CONTROLLER_LOCK_NAMESPACE,
    abort_canary,
    run_canary,
    start_canary,
    stop_target,
)
from services.canary_state import CanaryError, CanaryState, StateStore, canary_paths
from tests.services.conftest import free_port
from tests.stack.conftest import Team

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]

haproxy.find_haproxy()  # `make install` installs it; without it this module errors

CANARY = {
    "steps": [50, 100],
    "interval_s": 2.0,
    "max_wait_s": 40.0,
    "min_requests": 25,
    "drain_timeout_s": 5.0,
    "start_timeout_s": 300.0,
    # The latency guardrail has its own scenario in tests/services/test_canary.py; these
    # two logistic regressions cost the same, and a 2 s window's p99 on a busy 2-core
    # machine is noise: only a large gap counts here.
    "min_p99_delta_ms": 100,
}
OFFLINE_GATES = {"gate.data": "pass", "gate.parity": "pass", "gate.champion": "pass"}


MODEL = "churn-canary"


def host(team: Team, root: Path, name: str) -> tuple[MlgateConfig, Path]:
    """A host's config file: its own store (canary state, instances) and public port, the
    team's servers and credentials, this module's model."""
    raw = yaml.safe_load(yaml.safe_dump(team.raw))
    raw["registry"].update(store_dir=str(root / name), model_name=MODEL)
    raw["canary"] = {**raw.get("canary", {}), **CANARY, "public_port": free_port()}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path), path


@pytest.fixture(scope="module")
def models(team: Team, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 (@champion), v2 and v3 of a fresh model in the tracking server, and holdout rows
    as request bodies."""
    from models.data import load_dataset, split_data
    from models.onnx_export import export_onnx
    from models.train import train_model

    root = tmp_path_factory.mktemp("canary-team")
    cfg, _ = host(team, root, "setup")
    client = reg.connect(cfg.registry)
    split = split_data(load_dataset(cfg.dataset), cfg.dataset, TrainConfig())
    versions = []
    for c in (1.0, 0.3, 3.0):
        tc = TrainConfig(estimator="logistic_regression", params={"C": c})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = train_model(split.train, cfg.dataset, tc).pipeline
        mv = reg.register_onnx_model(
            client,
            cfg.registry,
            cfg.dataset,
            export_onnx(pipeline, cfg.dataset),
            run_name=f"C={c}",
            tags={**OFFLINE_GATES, "test.model": f"C={c}"},
        )
        versions.append(str(mv.version))
    name = cfg.registry.model_name
    alias_moves.promote(
        client, cfg.registry, name, versions[0], reason="set-up", expected_from=None
    )
    rows = json.loads(split.holdout[list(cfg.dataset.features)].to_json(orient="records"))
    bodies = [json.dumps({"rows": [r]}).encode() for r in rows]
    return {"root": root, "versions": versions, "bodies": bodies, "name": name}


def _state(cfg: MlgateConfig) -> CanaryState | None:
    return StateStore(canary_paths(cfg)).read()


def _wait_for(what: str, check: Any, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.2)


def _run_in_thread(cfg: MlgateConfig, path: Path) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["state"] = run_canary(cfg, path, MlflowCanaryRegistry(cfg), env={})
        except BaseException as err:  # reported by the test, not lost in the thread
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_canary_promotes_through_the_server_while_another_hosts_controller_waits(
    team: Team, models: dict[str, Any]
) -> None:
    root, (v1, v2, _) = models["root"], models["versions"]
    a_cfg, a_path = host(team, root, "host-a")
    b_cfg, b_path = host(team, root, "host-b")
    name = a_cfg.registry.model_name
    client = reg.connect(a_cfg.registry)
    try:
        assert start_canary(a_cfg, v2, MlflowCanaryRegistry(a_cfg)).stable_version == v1
        assert start_canary(b_cfg, v2, MlflowCanaryRegistry(b_cfg)).stable_version == v1
        with Replayer(
            a_cfg.canary.public_port or 0, models["bodies"], rate=100.0, wait_for_target=True
        ) as clients:
            a_thread, a_out = _run_in_thread(a_cfg, a_path)
            _wait_for(
                "host A's canary running", lambda: (s := _state(a_cfg)) and s.phase == "running"
            )
            b_thread, b_out = _run_in_thread(b_cfg, b_path)
            _wait_for(
                "host B's controller waiting",
                lambda: any(e["event"] == "waiting_for_controller" for e in _state(b_cfg).events),
                timeout_s=60,
            )
            a_thread.join(timeout=600)
            clients.stop()
        assert "error" not in a_out, a_out
        a_state = a_out["state"]
        assert a_state.phase == "promoted", a_state.decision
        assert [s.percent for s in a_state.steps_done] == CANARY["steps"]
        assert clients.failed() == 0 and clients.answered("canary", 200) > 0, clients.summary()

        # Through the tracking server: the alias, its audit record and the verdict.
        assert str(reg.get_alias_version(client, name, "champion").version) == v2
        moves = alias_moves.alias_history(client, name, "champion")
        assert (moves[0]["from_version"], moves[0]["to_version"]) == (v1, v2)
        assert moves[0]["reason"].startswith("canary passed")
        tags = client.get_model_version(name, v2).tags
        assert tags["gate.canary"] == "pass" and tags["evidence.canary"].endswith("-pass.json")

        # B waited for A, named it, and acted on nothing while A held the lock.
        b_thread.join(timeout=120)
        assert "error" not in b_out, b_out
        b_state = b_out["state"]
        waiting = next(e for e in b_state.events if e["event"] == "waiting_for_controller")
        assert f"mlgate canary {name}" in waiting["holder"], waiting
        # ... then found v2 already champion: nothing launched, nothing written.
        assert (
            b_state.phase == "promoted" and "already holds @champion" in b_state.decision["reason"]
        )
        assert b_state.haproxy is None and b_state.canary is None and b_state.stable is None
        history = alias_moves.alias_history(client, name, "champion")
        assert [m["to_version"] for m in history][:2] == [v2, v1]
        assert client.get_model_version(name, v2).tags["gate.canary"] == "pass"
    finally:
        for cfg in (a_cfg, b_cfg):
            with contextlib.suppress(CanaryError):
                stop_target(cfg, force=True)


def test_a_controller_waiting_for_another_host_is_ended_by_an_abort_here(
    team: Team, models: dict[str, Any]
) -> None:
    """Another host holds the model's controller lock (taken here on its own connection, as
    that host's controller would); the waiting controller launches nothing, and an abort on
    its own host ends it with a rollback that leaves @champion alone."""
    root, v3 = models["root"], models["versions"][2]
    cfg, path = host(team, root, "host-c")
    name = cfg.registry.model_name
    client = reg.connect(cfg.registry)
    champion = str(reg.get_alias_version(client, name, "champion").version)
    dsn = str(team.raw["registry"]["lock_dsn"])
    try:
        start_canary(cfg, v3, MlflowCanaryRegistry(cfg))
        with pg_lock.advisory_lock(
            dsn, CONTROLLER_LOCK_NAMESPACE, name, timeout_s=5, application_name="other host"
        ):
            thread, out = _run_in_thread(cfg, path)
            _wait_for(
                "the controller waiting",
                lambda: any(e["event"] == "waiting_for_controller" for e in _state(cfg).events),
                timeout_s=60,
            )
            time.sleep(3)  # a few polls: still waiting, nothing launched
            assert thread.is_alive()
            waiting = _state(cfg)
            assert waiting.phase == "starting" and waiting.haproxy is None
            assert "other host from" in next(
                e["holder"] for e in waiting.events if e["event"] == "waiting_for_controller"
            )
            aborted = abort_canary(cfg, "freeze", MlflowCanaryRegistry(cfg), by="test", wait_s=30)
            thread.join(timeout=30)
        assert "error" not in out, out
        assert aborted.phase == out["state"].phase == "rolled_back"
        assert out["state"].decision["guardrail"] == "abort"
        assert str(reg.get_alias_version(client, name, "champion").version) == champion
        assert client.get_model_version(name, v3).tags["canary.failed_guardrail"] == "abort"
    finally:
        with contextlib.suppress(CanaryError):
            stop_target(cfg, force=True)


def test_a_controller_whose_lock_connection_breaks_stops(team: Team, models: dict[str, Any]):
    """The lock lives with its connection: once the server has dropped it (here the
    connection is terminated from another session, as a network cut would), `check` says
    so, and another session can take the lock."""
    dsn = str(team.raw["registry"]["lock_dsn"])
    key = models["name"] + "-lost"
    with pg_lock.wait_for_lock(
        dsn,
        CONTROLLER_LOCK_NAMESPACE,
        key,
        application_name="doomed holder",
        keep_waiting=lambda: False,
        on_wait=lambda holder: None,
    ) as held:
        assert isinstance(held, pg_lock.HeldLock)
        held.check()
        pid = held.conn.info.backend_pid
        with pg_lock.connect(dsn, "admin") as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(pg_lock.PgLockLost, match="was lost"):
            held.check()
        with pg_lock.advisory_lock(
            dsn, CONTROLLER_LOCK_NAMESPACE, key, timeout_s=5, application_name="next holder"
        ):
            pass
