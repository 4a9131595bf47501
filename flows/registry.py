"""The registry layer: the only code that writes MLflow runs, versions and aliases.

Alias moves are compare-and-set under a lock (a file lock, or in team mode a PostgreSQL
advisory lock shared by all hosts) and each one is recorded as a run in an
audit experiment, so the history outlives the versions it mentions.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import math
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import tenacity
from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from checks.result import GateResult
from models.config import DatasetConfig, RegistryConfig

# The layout lives in models/registry_layout.py; flows/ reads these names as `registry.X`.
from models.registry_layout import (
    ALIAS_TAG_PREFIX,
    AUDIT_EXPERIMENT,
    CANARY_EVIDENCE_DIR,
    CANARY_EVIDENCE_TAG,
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    EVIDENCE_ARTIFACT,
    EVIDENCE_GATES_TAG,
    EVIDENCE_REPORT_TAG,
    GATE_TAG_PREFIX,
    GPU_SHA_TAG,
    KIND_TAG,
    MADE_BY_TAG,
    MODEL_ARTIFACT_DIR,
    MONITOR_EXPERIMENT,
    MOVE_ARTIFACT,
    OUTCOME_TAG,
    RECOVERED_TAG,
    REPORT_ARTIFACT,
    SHA_TAG,
    SHADOW_EVIDENCE_DIR,
    SHADOW_EVIDENCE_TAG,
    STOPPED_AT_TAG,
)
from models.registry_layout import DATA_DOCS_ARTIFACT_DIR as DATA_DOCS_ARTIFACT_DIR
from models.registry_layout import DRIFT_ARTIFACT as DRIFT_ARTIFACT
from models.registry_layout import HISTOGRAMS_ARTIFACT as HISTOGRAMS_ARTIFACT
from models.registry_layout import PROFILE_ARTIFACT as PROFILE_ARTIFACT
from models.registry_layout import SAMPLE_ARTIFACT as SAMPLE_ARTIFACT
from services import registry_access

if TYPE_CHECKING:
    from flows.monitoring import MonitoringEvidence
    from flows.training_evidence import TrainingEvidence
    from models.onnx_export import OnnxModel


class RegistryError(RuntimeError):
    pass


class AliasConflictError(RegistryError):
    """Someone else moved the alias between our read and our write."""


class RegistryUnavailableError(RegistryError, registry_access.RegistryUnavailableError):
    """The registry cannot be used now: locked, unreachable, or its database is missing.
    One line naming the registry and why; caught as either parent."""


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


# How long one call waits out a SQLite writer (concurrent promoters queue this long).
_BUSY_RETRY_S = 120
# Beside the SQLite file: written when mlgate first opens it, so that a database that later
# goes missing is told from one never created (`check_registry_present`).
REGISTRY_MARKER_SUFFIX = ".created"


def _is_sqlite_busy(err: BaseException) -> bool:
    return "database is locked" in str(err) or "database table is locked" in str(err)


class _BusyRetryingClient:
    """MlflowClient whose calls retry while SQLite says "database is locked".

    SQLite allows one writer; concurrent promoters (threads or processes) otherwise see that
    error escape after sqlite3's 5 s busy timeout. A locked statement is rolled back, so
    calling again is safe.
    """

    def __init__(self, client: MlflowClient, label: str):
        self._client = client
        self._label = label

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._client, attr)
        if not callable(target):
            return target

        @functools.wraps(target)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception(_is_sqlite_busy),
                    wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
                    stop=tenacity.stop_after_delay(_BUSY_RETRY_S),
                    reraise=True,
                ):
                    with attempt:
                        return target(*args, **kwargs)
            except Exception as err:
                if not _is_sqlite_busy(err):
                    raise
                raise RegistryUnavailableError(
                    f"registry {self._label} stayed locked by another process for "
                    f"{_BUSY_RETRY_S} s ({attr}: SQLite says database is locked)"
                ) from None
            raise AssertionError("unreachable: tenacity reraises")

        return call


def connect(registry: RegistryConfig) -> MlflowClient:
    """A client of the configured registry: SQLite under the store dir (embedded), or a
    tracking server with the configured basic-auth user (team mode).

    A registry that cannot be reached (SQLite locked by a writer, a server that does not
    answer) is tried for `registry.unavailable_retry_s`, then `RegistryUnavailableError`
    in one line. A SQLite registry is created on first use only, never in place of one
    that went missing (`check_registry_present`)."""
    from flows.runtime import use_team_servers

    registry.store_dir.mkdir(parents=True, exist_ok=True)
    use_team_servers(registry)
    uri = registry.resolved_tracking_uri()
    database = registry_access.sqlite_database(uri)
    if database is not None:
        check_registry_present(registry, database)
        database.parent.mkdir(parents=True, exist_ok=True)
    try:
        client = registry_access.retry_unavailable(
            lambda: registry_access.open_registry_client(
                uri, registry.http_timeout_s, registry.http_max_retries
            ),
            uri,
            registry.unavailable_retry_s,
        )
    except registry_access.RegistryUnavailableError as err:
        raise RegistryUnavailableError(str(err)) from None
    if database is None:
        return cast(MlflowClient, client)
    _mark_registry_created(database)
    return cast(MlflowClient, _BusyRetryingClient(client, str(database)))


def registry_marker(database: Path) -> Path:
    """The file beside a SQLite registry that says it was opened here once."""
    return database.with_name(database.name + REGISTRY_MARKER_SUFFIX)


def check_registry_present(registry: RegistryConfig, database: Path) -> None:
    """Refuse to start a new, empty registry where one existed: its SQLite file is missing
    but its marker is there (written when mlgate first opened it), or, for a store from
    before the marker, the store's artifact folder holds runs that database recorded.
    Neither: first use, and MLflow creates the database."""
    if database.exists():
        return
    marker = registry_marker(database)
    if marker.exists():
        raise RegistryUnavailableError(
            f"registry database {database} is missing, though it existed ({marker.name} "
            "beside it was written when it was first used); restore it, or delete "
            f"{marker} to start a new, empty registry"
        )
    artifacts = registry.store_dir / "artifacts"
    if registry.tracking_uri is None and artifacts.is_dir() and any(artifacts.iterdir()):
        raise RegistryUnavailableError(
            f"registry database {database} is missing, but {artifacts} holds the artifacts "
            "of the runs it recorded; restore it, or move that folder away to start a new, "
            "empty registry"
        )


def _mark_registry_created(database: Path) -> None:
    marker = registry_marker(database)
    if marker.exists():
        return
    record = {"database": str(database), "first_opened": datetime.now(UTC).isoformat()}
    # Without the marker only the artifact folder tells a missing database from a new one.
    with contextlib.suppress(OSError), open(marker, "x") as f:
        json.dump(record, f)


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


def current_actor(registry: RegistryConfig) -> str:
    """Who is moving things: `registry.actor` when a scheduler sets it, else user@host."""
    if registry.actor:
        return registry.actor
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
    for key, value in gate_status_tags(results).items():
        client.set_tag(run_id, key, value)
    log_params_metrics(client, run_id, {}, gate_metrics(results))
    log_json_artifact(client, run_id, EVIDENCE_ARTIFACT, [r.to_dict() for r in results])


def gate_status_tags(results: list[GateResult]) -> dict[str, str]:
    return {f"{GATE_TAG_PREFIX}{r.name}": r.status.value for r in results}


def gate_metrics(results: list[GateResult]) -> dict[str, float]:
    return {f"{GATE_TAG_PREFIX}{r.name}.{k}": v for r in results for k, v in r.metrics.items()}


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
    log_text_artifact(client, run_id, path, json.dumps(payload, indent=2, default=str))


def log_text_artifact(client: MlflowClient, run_id: str, path: str, text: str) -> None:
    folder, _, filename = path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / filename
        local.write_text(text)
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


def _record_run(
    client: MlflowClient,
    registry: RegistryConfig,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Callable[[str], Mapping[str, bytes]],
    nested: Callable[[str], None] | None = None,
) -> str:
    """One run written in one go: tags at creation, then params and metrics, then every
    artifact (`artifacts(run_id)`: path -> bytes) in one upload, then the runs `nested(run_id)`
    writes under it. A failure on the way ends the run FAILED, so a FINISHED run always holds
    all of it."""
    exp_id = ensure_experiment(client, registry, experiment)
    run = client.create_run(exp_id, tags=dict(tags), run_name=run_name)
    run_id = str(run.info.run_id)
    try:
        log_params_metrics(client, run_id, dict(params), dict(metrics))
        with tempfile.TemporaryDirectory() as tmp:
            for path, content in artifacts(run_id).items():
                local = Path(tmp, path)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(content)
            client.log_artifacts(run_id, tmp)
        if nested is not None:
            nested(run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _verdict_tags(accepted: bool, stopped_at: str | None) -> dict[str, str]:
    tags = {OUTCOME_TAG: "accepted" if accepted else "rejected"}
    if stopped_at:
        tags[STOPPED_AT_TAG] = stopped_at
    return tags


def record_training_run(
    client: MlflowClient, registry: RegistryConfig, evidence: TrainingEvidence
) -> str:
    """The training run, once every offline gate has run: its facts, each gate's status and
    the verdict as tags, params, metrics with each gate's numbers, and every artifact with the
    gates' evidence JSON. Nothing of a training run is written before this."""
    gates = list(evidence.gates)
    payload = json.dumps([g.to_dict() for g in gates], indent=2, default=str).encode()
    return _record_run(
        client,
        registry,
        registry.experiment,
        evidence.run_name,
        {
            **evidence.tags,
            **gate_status_tags(gates),
            **_verdict_tags(evidence.accepted, evidence.stopped_at),
        },
        params=evidence.params,
        metrics={**evidence.metrics, **gate_metrics(gates)},
        artifacts=lambda run_id: {**evidence.artifacts(run_id), EVIDENCE_ARTIFACT: payload},
        nested=lambda run_id: _record_nested_runs(client, registry, run_id, evidence),
    )


