"""Shadow deployments through the registry: which version shadows the champion, and the
verdict on its live pairs recorded as evidence (`gate.shadow`).

`start_shadow` names the version in the registered model's `mlgate.shadow` tag (after
checking it exists, carries its sha256 and is not the champion); every serving worker of the
model reads the tag (services/shadow.py) and starts scoring each request with it too, so
the shadow reaches the instances on every host that serve the model, within
`serving.shadow_poll_s`. `stop_shadow` removes the tag. `shadow_report` pairs the inference
log's rows since the shadow started, joins labels fed back for some of them, judges them
(checks/shadow.py) and records the verdict on the shadow version: the `gate.shadow` tag that
`registry.required_gates` can require before a promotion or a canary, `shadow.*` numbers,
and the whole result as a JSON artifact of the version's run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from checks.result import GateResult
from checks.shadow import attach_labels, judge_shadow, pair_rows
from flows import registry
from models.config import MlgateConfig
from models.registry_layout import (
    CHAMPION_ALIAS,
    SHA_TAG,
    SHADOW_EVIDENCE_DIR,
    SHADOW_EVIDENCE_TAG,
    SHADOW_GATE_TAG,
    SHADOW_SINCE_TAG,
    SHADOW_TAG,
    SHADOW_TAG_PREFIX,
)
from services.inference_log import read_inference_log


@dataclass(frozen=True)
class ShadowState:
    version: str | None
    since: datetime | None
    champion_version: str | None


def shadow_state(client: MlflowClient, name: str) -> ShadowState:
    tags = client.get_registered_model(name).tags
    champion = registry.get_alias_version(client, name, CHAMPION_ALIAS)
    since = tags.get(SHADOW_SINCE_TAG)
    return ShadowState(
        version=tags.get(SHADOW_TAG) or None,
        since=datetime.fromisoformat(since) if since else None,
        champion_version=str(champion.version) if champion else None,
    )


def start_shadow(client: MlflowClient, name: str, version: str) -> ShadowState:
    """Name `version` as the shadow; RegistryError when it cannot shadow."""
    try:
        mv = client.get_model_version(name, version)
    except Exception:
        raise registry.RegistryError(f"model {name!r} has no version {version}") from None
    if not mv.tags.get(SHA_TAG):
        raise registry.RegistryError(
            f"{name} v{version} has no {SHA_TAG} tag: serving would refuse it"
        )
    champion = registry.get_alias_version(client, name, CHAMPION_ALIAS)
    if champion is None:
        raise registry.RegistryError(f"{name} has no @champion for v{version} to shadow")
    if str(champion.version) == str(version):
        raise registry.RegistryError(f"v{version} already holds @champion")
    since = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_registered_model_tag(name, SHADOW_SINCE_TAG, since)
    client.set_registered_model_tag(name, SHADOW_TAG, str(version))
    return shadow_state(client, name)


def stop_shadow(client: MlflowClient, name: str) -> str | None:
    """Remove the shadow; the version that shadowed, or None when none did."""
    state = shadow_state(client, name)
    if state.version is not None:
        client.delete_registered_model_tag(name, SHADOW_TAG)
    return state.version


def shadow_report(
    cfg: MlgateConfig,
    client: MlflowClient,
    *,
    labels_path: Path | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    record: bool = True,
) -> GateResult:
    """The verdict on the pairs logged since the shadow started (or `since`), with the
    labels in `labels_path` (CSV or Parquet: request_id, optional row, the target column);
    recorded on the shadow version unless `record` is False."""
    name = cfg.registry.model_name
    state = shadow_state(client, name)
    if state.version is None:
        raise registry.RegistryError(f"no version shadows {name}: `mlgate shadow start VERSION`")
    if state.champion_version is None:
        raise registry.RegistryError(f"{name} has no @champion")
    start = since or state.since or datetime.now(UTC)
    end = until or datetime.now(UTC)
    log = read_inference_log(cfg.inference_log_location(), name, start, end)
    pairs = pair_rows(log, state.champion_version, state.version)
    labelled = None
    if labels_path is not None:
        labels = read_labels(labels_path)
        labelled = attach_labels(pairs, labels, cfg.dataset.target)
        labelled["y"] = encode_labels(labelled["y"], cfg)
    result = judge_shadow(
        pairs,
        labelled,
        cfg.gates.shadow,
        cfg.gates.champion,
        champion_version=state.champion_version,
        shadow_version=state.version,
    )
    result.evidence["window"] = {"since": start.isoformat(), "until": end.isoformat()}
    if record:
        record_verdict(client, name, state.version, result)
    return result


def read_labels(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ValueError(f"labels file {path} does not exist")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype={"request_id": str})


def encode_labels(values: pd.Series, cfg: MlgateConfig) -> pd.Series:
    """0/1 from the target's values, with the dataset's positive label."""
    from models.data import encode_target

    frame = pd.DataFrame({cfg.dataset.target: values.to_numpy()})
    return pd.Series(encode_target(frame, cfg.dataset), index=values.index)


def record_verdict(client: MlflowClient, name: str, version: str, result: GateResult) -> None:
    """`gate.shadow`, `shadow.<number>` tags and the JSON evidence on the version's run."""
    import math

    client.set_model_version_tag(name, version, SHADOW_GATE_TAG, result.status.value)
    for key, value in result.metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        client.set_model_version_tag(name, version, f"{SHADOW_TAG_PREFIX}{key}", f"{value:.6g}")
    mv = client.get_model_version(name, version)
    if mv.run_id:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = f"{SHADOW_EVIDENCE_DIR}/v{version}-{stamp}-{result.status.value}.json"
        registry.log_json_artifact(client, mv.run_id, path, result.to_dict())
        run = client.get_run(mv.run_id)
        client.set_model_version_tag(
            name, version, SHADOW_EVIDENCE_TAG, f"{run.info.artifact_uri}/{path}"
        )
