"""The registry client and records: connecting to MLflow, training and monitoring runs, versions.

With `flows/alias_moves.py` (alias moves and their audit history, built on this module) and
`flows/model_versions.py` (the versions as people read them), this is the only code that
writes MLflow runs, versions and aliases.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import tenacity
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from checks.result import GateResult
from models.config import DatasetConfig, RegistryConfig

# The layout lives in models/registry_layout.py; flows/ reads these names as `registry.X`.
from models.registry_layout import AUDIT_EXPERIMENT as AUDIT_EXPERIMENT
from models.registry_layout import (
    CANARY_EVIDENCE_DIR,
    CANARY_EVIDENCE_TAG,
    EVIDENCE_ARTIFACT,
    EVIDENCE_GATES_TAG,
    EVIDENCE_REPORT_TAG,
    GATE_TAG_PREFIX,
    GPU_SHA_TAG,
    MADE_BY_TAG,
    MODEL_ARTIFACT_DIR,
    MONITOR_EXPERIMENT,
    OUTCOME_TAG,
    REPORT_ARTIFACT,
    SHA_TAG,
    SHADOW_EVIDENCE_DIR,
    SHADOW_EVIDENCE_TAG,
    STOPPED_AT_TAG,
)
from models.registry_layout import DATA_DOCS_ARTIFACT_DIR as DATA_DOCS_ARTIFACT_DIR
from models.registry_layout import DRIFT_ARTIFACT as DRIFT_ARTIFACT
from models.registry_layout import HISTOGRAMS_ARTIFACT as HISTOGRAMS_ARTIFACT
from models.registry_layout import KIND_TAG as KIND_TAG
from models.registry_layout import PROFILE_ARTIFACT as PROFILE_ARTIFACT
from models.registry_layout import SAMPLE_ARTIFACT as SAMPLE_ARTIFACT
from services import registry_access

if TYPE_CHECKING:
    from flows.monitoring import MonitoringEvidence
    from flows.training_evidence import TrainingEvidence
    from models.onnx_export import OnnxModel


class RegistryError(RuntimeError):
    pass


class RegistryUnavailableError(RegistryError, registry_access.RegistryUnavailableError):
    """The registry cannot be used now: locked, unreachable, or its database is missing.
    One line naming the registry and why; caught as either parent."""


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