def _record_nested_runs(
    client: MlflowClient, registry: RegistryConfig, parent_id: str, evidence: TrainingEvidence
) -> None:
    """The candidates the training run tried, each a run nested under it (MLflow's parent
    tag): the UI shows them under the run, and `latest_training_run` skips them."""
    for run in evidence.nested_runs:
        _record_run(
            client,
            registry,
            registry.experiment,
            run.run_name,
            {**run.tags, MLFLOW_PARENT_RUN_ID: parent_id},
            params=run.params,
            metrics=run.metrics,
            artifacts=lambda _run_id: {},
        )


def register_candidate(
    client: MlflowClient, registry: RegistryConfig, run_id: str, evidence: TrainingEvidence
) -> ModelVersion:
    """The challenger the champion gate judged, accepted or not, as a version of the model,
    from its recorded run (`record_training_run`): the ONNX sha256, each gate's status, the
    verdict, the facts and links to the evidence. The run is tagged with the version."""
    if evidence.candidate is None or not evidence.registrable:
        raise RegistryError(f"training run {run_id} holds no challenger to register")
    onnx_model = evidence.candidate.onnx
    check_registrable(onnx_model.content, f"the challenger of run {run_id}")
    if onnx_model.gpu_content is not None:
        check_registrable(onnx_model.gpu_content, f"the GPU graph of run {run_id}")
    gpu_tag = {GPU_SHA_TAG: onnx_model.gpu_sha256} if onnx_model.gpu_sha256 else {}
    artifact_uri = client.get_run(run_id).info.artifact_uri
    mv = register_version(
        client,
        registry.model_name,
        run_id,
        evidence.candidate.onnx.sha256,
        tags={
            **gate_status_tags(list(evidence.gates)),
            **evidence.version_tags,
            **gpu_tag,
            OUTCOME_TAG: "accepted" if evidence.accepted else "rejected",
            EVIDENCE_GATES_TAG: f"{artifact_uri}/{EVIDENCE_ARTIFACT}",
            EVIDENCE_REPORT_TAG: f"{artifact_uri}/{REPORT_ARTIFACT}",
        },
        description=evidence.description,
    )
    client.set_tag(run_id, "model_version", str(mv.version))
    return mv


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


