"""Fetching a registered ONNX model from the MLflow registry, verified before use.

The training flow registers each version with `source=<run artifacts>/model` (a directory
holding `model.onnx` and `schema.json`) and the sha256 tag (`models.registry_layout`).
Serving loads nothing else: no pickles, no MLflow flavours, no external data, and no bytes
whose hash does not match that tag.

A registry that cannot be reached (its SQLite file locked by a writer or gone, its tracking
server down) is retried for a bounded time and then named in one line
(`RegistryUnavailableError`, `services.registry_access`); reading never creates a SQLite
registry. The service keeps a
last-known-good copy of the model it serves (`save_last_known_good`): the bytes, the schema
and what the registry vouched for when it gave them (version, sha256 tag). While the
registry cannot be reached it serves that copy, verified again (`load_served_model`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from models.model_ref import ModelRef
from models.onnx_export import (
    ONNX_FILENAME,
    SCHEMA_FILENAME,
    ExternalDataError,
    check_no_external_data,
    sha256_bytes,
)
from models.registry_layout import GPU_SHA_TAG, SHA_TAG
from models.tree_graph import GPU_ONNX_FILENAME
from services import registry_access

if TYPE_CHECKING:
    from models.config import RegistryConfig
from services.registry_access import (
    open_registry_client,
    registry_label,
    retry_unavailable,
    sqlite_database,
)

# The record of a last-known-good copy: which model, what the registry vouched for, when.
LAST_KNOWN_GOOD_RECORD = "current.json"
# Beside the record: saves and reads of a slot take it in turn.
LAST_KNOWN_GOOD_LOCK = ".lock"
_SLOT_LOCK_TIMEOUT_S = 60.0


class ModelStoreError(RuntimeError):
    """A registered model that cannot be served; the message says which and why."""


class ModelNotFoundError(ModelStoreError, LookupError):
    """The registered model, alias or version does not exist."""


class ModelIntegrityError(ModelStoreError):
    """The artifacts of a version are not what its registration vouches for."""


class RegistryUnavailableError(ModelStoreError, registry_access.RegistryUnavailableError):
    """The registry could not be reached to fetch the model (and, for the service, no
    usable last-known-good copy was there); one line naming the registry and why."""


@dataclass(frozen=True)
class LastKnownGood:
    """Where a model served without the registry came from: the copy kept when the registry
    last gave it, when that was, and why the registry was not used this time."""

    path: Path
    fetched_at: str
    reason: str


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    alias: str | None
    sha256: str
    content: bytes = field(repr=False)
    schema: dict[str, Any]
    # Set when the registry could not be reached and the last-known-good copy is served.
    last_known_good: LastKnownGood | None = None
    # Tree ensembles: the GPU graph (`models.tree_graph`), verified against its own tag.
    # A last-known-good copy keeps only the CPU graph, which serves anywhere.
    gpu_content: bytes | None = field(default=None, repr=False)
    gpu_sha256: str | None = None

    @property
    def ref(self) -> str:
        """How a person names it: `churn@champion (v3)` or `churn/3`."""
        if self.alias:
            return f"{self.name}@{self.alias} (v{self.version})"
        return f"{self.name}/{self.version}"


def load_registered_model(
    tracking_uri: str,
    ref: ModelRef,
    *,
    cache_dir: Path | None = None,
    retry_s: float = 0.0,
    registry: RegistryConfig | None = None,
) -> LoadedModel:
    """Resolve `ref` (its alias or its version), download the ONNX artifacts and check them.

    With `cache_dir`, the artifacts are kept under `cache_dir/<name>/<version>/` and reused
    when their hash still matches the tag; without it they are read from a temporary
    directory that is removed before returning. A registry that cannot be reached is tried
    for `retry_s` seconds, then `RegistryUnavailableError`; so is a SQLite registry whose
    file does not exist, at once: reading never leaves an empty registry in its place.
    `registry` gives the HTTP timeout and retries of a tracking server (MLflow's own, 120 s
    and 7 retries, are minutes; `registry_access`'s defaults without it).
    """
    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_file():
        raise RegistryUnavailableError(
            f"registry database {database} does not exist (moved or deleted?); reading a "
            "model never creates one"
        )
    try:
        return retry_unavailable(
            lambda: _fetch_registered_model(tracking_uri, ref, cache_dir, registry),
            tracking_uri,
            retry_s,
        )
    except registry_access.RegistryUnavailableError as err:
        raise RegistryUnavailableError(str(err)) from None


def _fetch_registered_model(
    tracking_uri: str, ref: ModelRef, cache_dir: Path | None, registry: RegistryConfig | None
) -> LoadedModel:
    model_name, alias, version = ref.name, ref.alias, ref.version
    client = (
        open_registry_client(tracking_uri)
        if registry is None
        else open_registry_client(tracking_uri, registry.http_timeout_s, registry.http_max_retries)
    )
    registered = _get_registered_model(client, model_name, tracking_uri)
    if alias is not None:
        aliases: dict[str, str] = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
            raise ModelNotFoundError(
                f"registered model {model_name!r} has no alias @{alias} "
                f"(aliases: {known}; registry {tracking_uri})"
            )
        version = str(aliases[alias])
    assert version is not None
    mv = _get_model_version(client, model_name, version, tracking_uri)
    expected = (mv.tags or {}).get(SHA_TAG)
    if not expected:
        raise ModelIntegrityError(
            f"{model_name} version {version} carries no {SHA_TAG} tag, so its ONNX file "
            "cannot be verified; refusing to serve it"
        )

    if cache_dir is not None:
        target = Path(cache_dir) / model_name / str(version)
        content = _read_cached(target, expected)
        if content is None:
            content = _download(mv.source, tracking_uri, target)
        schema_text = (target / SCHEMA_FILENAME).read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="mlgate-model-") as tmp:
            target = Path(tmp) / "model"
            content = _download(mv.source, tracking_uri, target)
            schema_text = (target / SCHEMA_FILENAME).read_text()

    actual = sha256_bytes(content)
    if actual != expected.strip().lower():
        raise ModelIntegrityError(
            f"{model_name} version {version}: sha256 of {ONNX_FILENAME} is {actual}, but the "
            f"version's {SHA_TAG} tag says {expected}; the artifact was changed or "
            "replaced after registration, refusing to serve it"
        )
    _check_self_contained(content, f"{model_name} version {version}")
    gpu_expected = (mv.tags or {}).get(GPU_SHA_TAG)
    gpu_content, gpu_sha256 = None, None
    if gpu_expected:
        gpu_content = _read_gpu_graph(
            mv.source, tracking_uri, gpu_expected, f"{model_name} version {version}"
        )
        gpu_sha256 = gpu_expected.strip().lower()
    return LoadedModel(
        name=model_name,
        version=str(version),
        alias=alias,
        sha256=actual,
        content=content,
        schema=_parse_schema(schema_text, model_name, str(version)),
        gpu_content=gpu_content,
        gpu_sha256=gpu_sha256,
    )


def _read_gpu_graph(source: str, tracking_uri: str, expected: str, what: str) -> bytes:
    """The GPU graph a version's tag vouches for, checked as the CPU graph is."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="mlgate-gpu-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{GPU_ONNX_FILENAME}",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            content = Path(local).read_bytes()
        except (OSError, MlflowException) as err:
            raise ModelIntegrityError(
                f"{what}: its {GPU_SHA_TAG} tag vouches for {GPU_ONNX_FILENAME}, which cannot "
                f"be read: {err}"
            ) from None
    actual = sha256_bytes(content)
    if actual != expected.strip().lower():
        raise ModelIntegrityError(
            f"{what}: sha256 of {GPU_ONNX_FILENAME} is {actual}, but its {GPU_SHA_TAG} tag "
            f"says {expected}; refusing to serve it"
        )
    _check_self_contained(content, f"{what} ({GPU_ONNX_FILENAME})")
    return content


def _check_self_contained(content: bytes, what: str) -> None:
    try:
        check_no_external_data(content)
    except ExternalDataError as err:
        raise ModelIntegrityError(f"{what}: {err}; refusing to serve it") from None


def load_served_model(
    tracking_uri: str,
    ref: ModelRef,
    *,
    last_known_good_dir: Path,
    retry_s: float,
    registry: RegistryConfig | None = None,
) -> LoadedModel:
    """What the service serves: `ref` from the registry, tried for `retry_s` seconds; while
    the registry cannot be reached, the last-known-good copy of `ref` under
    `last_known_good_dir`, verified against what the registry vouched for when it gave it
    (`LoadedModel.last_known_good` says so). An answer from the registry (no such alias, a
    bad artifact) is never overridden by the copy."""
    try:
        return load_registered_model(tracking_uri, ref, retry_s=retry_s, registry=registry)
    except RegistryUnavailableError as err:
        return load_last_known_good(last_known_good_dir, ref, tracking_uri, reason=str(err))


def save_last_known_good(model: LoadedModel, directory: Path, tracking_uri: str) -> Path:
    """Keep `model`, just fetched from the registry and served, as the copy for an outage:
    `directory/<name>/<alias-A|version-V>/<sha256>/` holds `model.onnx` and `schema.json`,
    and the record beside them (`current.json`) names the copy with what the registry
    vouched for: version, sha256 tag, the schema's digest, the registry, when. The record
    is replaced in one rename, so a reader finds the old copy or the new one, never half of
    either; bytes already kept are not written again, the record is (the registry vouched
    for them once more). Workers (and services) sharing the directory save one at a time
    under the slot's file lock: two saving different versions at once (the alias moved
    between their fetches) each deleted the other's copy, leaving a record without one.
    Returns the record's path."""
    slot = _slot(directory, model.name, model.alias, model.version)
    schema_bytes = json.dumps(model.schema, indent=2).encode()
    record = {
        "model": model.name,
        "alias": model.alias,
        "version": model.version,
        "sha256": model.sha256,
        "schema_sha256": sha256_bytes(schema_bytes),
        "registry": registry_label(tracking_uri),
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    record_path = slot / LAST_KNOWN_GOOD_RECORD
    copy = slot / model.sha256
    slot.mkdir(parents=True, exist_ok=True)
    with _slot_lock(slot):
        if not _copy_intact(slot, record):
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=slot))
            try:
                (staging / ONNX_FILENAME).write_bytes(model.content)
                (staging / SCHEMA_FILENAME).write_bytes(schema_bytes)
                shutil.rmtree(copy, ignore_errors=True)
                staging.rename(copy)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        _write_atomically(record_path, json.dumps(record, indent=2).encode())
        for old in slot.iterdir():
            if old.is_dir() and old.name != model.sha256 and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    return record_path


