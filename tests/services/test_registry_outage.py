"""The service when the registry cannot be reached: a restart serves the last-known-good
copy of its model, says so on `/readyz`, `/model` and `/metrics`, and never creates an
empty registry in place of a missing one; the copy is verified as the registry's own
artifacts are. Also the external-data check at load.

This module has its own registry (a copy of the session's database, so the artifacts are
the session's) and its own servers: moving its database away disturbs no other test."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from models.config import MlgateConfig, load_config
from models.model_ref import ModelRef
from models.onnx_export import (
    ONNX_FILENAME,
    SCHEMA_FILENAME,
    make_session,
    predict_proba_onnx,
    sha256_bytes,
    sha256_file,
)
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG
from services.launcher import ServiceProcess, start_service
from services.metrics import LAST_KNOWN_GOOD_METRIC
from services.model_store import (
    LAST_KNOWN_GOOD_LOCK,
    LAST_KNOWN_GOOD_RECORD,
    LoadedModel,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelStoreError,
    RegistryUnavailableError,
    load_registered_model,
    load_served_model,
    save_last_known_good,
)
from tests.services.conftest import AUTH, Registry, copy_registry, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300.0
VARIANT = "green"


@dataclasses.dataclass(frozen=True)
class OwnRegistry:
    config_path: Path
    cfg: MlgateConfig
    database: Path
    tracking_uri: str
    last_known_good_dir: Path


@pytest.fixture(scope="module")
def own(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> OwnRegistry:
    root = tmp_path_factory.mktemp("outage")
    config_path = copy_registry(registry, root, registry_keys={"unavailable_retry_s": 1.0})
    cfg = load_config(config_path)
    return OwnRegistry(
        config_path=config_path,
        cfg=cfg,
        database=cfg.registry.store_dir / "mlflow.db",
        tracking_uri=cfg.registry.resolved_tracking_uri(),
        last_known_good_dir=cfg.registry.last_known_good_dir(),
    )


@pytest.fixture(scope="module")
def champion(registry: Registry, own: OwnRegistry) -> LoadedModel:
    return load_registered_model(
        own.tracking_uri, ModelRef(registry.model_name, alias=CHAMPION_ALIAS)
    )


@contextmanager
def serving(own: OwnRegistry, home: Path) -> Iterator[tuple[ServiceProcess, httpx.Client]]:
    with start_service(
        own.config_path,
        own.cfg.served_model(),
        port=free_port(),
        variant=VARIANT,
        env={"BENTOML_HOME": str(home)},
    ) as proc:
        proc.wait_ready(timeout=START_TIMEOUT_S)
        with httpx.Client(base_url=proc.url, timeout=30.0, headers=AUTH) as client:
            yield proc, client


def gauge_samples(client: httpx.Client, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
        if s.name == name
    ]


def assert_scores_as_in_process(
    registry: Registry, client: httpx.Client, version: str, start: int
) -> None:
    frame = registry.holdout[list(registry.cfg.dataset.features)].iloc[start : start + 5]
    rows: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"] == version
    session = make_session((registry.model_dir / ONNX_FILENAME).read_bytes(), prefer_gpu=False)
    expected = predict_proba_onnx(session, pd.DataFrame(rows), registry.cfg.dataset)
    scores = np.array([p["score"] for p in resp.json()["predictions"]])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)


def test_a_restart_with_the_registry_gone_serves_the_last_known_good_copy(
    registry: Registry, own: OwnRegistry, tmp_path: Path
) -> None:
    name, version = registry.model_name, registry.champion_version
    sha256 = sha256_file(registry.model_dir / ONNX_FILENAME)
    labels = {"model_name": name, "model_version": version, "variant": VARIANT}

    with serving(own, tmp_path / "home-1") as (_, client):
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "model": f"{name}@{CHAMPION_ALIAS} (v{version})",
            "source": "registry",
            "last_known_good": None,
        }
        info = client.get("/model").json()
        assert (info["source"], info["last_known_good"]) == ("registry", None)
        assert gauge_samples(client, LAST_KNOWN_GOOD_METRIC) == [(labels, 0.0)]
    record_path = (
        own.last_known_good_dir / name / f"alias-{CHAMPION_ALIAS}" / LAST_KNOWN_GOOD_RECORD
    )
    record = json.loads(record_path.read_text())
    assert (record["version"], record["sha256"]) == (version, sha256)
    assert record["registry"] == str(own.database)

    moved = own.database.with_name("mlflow.db.moved-away")
    own.database.rename(moved)
    try:
        with serving(own, tmp_path / "home-2") as (proc, client):
            ready = client.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["source"] == "last_known_good"
            reason = body["last_known_good"]["reason"]
            assert f"registry database {own.database} does not exist" in reason
            assert body["last_known_good"]["fetched_at"] == record["fetched_at"]

            info = client.get("/model").json()
            assert (info["version"], info["sha256"], info["alias"]) == (
                version,
                sha256,
                CHAMPION_ALIAS,
            )
            assert info["source"] == "last_known_good"
            assert info["last_known_good"] == body["last_known_good"]
            assert gauge_samples(client, LAST_KNOWN_GOOD_METRIC) == [(labels, 1.0)]
            assert_scores_as_in_process(registry, client, version, start=20)
            assert "serving the last-known-good copy" in proc.output_tail(200)
        # No empty registry was made where the configured one went missing.
        assert not own.database.exists()
    finally:
        moved.rename(own.database)


def test_a_locked_registry_is_retried_then_the_copy_is_served(
    registry: Registry, own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    save_last_known_good(champion, tmp_path, own.tracking_uri)
    holder = sqlite3.connect(own.database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        served = load_served_model(
            own.tracking_uri, own.cfg.served_model(), last_known_good_dir=tmp_path, retry_s=1.0
        )
    finally:
        holder.close()
    assert served.last_known_good is not None
    assert served.last_known_good.reason == (
        f"registry {own.database} is locked by another process (SQLite: database is locked) "
        "(tried for 1 s)"
    )
    assert (served.version, served.sha256, served.content) == (
        champion.version,
        champion.sha256,
        champion.content,
    )
    assert served.schema == champion.schema


def _gone(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"


def test_without_a_copy_the_reason_is_one_line_and_nothing_is_created(
    own: OwnRegistry, tmp_path: Path
) -> None:
    uri = _gone(tmp_path)
    with pytest.raises(RegistryUnavailableError) as info:
        load_served_model(uri, own.cfg.served_model(), last_known_good_dir=tmp_path, retry_s=0)
    # The CLI's handlers of model errors catch it as one (`ModelStoreError`).
    assert isinstance(info.value, ModelStoreError)
    message = str(info.value)
    assert "\n" not in message
    assert "does not exist" in message
    assert "no last-known-good copy of churn@champion" in message
    assert not (tmp_path / "gone").exists()


def test_a_copy_altered_after_it_was_kept_is_refused(
    own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    uri = _gone(tmp_path)
    record = save_last_known_good(champion, tmp_path / "lkg", uri)
    onnx_path = record.parent / champion.sha256 / ONNX_FILENAME
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\x00")
    ref = own.cfg.served_model()
    with pytest.raises(ModelIntegrityError, match="does not match what the registry vouched"):
        load_served_model(uri, ref, last_known_good_dir=tmp_path / "lkg", retry_s=0)

    save_last_known_good(champion, tmp_path / "lkg", uri)
    schema_path = record.parent / champion.sha256 / SCHEMA_FILENAME
    schema_path.write_text(schema_path.read_text().replace("tenure", "tenure_days"))
    with pytest.raises(ModelIntegrityError, match=r"schema\.json changed"):
        load_served_model(uri, ref, last_known_good_dir=tmp_path / "lkg", retry_s=0)


def test_a_copy_from_another_registry_is_refused(
    own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    save_last_known_good(champion, tmp_path, own.tracking_uri)
    with pytest.raises(ModelIntegrityError, match=re.escape(f"came from registry {own.database}")):
        load_served_model(
            _gone(tmp_path), own.cfg.served_model(), last_known_good_dir=tmp_path, retry_s=0
        )


def test_an_answer_from_the_registry_is_never_overridden_by_a_copy(
    own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    retired = dataclasses.replace(champion, alias="retired")
    save_last_known_good(retired, tmp_path, own.tracking_uri)
    with pytest.raises(ModelNotFoundError, match="no alias @retired"):
        load_served_model(
            own.tracking_uri,
            ModelRef(champion.name, alias="retired"),
            last_known_good_dir=tmp_path,
            retry_s=0,
        )


def test_keeping_the_same_copy_again_writes_only_its_record(
    own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    record = save_last_known_good(champion, tmp_path, own.tracking_uri)
    onnx_path = record.parent / champion.sha256 / ONNX_FILENAME
    before = onnx_path.stat().st_mtime_ns
    save_last_known_good(champion, tmp_path, own.tracking_uri)
    assert onnx_path.stat().st_mtime_ns == before
    # A new version replaces the old copy; only the record's copy is kept.
    newer = dataclasses.replace(champion, version="99", content=champion.content + b" ")
    newer = dataclasses.replace(newer, sha256=sha256_bytes(newer.content))
    save_last_known_good(newer, tmp_path, own.tracking_uri)
    assert sorted(p.name for p in record.parent.iterdir()) == sorted(
        [LAST_KNOWN_GOOD_LOCK, LAST_KNOWN_GOOD_RECORD, newer.sha256]
    )
    assert json.loads(record.read_text())["version"] == "99"


def _external_data_content() -> bytes:
    weights = numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "intercept")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    entry = weights.external_data.add()
    entry.key, entry.value = "location", "intercept.bin"
    graph = helper.make_graph(
        [helper.make_node("Add", ["tenure", "intercept"], ["probabilities"])],
        "outside",
        [helper.make_tensor_value_info("tenure", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1])],
        initializer=[weights],
    )
    return helper.make_model(graph).SerializeToString()


def test_a_registered_version_with_external_data_is_refused_at_load(
    registry: Registry, own: OwnRegistry
) -> None:
    """Registered around the registration check (straight through MLflow), with a sha256
    tag that matches: the load still refuses it, naming the tensor. In this module's own
    copy of the registry: the session's registry keeps its versions for the other modules."""
    content = _external_data_content()
    client = MlflowClient(tracking_uri=own.tracking_uri, registry_uri=own.tracking_uri)
    experiment = client.get_experiment_by_name(registry.cfg.registry.experiment)
    assert experiment is not None
    run = client.create_run(experiment.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ONNX_FILENAME).write_bytes(content)
        (Path(tmp) / SCHEMA_FILENAME).write_text((registry.model_dir / SCHEMA_FILENAME).read_text())
        client.log_artifacts(run.info.run_id, tmp, MODEL_ARTIFACT_DIR)
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(
        registry.model_name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=run.info.run_id,
        tags={SHA_TAG: sha256_bytes(content)},
    )
    with pytest.raises(ModelIntegrityError) as info:
        load_registered_model(
            own.tracking_uri, ModelRef(registry.model_name, version=str(mv.version))
        )
    message = str(info.value)
    assert f"version {mv.version}" in message
    assert "tensor 'intercept'" in message
    assert "'intercept.bin'" in message


def test_a_kept_copy_with_external_data_is_refused(
    own: OwnRegistry, champion: LoadedModel, tmp_path: Path
) -> None:
    content = _external_data_content()
    outside = dataclasses.replace(champion, content=content, sha256=sha256_bytes(content))
    uri = _gone(tmp_path)
    save_last_known_good(outside, tmp_path, uri)
    with pytest.raises(ModelIntegrityError, match="tensor 'intercept'"):
        load_served_model(uri, own.cfg.served_model(), last_known_good_dir=tmp_path, retry_s=0)