def record_training_verdict(
    client: MlflowClient,
    registry: RegistryConfig,
    run_id: str,
    version: str,
    gates: list[GateResult],
    *,
    accepted: bool,
    stopped_at: str | None,
) -> None:
    """A verdict reached after the run was recorded (the canary's, on live traffic): every
    gate again on the run, and the verdict on the version and on the run."""
    log_gate_results(client, run_id, gates)
    verdict = _verdict_tags(accepted, stopped_at)
    client.set_model_version_tag(registry.model_name, version, OUTCOME_TAG, verdict[OUTCOME_TAG])
    for key, value in verdict.items():
        client.set_tag(run_id, key, value)


def record_monitoring_run(
    client: MlflowClient, registry: RegistryConfig, evidence: MonitoringEvidence
) -> str:
    """One monitoring window as a run of the monitoring experiment, written in one go after
    the window was judged: its facts and each gate's status as tags, its numbers, artifacts."""
    return _record_run(
        client,
        registry,
        MONITOR_EXPERIMENT,
        evidence.run_name,
        {**evidence.tags, **gate_status_tags(list(evidence.gates))},
        params={},
        metrics=evidence.metrics,
        artifacts=evidence.artifacts,
    )


def register_onnx_model(
    client: MlflowClient,
    registry: RegistryConfig,
    dataset: DatasetConfig,
    onnx_model: OnnxModel,
    *,
    run_name: str,
    tags: dict[str, str],
    description: str = "",
) -> ModelVersion:
    """Register an ONNX model made outside the training flow (the demo's deliberately bad
    candidate, tests' hand-made ones) under the same contract: `model.onnx` and
    `schema.json` under its own run's `model/` artifacts and the sha256 tag. Only the tags
    given are set: no gate evidence is invented for it."""
    from models.onnx_export import write_model_dir

    check_registrable(onnx_model.content, run_name)
    exp_id = ensure_experiment(client, registry, registry.experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={MADE_BY_TAG: run_name})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(onnx_model, dataset, Path(tmp) / MODEL_ARTIFACT_DIR)
        client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT_DIR)
    client.set_terminated(run.info.run_id)
    return register_version(
        client,
        registry.model_name,
        run.info.run_id,
        onnx_model.sha256,
        tags={**({GPU_SHA_TAG: onnx_model.gpu_sha256} if onnx_model.gpu_sha256 else {}), **tags},
        description=description or run_name,
    )


