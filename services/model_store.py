"""Fetching a registered ONNX model from the MLflow registry, verified before use.

The training flow registers each version with `source=<run artifacts>/model` (a directory
holding `model.onnx` and `schema.json`) and the sha256 tag (`models.registry_layout`).
Serving loads nothing else: no pickles, no MLflow flavours, and no bytes whose hash does not
match that tag.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.model_ref import ModelRef
from models.onnx_export import ONNX_FILENAME, SCHEMA_FILENAME, sha256_bytes
from models.registry_layout import SHA_TAG


class ModelStoreError(RuntimeError):
    """A registered model that cannot be served; the message says which and why."""


class ModelNotFoundError(ModelStoreError, LookupError):
    """The registered model, alias or version does not exist."""


class ModelIntegrityError(ModelStoreError):
    """The artifacts of a version are not what its registration vouches for."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    alias: str | None
    sha256: str
    content: bytes = field(repr=False)
    schema: dict[str, Any]

    @property
    def ref(self) -> str:
        """How a person names it: `churn@champion (v3)` or `churn/3`."""
        if self.alias:
            return f"{self.name}@{self.alias} (v{self.version})"
        return f"{self.name}/{self.version}"


def load_registered_model(
    tracking_uri: str, ref: ModelRef, *, cache_dir: Path | None = None
) -> LoadedModel:
    """Resolve `ref` (its alias or its version), download the ONNX artifacts and check them.

    With `cache_dir`, the artifacts are kept under `cache_dir/<name>/<version>/` and reused
    when their hash still matches the tag; without it they are read from a temporary
    directory that is removed before returning.
    """
    from mlflow import MlflowClient

    model_name, alias, version = ref.name, ref.alias, ref.version
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
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
    return LoadedModel(
        name=model_name,
        version=str(version),
        alias=alias,
        sha256=actual,
        content=content,
        schema=_parse_schema(schema_text, model_name, str(version)),
    )


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