def load_last_known_good(
    directory: Path, ref: ModelRef, tracking_uri: str, *, reason: str
) -> LoadedModel:
    """The last-known-good copy of `ref`, checked as the registry's own artifacts are: its
    bytes against the sha256 the registry's tag held when the copy was made, its schema
    against the digest recorded then, no external data, the same registry. `reason` (why
    the registry is not used) goes into the result and into every error."""
    slot = _slot(directory, ref.name, ref.alias, ref.version)
    record_path = slot / LAST_KNOWN_GOOD_RECORD
    if not record_path.exists():
        raise RegistryUnavailableError(
            f"{reason}; and there is no last-known-good copy of {ref} ({record_path} does "
            "not exist: this host never served it)"
        )
    # The record and the copy it names are read together, while no save replaces them.
    with _slot_lock(slot):
        return _read_kept(slot, record_path, ref, tracking_uri, reason)


def _read_kept(
    slot: Path, record_path: Path, ref: ModelRef, tracking_uri: str, reason: str
) -> LoadedModel:
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        raise RegistryUnavailableError(
            f"{reason}; and there is no last-known-good copy of {ref} ({record_path} does "
            "not exist: this host never served it)"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelIntegrityError(
            f"{reason}; and the last-known-good record {record_path} is unreadable: {err}"
        ) from None
    if not isinstance(record, dict) or any(
        not isinstance(record.get(k), str) for k in ("version", "sha256", "schema_sha256")
    ):
        raise ModelIntegrityError(
            f"{reason}; and the last-known-good record {record_path} lacks the version and "
            "digests the registry vouched for"
        )
    label = registry_label(tracking_uri)
    if record.get("registry") != label:
        raise ModelIntegrityError(
            f"{reason}; and the last-known-good copy of {ref} came from registry "
            f"{record.get('registry')}, not the configured {label}; refusing to serve it"
        )
    version = record["version"]
    what = f"last-known-good copy of {ref} (v{version}, {slot / record['sha256']})"
    if ref.version is not None and ref.version != version:
        raise ModelIntegrityError(f"{reason}; and the {what} is not version {ref.version}")
    try:
        content = (slot / record["sha256"] / ONNX_FILENAME).read_bytes()
        schema_bytes = (slot / record["sha256"] / SCHEMA_FILENAME).read_bytes()
    except OSError as err:
        raise ModelIntegrityError(f"{reason}; and the {what} is incomplete: {err}") from None
    actual = sha256_bytes(content)
    if actual != record["sha256"] or sha256_bytes(schema_bytes) != record["schema_sha256"]:
        raise ModelIntegrityError(
            f"{reason}; and the {what} does not match what the registry vouched for (sha256 "
            f"of {ONNX_FILENAME} {actual}, recorded {record['sha256']}, or its "
            f"{SCHEMA_FILENAME} changed); it was altered after it was kept, refusing to "
            "serve it"
        )
    _check_self_contained(content, what)
    return LoadedModel(
        name=ref.name,
        version=version,
        alias=ref.alias,
        sha256=actual,
        content=content,
        schema=_parse_schema(schema_bytes.decode("utf-8", "replace"), ref.name, version),
        last_known_good=LastKnownGood(
            path=slot / record["sha256"],
            fetched_at=str(record.get("fetched_at", "unknown")),
            reason=reason,
        ),
    )


def _slot(directory: Path, name: str, alias: str | None, version: str | None) -> Path:
    # An alias and a version are kept apart: `churn@champion` may later name another version.
    return Path(directory) / name / (f"alias-{alias}" if alias else f"version-{version}")


def _slot_lock(slot: Path) -> FileLock:
    return FileLock(str(slot / LAST_KNOWN_GOOD_LOCK), timeout=_SLOT_LOCK_TIMEOUT_S)


def _copy_intact(slot: Path, record: dict[str, Any]) -> bool:
    copy = slot / str(record.get("sha256"))
    try:
        content = (copy / ONNX_FILENAME).read_bytes()
        schema_bytes = (copy / SCHEMA_FILENAME).read_bytes()
    except OSError:
        return False
    return sha256_bytes(content) == record.get("sha256") and sha256_bytes(
        schema_bytes
    ) == record.get("schema_sha256")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _get_registered_model(client: Any, model_name: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(
                f"no registered model {model_name!r} in registry {tracking_uri}"
            ) from None
        raise


def _get_model_version(client: Any, model_name: str, version: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(
                f"registered model {model_name!r} has no version {version} "
                f"(registry {tracking_uri})"
            ) from None
        raise


def _read_cached(target: Path, expected_sha256: str) -> bytes | None:
    onnx_path = target / ONNX_FILENAME
    if not (onnx_path.is_file() and (target / SCHEMA_FILENAME).is_file()):
        return None
    content = onnx_path.read_bytes()
    return content if sha256_bytes(content) == expected_sha256.strip().lower() else None


def _download(source: str, tracking_uri: str, target: Path) -> bytes:
    import mlflow.artifacts

    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the target and move into place, so that a cache never holds a
    # half-written directory that a later start could take for a complete one.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri
            )
        )
        missing = [n for n in (ONNX_FILENAME, SCHEMA_FILENAME) if not (local / n).is_file()]
        if missing:
            raise ModelIntegrityError(
                f"artifacts at {source} lack {', '.join(missing)}; a registered version "
                f"must hold {ONNX_FILENAME} and {SCHEMA_FILENAME}"
            )
        local.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (target / ONNX_FILENAME).read_bytes()


def _parse_schema(text: str, model_name: str, version: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelIntegrityError(
            f"{model_name} version {version}: {SCHEMA_FILENAME} is not valid JSON: {err}"
        ) from None
    ok = isinstance(schema, dict) and all(
        isinstance(schema.get(k), list) and all(isinstance(c, str) for c in schema[k])
        for k in ("numeric", "categorical")
    )
    if not ok:
        raise ModelIntegrityError(
            f"{model_name} version {version}: {SCHEMA_FILENAME} must hold lists of column "
            f"names under 'numeric' and 'categorical', got {text[:200]!r}"
        )
    return dict(schema)