def check_registrable(content: bytes, what: str) -> None:
    """A version is the bytes its sha256 tag covers: a graph that refers to external data
    (a tensor stored in another file, found anywhere in the graph) is refused before
    anything is written, naming the tensor."""
    from models.onnx_export import ExternalDataError, check_no_external_data

    try:
        check_no_external_data(content)
    except ExternalDataError as err:
        raise RegistryError(f"{what} cannot be registered: {err}") from None


def gate_tags(mv: ModelVersion) -> dict[str, str]:
    return {
        k[len(GATE_TAG_PREFIX) :]: v for k, v in mv.tags.items() if k.startswith(GATE_TAG_PREFIX)
    }


def version_gate_results(client: MlflowClient, mv: ModelVersion) -> list[GateResult]:
    """The offline gates from the training run's evidence, then the latest canary and shadow
    verdicts (tags `evidence.canary`, `evidence.shadow`), which come after training."""
    if not mv.run_id:
        return []
    results = run_gate_results(client, mv.run_id)
    for tag, directory, name in (
        (SHADOW_EVIDENCE_TAG, SHADOW_EVIDENCE_DIR, "shadow"),
        (CANARY_EVIDENCE_TAG, CANARY_EVIDENCE_DIR, "canary"),
    ):
        _, sep, rest = mv.tags.get(tag, "").partition(f"/{directory}/")
        if not sep:
            continue
        try:
            later = GateResult.from_dict(
                load_json_artifact(client, mv.run_id, f"{directory}/{rest}")
            )
        except (MlflowException, OSError, ValueError, KeyError):
            continue
        results = [r for r in results if r.name != name] + [later]
    return results


