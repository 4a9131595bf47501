"""Alias moves survive their mover's death: a mover killed between the move's record and the
end of the move leaves the history either with the move (the alias moved) or without it
(it did not), never an alias moved with no record. Real MLflow on SQLite in a temp dir, real
child processes killed with SIGKILL; the exact points are hit by a child that kills itself
there (fault injection: it wraps MLflow's alias call), the rest by kills at random times."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import alias_moves, registry
from models.config import RegistryConfig, load_config
from models.registry_layout import GATE_TAG_PREFIX, RECOVERED_TAG
from tests.conftest import REPO, write_config

pytestmark = pytest.mark.integration

NAME = "churn"
PASSING = {f"{GATE_TAG_PREFIX}{g}": "pass" for g in ("data", "parity", "champion")}

# A mover in its own process. `die` is where it kills itself: "before" the alias call,
# "after" it (the alias has moved, the record is not finished), or "never" (it promotes
# back and forth until killed from outside, printing each move it finished).
MOVER = """
import os, signal, sys
from mlflow import MlflowClient
from flows import alias_moves, registry
from models.config import load_config

config_path, die, *versions = sys.argv[1:]
cfg = load_config(config_path)
real = MlflowClient.set_registered_model_alias

def set_alias(self, *args, **kwargs):
    if die == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, *args, **kwargs)
    if die == "after":
        os.kill(os.getpid(), signal.SIGKILL)

MlflowClient.set_registered_model_alias = set_alias
client = registry.connect(cfg.registry)
print("ready", flush=True)
i = 0
while True:
    holder = registry.get_alias_version(client, "churn", "champion")
    held = str(holder.version) if holder else None
    target = versions[i % len(versions)]
    i += 1
    if target == held:
        continue
    alias_moves.promote(
        client, cfg.registry, "churn", target, reason=f"move {i}", expected_from=held
    )
    print("moved", target, flush=True)
"""


def _version(client, reg: RegistryConfig) -> str:
    exp = registry.ensure_experiment(client, reg, reg.experiment)
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id)
    return str(registry.register_version(client, NAME, run.info.run_id, "0" * 64, PASSING).version)


def _mover(config_path: Path, die: str, *versions: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MOVER, str(config_path), die, *versions],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _holder(client) -> str | None:
    mv = registry.get_alias_version(client, NAME, "champion")
    return str(mv.version) if mv else None


def _consistent(client) -> list[str]:
    """The recorded history replays to the alias's holder."""
    stack = alias_moves.holder_stack(alias_moves.alias_history(client, NAME, "champion"))
    assert (stack[-1] if stack else None) == _holder(client), (stack, _holder(client))
    return stack


@pytest.fixture()
def world(tmp_path):
    path = write_config(tmp_path)
    cfg = load_config(path)
    client = registry.connect(cfg.registry)
    versions = [_version(client, cfg.registry) for _ in range(3)]
    alias_moves.promote(client, cfg.registry, NAME, versions[0], reason="first", expected_from=None)
    return cfg, client, path, versions


def test_a_mover_killed_after_the_alias_moved_leaves_the_move_in_history(world):
    cfg, client, path, (v1, v2, _) = world
    proc = _mover(path, "after", v2)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert _holder(client) == v2
    # Before anyone settles it, the open intent already counts: its target holds the alias.
    assert _consistent(client) == [v1, v2]
    # A rollback works from that history (it used to refuse: "moved outside mlgate"), and
    # settles the intent on its way.
    assert alias_moves.rollback(client, cfg.registry, NAME, reason="undo").to_version == v1
    assert _consistent(client) == [v1]
    intent = next(
        h for h in alias_moves.alias_history(client, NAME, "champion") if h["to_version"] == v2
    )
    run = client.get_run(intent["audit_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[RECOVERED_TAG] == "completed"


def test_a_mover_killed_before_the_alias_moved_leaves_no_move_in_history(world):
    cfg, client, path, (v1, v2, v3) = world
    proc = _mover(path, "before", v2)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert _holder(client) == v1 and _consistent(client) == [v1]
    alias_moves.promote(client, cfg.registry, NAME, v3, reason="next", expected_from=v1)
    assert _consistent(client) == [v1, v3]
    exp = client.get_experiment_by_name(registry.AUDIT_EXPERIMENT)
    abandoned = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get(RECOVERED_TAG) == "abandoned"
    ]
    assert [(r.info.status, r.data.tags["to_version"]) for r in abandoned] == [("KILLED", v2)]


def test_movers_killed_at_random_times_never_leave_an_unrecorded_move(world):
    """SIGKILL at a random moment of a mover promoting back and forth, 12 times: after each
    kill the history replays to the holder, and the next mover settles what was left."""
    cfg, client, path, versions = world
    rng = random.Random(20261205)
    moved = open_intents = 0
    for _ in range(12):
        proc = _mover(path, "never", *versions)
        # After its first finished move (however slow the machine), at a random moment.
        assert proc.stdout is not None and proc.stdout.readline().startswith("moved")
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        moved += 1 + out.count("moved")
        _consistent(client)
        exp = client.get_experiment_by_name(registry.AUDIT_EXPERIMENT)
        open_intents += len(
            client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
        )
    holder = _holder(client)
    target = next(v for v in versions if v != holder)
    alias_moves.promote(client, cfg.registry, NAME, target, reason="after", expected_from=holder)
    stack = _consistent(client)
    assert stack[-1] == target
    print(f"{moved} moves finished, {open_intents} kills left an intent open")
    assert moved > 0
