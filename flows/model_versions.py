"""The registry's versions as people read them: aliases, evidence and moves (`mlgate models`)."""

from __future__ import annotations

import time
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.alias_moves import alias_history
from flows.registry import RegistryError, gate_tags, get_alias_version
from models.registry_layout import (
    CHAMPION_ALIAS,
    EVIDENCE_ARTIFACT,
    OUTCOME_TAG,
    REPORT_ARTIFACT,
    SHA_TAG,
)


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
