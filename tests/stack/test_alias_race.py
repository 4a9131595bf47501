"""Compare-and-set across hosts: four processes, each with its own working directory and
store dir (four hosts that share no file), race to promote the same alias on the tracking
server.

Each round every host reads the holder, waits until all have read, and promotes its own
candidate expecting that holder. To make the race as hard as it can be, each host's write of
the alias then waits (up to WRITE_WAIT_S) until every host has reached its write: a lock that
lets two movers into the compare-and-set at once is then caught every time, not by chance.
With the PostgreSQL advisory lock (team mode) only the lock's holder ever gets there: exactly
one winner per round, the others get AliasConflictError, and the audit history is the chain
of winners in order. The same schedule with each host's file lock (the embedded default, in
separate dirs) lets every host win: the reason team mode needs the shared lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from flows import alias_moves, registry
from tests.stack.conftest import Team

# The first test also waits for the stack to start (minutes on 2 busy cores).
pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]

HOSTS = 4
ROUNDS = 5
# How long a host's write waits for the others'. Under a working lock they never all arrive,
# so it is how long the holder holds; with file locks they all arrive, however busy the CPUs.
WRITE_WAIT_S = {"postgres": 1.0, "file": 120.0}
PASSING = {"gate.data": "pass", "gate.parity": "pass", "gate.champion": "pass"}
PG_MODEL, FILE_MODEL = "race-pg", "race-file"
# (model, lock, round): the rounds every host plays, in order.
SCENARIOS = [(PG_MODEL, "postgres", r) for r in range(ROUNDS)] + [(FILE_MODEL, "file", 0)]


def _host(index: int, team: Team, barriers: list[tuple[Any, Any]], results: Any) -> None:
    """One host: its own cwd and store dir, the shared tracking server; for each round its
    read of the holder, its promotion and what came of it (verdict, detail, version)."""
    home = team.root / f"host-{index}"
    home.mkdir(exist_ok=True)
    os.chdir(home)
    candidates: dict[str, str] = {}
    for (name, lock, round_no), (read, write) in zip(SCENARIOS, barriers, strict=True):
        cfg = team.host_config(
            home / ".mlgate", **({} if lock == "postgres" else {"lock_dsn": None})
        )
        client = registry.connect(cfg.registry)
        _hold_writes(client, write, WRITE_WAIT_S[lock])
        # A host registers a new candidate of its own only once its last one has won.
        version = candidates.get(name) or _passing_version(client, cfg, name)
        holder = registry.get_alias_version(client, name, "champion")
        expected = str(holder.version) if holder else None
        read.wait(timeout=300)
        try:
            move = alias_moves.promote(
                client,
                cfg.registry,
                name,
                version,
                reason=f"round {round_no} from host {index}",
                expected_from=expected,
                actor=f"host-{index}",
            )
        except alias_moves.AliasConflictError as err:
            verdict, detail = "lost", str(err)
            candidates[name] = version
        except Exception as err:
            verdict, detail = "error", f"{type(err).__name__}: {err}"
        else:
            verdict, detail = "won", move.audit_run_id
            candidates.pop(name, None)
        results.put((name, round_no, (index, verdict, detail, version)))


def _hold_writes(client: Any, barrier: Any, wait_s: float) -> None:
    """The alias write waits until every host reaches its own, or `wait_s`."""
    write = client.set_registered_model_alias

    def held(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=wait_s)
        return write(*args, **kwargs)

    client.set_registered_model_alias = held


def _passing_version(client: Any, cfg: Any, name: str) -> str:
    """A version with passing evidence tags; the registry layer does not look inside the
    artifact, so an empty run stands in for the model."""
    registry.ensure_registered_model(client, name)
    exp_id = registry.ensure_experiment(client, cfg.registry, "race")
    run = client.create_run(exp_id)
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags=PASSING,
        await_creation_for=0,
    )
    return str(mv.version)


@pytest.fixture(scope="module")
def admin(team: Team, tmp_path_factory) -> Iterator[tuple[Any, Any]]:
    """A client of the tracking server, and its config; connect's credentials undone after."""
    with pytest.MonkeyPatch.context() as mp_env:
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp_env.setenv(var, "")
        cfg = team.host_config(tmp_path_factory.mktemp("admin") / "store")
        yield registry.connect(cfg.registry), cfg


@pytest.fixture(scope="module")
def race(team: Team, admin) -> dict[tuple[str, int], list[tuple[int, str, str, str]]]:
    """Every scenario played by HOSTS processes; the outcomes per (model, round), in host
    order. The file-lock race starts from a holder: with none, MLflow's own first insert of
    the alias would fail for all but one concurrent writer and hide the lost updates."""
    client, cfg = admin
    base = _passing_version(client, cfg, FILE_MODEL)
    alias_moves.promote(client, cfg.registry, FILE_MODEL, base, reason="base", expected_from=None)
    # Hosts fork from a server process that imported the registry layer once, instead of
    # four fresh interpreters importing MLflow side by side on two cores.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["flows.registry", "tests.stack.test_alias_race"])
    barriers = [(ctx.Barrier(HOSTS), ctx.Barrier(HOSTS)) for _ in SCENARIOS]
    results = ctx.Queue()
    hosts = [ctx.Process(target=_host, args=(i, team, barriers, results)) for i in range(HOSTS)]
    for p in hosts:
        p.start()
    outcomes: dict[tuple[str, int], list[tuple[int, str, str, str]]] = {}
    try:
        for _ in range(HOSTS * len(SCENARIOS)):
            name, round_no, outcome = results.get(timeout=300)
            outcomes.setdefault((name, round_no), []).append(outcome)
    finally:
        for p in hosts:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in hosts] == [0] * HOSTS
    return {k: sorted(v) for k, v in outcomes.items()}


def test_four_hosts_racing_with_the_postgres_lock_have_one_winner_per_round(race, admin):
    client, _ = admin
    winners = []
    for r in range(ROUNDS):
        verdicts = race[(PG_MODEL, r)]
        assert sorted(v for _, v, _, _ in verdicts) == ["lost"] * (HOSTS - 1) + ["won"], verdicts
        for _, verdict, detail, _ in verdicts:
            if verdict == "lost":
                assert "last moved to" in detail
        winners.append(next((i, d, v) for i, verdict, d, v in verdicts if verdict == "won"))

    history = list(reversed(alias_moves.alias_history(client, PG_MODEL, "champion")))
    assert [h["mlgate.kind"] for h in history] == ["promote"] * ROUNDS
    assert [h["audit_run_id"] for h in history] == [run_id for _, run_id, _ in winners]
    assert [h["actor"] for h in history] == [f"host-{i}" for i, _, _ in winners]
    assert [h["to_version"] for h in history] == [v for _, _, v in winners]
    assert [h["from_version"] for h in history] == ["None"] + [v for _, _, v in winners[:-1]]
    holder = registry.get_alias_version(client, PG_MODEL, "champion")
    assert holder is not None and str(holder.version) == winners[-1][2]


def test_file_locks_in_separate_dirs_let_every_host_win_the_same_race(race, admin):
    """Why team mode needs the shared lock: each host's file lock guards only that host, so
    every host passes its compare-and-set and each overwrites the others' moves."""
    client, _ = admin
    assert [v for _, v, _, _ in race[(FILE_MODEL, 0)]] == ["won"] * HOSTS, race[(FILE_MODEL, 0)]
    history = list(reversed(alias_moves.alias_history(client, FILE_MODEL, "champion")))
    base = history[0]["to_version"]
    assert [h["from_version"] for h in history] == ["None"] + [base] * HOSTS
