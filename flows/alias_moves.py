"""Alias moves and their audit history: promotions, rollbacks, deletions and canary verdicts.

Alias moves are compare-and-set under a lock (a file lock, or in team mode a PostgreSQL
advisory lock shared by all hosts) and each one is recorded as a run in an
audit experiment, so the history outlives the versions it mentions.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.registry import (
    RegistryError,
    current_actor,
    ensure_experiment,
    gate_tags,
    get_alias_version,
    log_json_artifact,
    notify,
)
from models.config import RegistryConfig
from models.registry_layout import (
    ALIAS_TAG_PREFIX,
    AUDIT_EXPERIMENT,
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    KIND_TAG,
    MOVE_ARTIFACT,
    RECOVERED_TAG,
)


class AliasConflictError(RegistryError):
    """Someone else moved the alias between our read and our write."""


@dataclass(frozen=True)
class AliasMove:
    model_name: str
    alias: str
    from_version: str | None
    to_version: str
    reason: str
    actor: str
    forced: bool
    audit_run_id: str


def _lock(
    registry: RegistryConfig, name: str, alias: str
) -> contextlib.AbstractContextManager[Any]:
    """The lock an alias move holds. Team mode (`registry.lock_dsn`): a PostgreSQL advisory
    lock that movers on every host share. The embedded default: a file lock under the store
    dir, which serialises movers on this host (and those sharing its filesystem) only."""
    if registry.lock_dsn is not None:
        from flows.alias_lock import advisory_lock

        return advisory_lock(
            registry.lock_dsn.get_secret_value(), name, alias, timeout_s=registry.lock_timeout_s
        )
    locks = registry.store_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.{alias}.lock"), timeout=registry.lock_timeout_s)


def move_alias(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    alias: str,
    to_version: str,
    *,
    expected_from: str | None,
    reason: str,
    kind: str = "promote",
    forced: bool = False,
    evidence: dict[str, Any] | None = None,
    actor: str | None = None,
) -> AliasMove:
    """Compare-and-set: the alias moves only if it still points at `expected_from`.

    The lock (`_lock`: a file lock, or in team mode a PostgreSQL advisory lock) serialises
    movers; the re-read under the lock is what makes a stale reader lose instead of overwrite.
    """
    if not reason.strip():
        raise RegistryError("an alias move needs a reason")
    actor = actor or current_actor(registry)
    with _lock(registry, name, alias):
        settle_moves(client, name, alias)
        current = get_alias_version(client, name, alias)
        current_version = str(current.version) if current else None
        if current_version != (str(expected_from) if expected_from is not None else None):
            raise AliasConflictError(
                f"@{alias} of {name} points at version {current_version}, not "
                f"{expected_from} as read before the move; {last_mover(client, name, alias)}"
            )
        if current_version == str(to_version):
            raise RegistryError(f"{name} version {to_version} already holds @{alias}")
        try:
            client.get_model_version(name, to_version)
        except MlflowException:
            raise RegistryError(f"{name} has no version {to_version}") from None
        # Write-ahead: the record exists (RUNNING) before the alias moves, and is finished
        # after; a mover killed in between leaves an intent that `settle_moves` (the next
        # move, under this lock) completes or abandons from where the alias points.
        run_id = _record(
            client,
            registry,
            kind=kind,
            name=name,
            alias=alias,
            from_version=current_version,
            to_version=str(to_version),
            reason=reason,
            actor=actor,
            forced=forced,
            evidence=evidence or {},
            finished=False,
        )
        try:
            client.set_registered_model_alias(name, alias, to_version)
        except BaseException:
            # The call may have failed after the server applied it (a timeout, an interrupt
            # after the commit): the alias, not the exception, says whether it moved. When
            # it cannot be asked, the intent stays RUNNING for the next mover to settle.
            with contextlib.suppress(Exception):
                holder = get_alias_version(client, name, alias)
                moved = holder is not None and str(holder.version) == str(to_version)
                client.set_terminated(run_id, "FINISHED" if moved else "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        client.set_model_version_tag(name, to_version, f"{ALIAS_TAG_PREFIX}{alias}.since", _now())
        if current_version is not None and current_version != str(to_version):
            _tag_if_exists(
                client, name, current_version, f"{ALIAS_TAG_PREFIX}{alias}.until", _now()
            )
    move = AliasMove(name, alias, current_version, str(to_version), reason, actor, forced, run_id)
    notify(registry, f"mlgate: {kind} {name}@{alias}", _describe(move, kind))
    return move


def _tag_if_exists(client: MlflowClient, name: str, version: str, key: str, value: str) -> None:
    # The previous holder may have been deleted (forced); the history keeps it regardless.
    with contextlib.suppress(MlflowException):
        client.set_model_version_tag(name, version, key, value)


def _describe(move: AliasMove, kind: str) -> str:
    forced = " (FORCED)" if move.forced else ""
    return (
        f"{kind}{forced}: {move.model_name}@{move.alias} {move.from_version} -> "
        f"{move.to_version} by {move.actor}: {move.reason}"
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def settle_moves(client: MlflowClient, name: str, alias: str) -> list[str]:
    """Finish the intents of movers that died between their record and the end of their move
    (runs of the audit experiment still RUNNING): the newest one whose target holds the
    alias happened (FINISHED), every other one did not (KILLED). Only under the alias's
    lock, where no live mover has an intent open. Returns a line per intent settled."""
    exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`model_name` = '{name}' and tags.`alias` = '{alias}' "
            "and attributes.status = 'RUNNING'"
        ),
        max_results=1000,
    )
    if not runs:
        return []
    holder = get_alias_version(client, name, alias)
    held = str(holder.version) if holder else None
    ordered = sorted(runs, key=lambda r: int(r.data.tags.get("at_ns", "0")), reverse=True)
    settled = []
    for i, run in enumerate(ordered):
        happened = i == 0 and run.data.tags.get("to_version") == held
        status = "FINISHED" if happened else "KILLED"
        client.set_tag(run.info.run_id, RECOVERED_TAG, "completed" if happened else "abandoned")
        client.set_terminated(run.info.run_id, status)
        settled.append(f"{run.data.tags.get('to_version')}: {status}")
    return settled


def _record(
    client: MlflowClient, registry: RegistryConfig, *, finished: bool = True, **move: Any
) -> str:
    """One run in the audit experiment per move: it outlives the versions it names. With
    `finished=False` it stays RUNNING (a move's intent) until the mover finishes it."""
    exp_id = ensure_experiment(client, registry, AUDIT_EXPERIMENT)
    tags = {
        KIND_TAG: move["kind"],
        "model_name": move["name"],
        "alias": move["alias"],
        "from_version": str(move["from_version"]),
        "to_version": str(move["to_version"]),
        "actor": move["actor"],
        "forced": str(move["forced"]).lower(),
        "reason": move["reason"][:5000],
        "at": _now(),
        "at_ns": str(time.time_ns()),
    }
    run = client.create_run(
        exp_id, tags=tags, run_name=f"{move['kind']} {move['name']}@{move['alias']}"
    )
    log_json_artifact(
        client, run.info.run_id, MOVE_ARTIFACT, {**tags, "evidence": move["evidence"]}
    )
    if finished:
        client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def alias_history(
    client: MlflowClient, name: str, alias: str | None = None
) -> list[dict[str, str]]:
    """Every recorded move, newest first."""
    exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    filt = f"tags.`model_name` = '{name}'"
    if alias:
        filt += f" and tags.`alias` = '{alias}'"
    runs = client.search_runs([exp.experiment_id], filter_string=filt, max_results=50000)
    kept = [r for r in runs if r.info.status == "FINISHED" or _happened(client, r, runs)]
    rows = [dict(r.data.tags) | {"audit_run_id": r.info.run_id} for r in kept]
    rows = [{k: v for k, v in r.items() if not k.startswith("mlflow.")} for r in rows]
    return sorted(rows, key=lambda r: int(r.get("at_ns", "0")), reverse=True)


def _happened(client: MlflowClient, run: Any, runs: list[Any]) -> bool:
    """An intent not yet settled (its mover still at work, or dead) counts as a move once
    its target holds the alias and nothing was recorded after it; FAILED and KILLED never."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    alias, at_ns = tags.get("alias", ""), int(tags.get("at_ns", "0"))
    if any(
        r.data.tags.get("alias") == alias and int(r.data.tags.get("at_ns", "0")) > at_ns
        for r in runs
        if r.info.status in ("FINISHED", "RUNNING")
    ):
        return False
    holder = get_alias_version(client, tags.get("model_name", ""), alias)
    return holder is not None and str(holder.version) == tags.get("to_version")


def last_mover(client: MlflowClient, name: str, alias: str) -> str:
    hist = [h for h in alias_history(client, name, alias) if h.get("to_version") != "None"]
    if not hist:
        return "no recorded move"
    h = hist[0]
    return (
        f"last moved to {h.get('to_version')} by {h.get('actor')} at {h.get('at')} "
        f"({h.get('reason')})"
    )


class EvidenceError(RegistryError):
    """The version lacks passing evidence for a required gate."""

    def __init__(self, name: str, version: str, missing: dict[str, str]):
        self.missing = missing
        listed = ", ".join(f"{g}: {s}" for g, s in missing.items())
        super().__init__(
            f"{name} version {version} lacks passing evidence for {listed}; "
            "fix the evidence or use --force with --reason"
        )


def missing_evidence(mv: ModelVersion, required: tuple[str, ...]) -> dict[str, str]:
    tags = gate_tags(mv)
    return {g: tags.get(g, "missing") for g in required if tags.get(g) != "pass"}


def promote(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    version: str,
    *,
    reason: str,
    alias: str = CHAMPION_ALIAS,
    force: bool = False,
    expected_from: str | Literal["read"] | None = "read",
    actor: str | None = None,
) -> AliasMove:
    """Move `alias` to `version` when the version carries passing evidence for every
    required gate; `force` overrides that and is recorded as forced."""
    if force and not reason.strip():
        raise RegistryError("--force needs --reason")
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None
    missing = missing_evidence(mv, registry.required_gates)
    if missing and not force:
        raise EvidenceError(name, str(version), missing)
    if expected_from == "read":
        current = get_alias_version(client, name, alias)
        expected_from = str(current.version) if current else None
    return move_alias(
        client,
        registry,
        name,
        alias,
        str(version),
        expected_from=expected_from,
        reason=reason,
        kind="promote",
        forced=bool(missing) and force,
        evidence={"gates": gate_tags(mv), "missing": missing, "force_requested": force},
        actor=actor,
    )


def promote_candidate(
    client: MlflowClient,
    registry: RegistryConfig,
    version: str,
    *,
    judged_against: str | None,
    to_champion: bool,
    reason: str,
    actor: str,
) -> list[AliasMove]:
    """A version that passed its offline gates takes `@challenger` from whoever holds it and,
    with `to_champion`, `@champion`, compare-and-set against the champion it was judged
    against: the same evidence-checked path as a person's `mlgate promote`."""
    aliases: list[tuple[str, str | None]] = [(CHALLENGER_ALIAS, "read")]
    if to_champion:
        aliases.append((CHAMPION_ALIAS, judged_against))
    return [
        promote(
            client,
            registry,
            registry.model_name,
            version,
            alias=alias,
            reason=reason,
            expected_from=expected,
            actor=actor,
        )
        for alias, expected in aliases
    ]


def holder_stack(history: list[dict[str, str]]) -> list[str]:
    """Replay the recorded moves of one alias, oldest first: a promotion pushes its target,
    a rollback pops. The top is the holder, the one below it the rollback target."""
    stack: list[str] = []
    for h in sorted(history, key=lambda r: int(r.get("at_ns", "0"))):
        kind, to = h.get(KIND_TAG), h.get("to_version", "None")
        if kind == "rollback":
            if stack:
                stack.pop()
        elif kind == "promote" and to != "None":
            stack.append(to)
    return stack


def rollback(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    *,
    reason: str,
    alias: str = CHAMPION_ALIAS,
    actor: str | None = None,
) -> AliasMove:
    """Back to the version that held the alias before, from the recorded history."""
    current = get_alias_version(client, name, alias)
    if current is None:
        raise RegistryError(f"@{alias} of {name} is not set: nothing to roll back")
    stack = holder_stack(alias_history(client, name, alias))
    if not stack or stack[-1] != str(current.version):
        raise RegistryError(
            f"@{alias} of {name} points at {current.version} but the recorded history says "
            f"{stack[-1] if stack else 'nothing'}: it was moved outside mlgate; promote "
            "explicitly instead"
        )
    if len(stack) < 2:
        raise RegistryError(f"@{alias} of {name} has no earlier holder to roll back to")
    target = stack[-2]
    try:
        client.get_model_version(name, target)
    except MlflowException:
        raise RegistryError(
            f"the previous holder of @{alias}, version {target}, was deleted; promote a "
            "version explicitly"
        ) from None
    return move_alias(
        client,
        registry,
        name,
        alias,
        target,
        expected_from=str(current.version),
        reason=reason,
        kind="rollback",
        actor=actor,
    )


# On a move's audit run: how long it took to reach the serving instances (`mlgate rollback
# --wait-served URL`): the slowest one's seconds, or `timeout`; and each instance's.
SERVED_S_TAG = "served_s"
SERVED_BY_TAG = "served_by"


def record_served(
    client: MlflowClient, move: AliasMove, served: Mapping[str, float | None]
) -> None:
    """Record on `move`'s audit run the seconds until each serving instance answered with
    the version it moved to (None: not within the wait): `served_s`, as a tag `mlgate
    history` shows and as a metric, and `served_by`, every instance's, as JSON."""
    if not served:
        raise RegistryError("no serving instances to record the move's arrival at")
    seconds = list(served.values())
    slowest = None if any(s is None for s in seconds) else max(cast(list[float], seconds))
    client.set_tag(
        move.audit_run_id, SERVED_S_TAG, "timeout" if slowest is None else f"{slowest:.3f}"
    )
    client.set_tag(
        move.audit_run_id,
        SERVED_BY_TAG,
        json.dumps({url: None if s is None else round(s, 3) for url, s in served.items()}),
    )
    if slowest is not None:
        client.log_metric(move.audit_run_id, SERVED_S_TAG, slowest)


def delete_version(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    version: str,
    *,
    reason: str,
    force: bool = False,
    actor: str | None = None,
) -> None:
    """Refuse to delete a version that holds an alias unless forced; record the deletion."""
    mv = client.get_model_version(name, version)
    held = list(getattr(mv, "aliases", []) or [])
    if held and not force:
        raise RegistryError(
            f"{name} version {version} holds @{', @'.join(held)}; move the alias first or "
            "use --force with --reason"
        )
    if not reason.strip():
        raise RegistryError("deleting a version needs a reason")
    client.delete_model_version(name, version)
    _record(
        client,
        registry,
        kind="delete",
        name=name,
        alias=",".join(held) or "-",
        from_version=version,
        to_version="None",
        reason=reason,
        actor=actor or current_actor(registry),
        forced=bool(held),
        evidence={"held_aliases": held},
    )


def record_canary(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    version: str,
    *,
    stable_version: str,
    outcome: str,
    reason: str,
    actor: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> str:
    """A canary's verdict as a run of the audit experiment, beside the alias moves (under the
    pseudo-alias `canary`, so it never counts as a move of `@champion`)."""
    return _record(
        client,
        registry,
        kind="canary",
        name=name,
        alias="canary",
        from_version=stable_version,
        to_version=str(version),
        reason=f"{outcome}: {reason}",
        actor=actor or current_actor(registry),
        forced=False,
        evidence=evidence or {},
    )
