"""The registry layer: the only code that writes MLflow runs, versions and aliases.

Alias moves are compare-and-set under a file lock and each one is recorded as a run in an
audit experiment, so the history outlives the versions it mentions.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from checks.result import GateResult
from models.config import RegistryConfig

AUDIT_EXPERIMENT = "mlgate-audit"
SHA_TAG = "onnx_sha256"
GATE_TAG_PREFIX = "gate."
MODEL_ARTIFACT_DIR = "model"
EVIDENCE_ARTIFACT = "evidence/gates.json"
PROFILE_ARTIFACT = "reference/data_profile.json"


class RegistryError(RuntimeError):
    pass


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


def connect(registry: RegistryConfig) -> MlflowClient:
    registry.store_dir.mkdir(parents=True, exist_ok=True)
    uri = registry.resolved_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, registry: RegistryConfig, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None if registry.tracking_uri else registry.artifact_location()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:
        # A concurrent creator won the race; its experiment is as good as ours.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="Registered by mlgate; versions carry their gate evidence."
            )
        except MlflowException as err:
            if "already exists" not in str(err).lower():
                raise


def get_alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def current_actor() -> str:
    """Who is moving things: MLGATE_ACTOR when a scheduler sets it, else user@host."""
    if os.environ.get("MLGATE_ACTOR"):
        return os.environ["MLGATE_ACTOR"]
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return "unknown"
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def log_gate_results(client: MlflowClient, run_id: str, results: list[GateResult]) -> None:
    for r in results:
        client.set_tag(run_id, f"{GATE_TAG_PREFIX}{r.name}", r.status.value)
    metrics = {f"gate.{r.name}.{k}": v for r in results for k, v in r.metrics.items()}
    log_params_metrics(client, run_id, {}, metrics)
    log_json_artifact(client, run_id, EVIDENCE_ARTIFACT, [r.to_dict() for r in results])


def log_params_metrics(
    client: MlflowClient, run_id: str, params: dict[str, Any], metrics: dict[str, float]
) -> None:
    """Non-finite metrics are left out: MLflow stores NaN but charts and filters choke on it."""
    ts = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items() if math.isfinite(v)],
    )


def log_json_artifact(client: MlflowClient, run_id: str, path: str, payload: Any) -> None:
    folder, _, filename = path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / filename
        local.write_text(json.dumps(payload, indent=2, default=str))
        client.log_artifact(run_id, str(local), folder or None)


def load_json_artifact(client: MlflowClient, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())


def register_version(
    client: MlflowClient,
    name: str,
    run_id: str,
    onnx_sha256: str,
    tags: dict[str, str],
    description: str = "",
) -> ModelVersion:
    ensure_registered_model(client, name)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}"
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={SHA_TAG: onnx_sha256, **tags},
        description=description,
    )
    # SQLite registration is synchronous, a tracking server may not be: wait until READY.
    deadline = time.monotonic() + 60
    while mv.status != "READY" and time.monotonic() < deadline:
        time.sleep(0.5)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise RegistryError(f"model version {name}/{mv.version} stuck in status {mv.status}")
    return mv


def gate_tags(mv: ModelVersion) -> dict[str, str]:
    return {
        k[len(GATE_TAG_PREFIX) :]: v for k, v in mv.tags.items() if k.startswith(GATE_TAG_PREFIX)
    }


def version_gate_results(client: MlflowClient, mv: ModelVersion) -> list[GateResult]:
    if not mv.run_id:
        return []
    try:
        raw = load_json_artifact(client, mv.run_id, EVIDENCE_ARTIFACT)
    except (MlflowException, OSError):
        return []
    return [GateResult.from_dict(d) for d in raw]


def _lock(registry: RegistryConfig, name: str, alias: str) -> FileLock:
    locks = registry.store_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.{alias}.lock"), timeout=60)


def move_alias(
    client: MlflowClient,
    registry: RegistryConfig,
    name: str,
    alias: str,
    to_version: str,
    *,
    expected_from: str | None,
    reason: str,
    forced: bool = False,
    evidence: dict[str, Any] | None = None,
    actor: str | None = None,
) -> AliasMove:
    """Compare-and-set: the alias moves only if it still points at `expected_from`."""
    if not reason.strip():
        raise RegistryError("an alias move needs a reason")
    actor = actor or current_actor()
    with _lock(registry, name, alias):
        current = get_alias_version(client, name, alias)
        current_version = str(current.version) if current else None
        if str(current_version) != str(expected_from) and not (
            current_version is None and expected_from is None
        ):
            raise AliasConflictError(
                f"@{alias} of {name} now points at version {current_version}, "
                f"not {expected_from} as read before; {last_mover(client, name, alias)}"
            )
        client.get_model_version(name, to_version)
        client.set_registered_model_alias(name, alias, to_version)
        client.set_model_version_tag(name, to_version, f"alias.{alias}.since", _now())
        run_id = _record_move(
            client,
            registry,
            name=name,
            alias=alias,
            from_version=current_version,
            to_version=to_version,
            reason=reason,
            actor=actor,
            forced=forced,
            evidence=evidence or {},
        )
    return AliasMove(name, alias, current_version, to_version, reason, actor, forced, run_id)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _record_move(client: MlflowClient, registry: RegistryConfig, **move: Any) -> str:
    exp_id = ensure_experiment(client, registry, AUDIT_EXPERIMENT)
    tags = {
        "mlgate.kind": "alias_move",
        "model_name": move["name"],
        "alias": move["alias"],
        "from_version": str(move["from_version"]),
        "to_version": str(move["to_version"]),
        "actor": move["actor"],
        "forced": str(move["forced"]).lower(),
        "reason": move["reason"][:5000],
        "at": _now(),
    }
    run = client.create_run(exp_id, tags=tags, run_name=f"{move['name']}@{move['alias']}")
    log_json_artifact(client, run.info.run_id, "move.json", {**tags, "evidence": move["evidence"]})
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def alias_history(
    client: MlflowClient, name: str, alias: str | None = None
) -> list[dict[str, str]]:
    exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    filt = f"tags.`model_name` = '{name}'"
    if alias:
        filt += f" and tags.`alias` = '{alias}'"
    runs = client.search_runs(
        [exp.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"]
    )
    return [dict(r.data.tags) | {"audit_run_id": r.info.run_id} for r in runs]


def last_mover(client: MlflowClient, name: str, alias: str) -> str:
    hist = alias_history(client, name, alias)
    if not hist:
        return "no recorded move"
    h = hist[0]
    return f"last moved by {h.get('actor')} at {h.get('at')} ({h.get('reason')})"


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    except MlflowException:
        pass
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "outcome": tags.get("mlgate.outcome", "-"),
                "primary_metric": tags.get("primary_metric", "-"),
                "primary_metric_value": tags.get("primary_metric_value", "-"),
                "gates": gate_tags(mv),
                "data_hash": tags.get("data_hash", ""),
                "git_commit": tags.get("git_commit", ""),
                "estimator": tags.get("estimator", ""),
                "run_id": mv.run_id,
                "created": time.strftime(
                    "%Y-%m-%d %H:%M", time.gmtime((mv.creation_timestamp or 0) / 1000)
                ),
            }
        )
    return rows