def report_gate_results(client: MlflowClient, name: str, run_id: str) -> list[GateResult]:
    """A training run's gates for its report: its registered version's, with the canary and
    shadow verdicts that came later; the run's own evidence when it registered none."""
    versions: list[ModelVersion] = []
    with contextlib.suppress(MlflowException):
        versions = list(client.search_model_versions(f"name='{name}' and run_id='{run_id}'"))
    if versions:
        return version_gate_results(client, versions[0])
    return run_gate_results(client, run_id)


def run_gate_results(client: MlflowClient, run_id: str) -> list[GateResult]:
    try:
        raw = load_json_artifact(client, run_id, EVIDENCE_ARTIFACT)
    except (MlflowException, OSError):
        return []
    return [GateResult.from_dict(d) for d in raw]


def latest_training_run(client: MlflowClient, registry: RegistryConfig) -> str:
    exp = client.get_experiment_by_name(registry.experiment)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} IS NULL",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp
        else []
    )
    if not runs:
        raise RegistryError(f"no training runs in experiment {registry.experiment!r} yet")
    return str(runs[0].info.run_id)


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


def notify(registry: RegistryConfig, title: str, body: str) -> bool:
    """Best effort: a notification that cannot be sent never undoes a registry move."""
    if not registry.notify_urls:
        return True
    import apprise

    ap = apprise.Apprise()
    for url in registry.notify_urls:
        ap.add(url)
    # Not retried (a retry may notify twice); apprise's own 4 s connect and read timeouts
    # bound it, and the notifications breaker skips it while the service keeps failing.
    from services import breakers

    def send() -> bool:
        if not ap.notify(title=title, body=body):
            raise RuntimeError("apprise could not send the notification")
        return True

    try:
        return breakers.call("notifications", send)
    except Exception:
        return False


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
                "outcome": tags.get(OUTCOME_TAG, "-"),
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


def describe_version(client: MlflowClient, ref: str) -> dict[str, Any]:
    """`NAME`, `NAME@ALIAS` or `NAME/VERSION` -> the version, its evidence and its moves."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = get_alias_version(client, name, alias)
        if mv is None:
            raise RegistryError(f"{name} has no alias @{alias}")
    else:
        name, _, version = ref.partition("/")
        try:
            mv = (
                client.get_model_version(name, version)
                if version
                else get_alias_version(client, name, CHAMPION_ALIAS)
            )
        except MlflowException:
            mv = None
        if mv is None:
            raise RegistryError(f"no version {version or '@' + CHAMPION_ALIAS} of model {name!r}")
    row = next(r for r in list_versions(client, name) if r["version"] == str(mv.version))
    moves = [
        h
        for h in alias_history(client, name)
        if str(mv.version) in (h.get("to_version"), h.get("from_version"))
    ]
    return {
        **row,
        "name": name,
        "holdout_hash": mv.tags.get("holdout_hash", ""),
        "onnx_sha256": mv.tags.get(SHA_TAG, ""),
        "source": mv.source,
        "evidence": f"{(mv.source or '').rsplit('/', 1)[0]}/{EVIDENCE_ARTIFACT}",
        "report": f"{(mv.source or '').rsplit('/', 1)[0]}/{REPORT_ARTIFACT}",
        "moves": moves,
    }
