"""A shadow deployment end to end on real components: a retrained version registered in a
real MLflow store, a real service serving @champion that picks the shadow up from the
registry, replayed holdout traffic, labels fed back, and the verdict recorded as
`gate.shadow`, which `registry.required_gates` can then require."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from checks.result import GateStatus
from flows import alias_moves
from flows.cli import app
from flows.shadow import shadow_report, shadow_state, start_shadow, stop_shadow
from models.config import TrainConfig, env_override_name, load_config
from models.data import encode_target
from models.model_ref import ModelRef
from models.onnx_export import (
    export_onnx,
    make_session,
    predict_proba_onnx,
    sha256_file,
    write_model_dir,
)
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG, SHADOW_VARIANT
from models.train import train_model
from services.inference_log import read_inference_log
from services.launcher import ServiceProcess, start_service
from services.model_store import load_registered_model
from tests.services.conftest import AUTH, Registry, free_port

pytestmark = pytest.mark.integration

REQUESTS = 240


@pytest.fixture(scope="module")
def shadow_version(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A retrained model (gradient boosting instead of the champion's logistic regression),
    registered as the training flow would."""
    from models.data import load_dataset, split_data

    cfg = registry.cfg
    train_cfg = TrainConfig(
        estimator="gradient_boosting", params={"n_estimators": 40, "max_depth": 3}
    )
    split = split_data(load_dataset(cfg.dataset), cfg.dataset, train_cfg)
    trained = train_model(split.train, cfg.dataset, train_cfg)
    model_dir = write_model_dir(
        export_onnx(trained.pipeline, cfg.dataset),
        cfg.dataset,
        tmp_path_factory.mktemp("shadow") / "model",
    )
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    assert experiment is not None
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT_DIR)
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(
        registry.model_name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=run.info.run_id,
        tags={SHA_TAG: sha256_file(model_dir / "model.onnx")},
    )
    return str(mv.version)


@pytest.fixture(scope="module")
def client(registry: Registry) -> Iterator[MlflowClient]:
    c = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    yield c
    stop_shadow(c, registry.model_name)


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    env = {
        env_override_name("serving", "shadow_poll_s"): "0.5",
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
    }
    with start_service(
        registry.config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        env=env,
    ) as proc:
        proc.wait_ready(timeout=300.0)
        yield proc


def wait_model_shadow(server: ServiceProcess, want: str | None) -> dict | None:
    deadline = time.monotonic() + 30
    while True:
        shadow = httpx.get(f"{server.url}/model", timeout=10.0).json()["shadow"]
        if (shadow or {}).get("version") == want or (want is None and shadow is None):
            return shadow
        assert time.monotonic() < deadline, f"/model still shows shadow {shadow}, not {want}"
        time.sleep(0.2)


def test_shadow_scores_beside_the_champion_and_reaches_a_verdict_on_live_labels(
    registry: Registry,
    shadow_version: str,
    client: MlflowClient,
    server: ServiceProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = registry.model_name
    refused = CliRunner().invoke(
        app, ["shadow", "start", registry.champion_version, "--config", str(registry.config_path)]
    )
    assert refused.exit_code == 1 and "already holds @champion" in refused.output

    state = start_shadow(client, name, shadow_version)
    assert (state.version, state.champion_version) == (shadow_version, registry.champion_version)
    wait_model_shadow(server, shadow_version)

    rows = registry.holdout.head(REQUESTS)
    features = rows[list(registry.cfg.dataset.features)]
    records = [
        {k: (None if v != v else v) for k, v in r.items()} for r in features.to_dict("records")
    ]
    answered = {}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10.0) as http:
        for i, record in enumerate(records):
            request_id = f"replay-{i}"
            response = http.post(
                "/predict", json={"rows": [record]}, headers={"X-Request-Id": request_id}
            )
            assert response.status_code == 200
            answered[request_id] = response.json()["predictions"][0]["score"]
    stats = wait_until_scored(server, REQUESTS)
    assert stats["dropped_rows"] == 0 and stats["failed_rows"] == 0
    # The same counts in Prometheus' exposition (a scrape flushes them first).
    shadow_counts = {
        (s.labels["shadow_version"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(
            httpx.get(f"{server.url}/metrics", timeout=10.0).text
        )
        for s in family.samples
        if s.name == "mlgate_shadow_rows_total"
    }
    assert shadow_counts == {(shadow_version, "scored"): float(stats["scored_rows"])}

    # The inference log holds both sides of every request, same id, same row.
    log = wait_for_log(registry, state.since, 2 * REQUESTS)
    shadow_rows = log[log["variant"] == SHADOW_VARIANT]
    assert set(shadow_rows["model_version"]) == {shadow_version}
    assert set(shadow_rows["request_id"]) == set(answered)
    # The shadow's scores are its model's own for those rows (ONNX Runtime in process).
    shadow_model = load_registered_model(
        registry.tracking_uri, ModelRef(name, version=shadow_version)
    )
    expected = predict_proba_onnx(
        make_session(shadow_model.content), features, registry.cfg.dataset
    )
    logged = shadow_rows.set_index("request_id")["score"]
    got = np.array([logged[f"replay-{i}"] for i in range(REQUESTS)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    champion_rows = log[log["variant"] != SHADOW_VARIANT].set_index("request_id")["score"]
    assert all(abs(champion_rows[k] - v) < 1e-9 for k, v in answered.items())

    # Labels come back later, for every replayed row, by request id.
    labels = pd.DataFrame(
        {
            "request_id": list(answered),
            registry.cfg.dataset.target: rows[registry.cfg.dataset.target].to_numpy(),
        }
    )
    labels_path = tmp_path / "labels.csv"
    labels.to_csv(labels_path, index=False)
    monkeypatch.setenv(env_override_name("gates", "shadow", "min_pairs"), "200")
    monkeypatch.setenv(env_override_name("gates", "shadow", "min_labelled"), "200")
    cfg = load_config(registry.config_path)

    # Without labels: never a pass.
    waiting = shadow_report(cfg, client, record=False)
    assert waiting.status is GateStatus.INCONCLUSIVE and "waiting for labels" in str(waiting.checks)
    assert waiting.metrics["pairs"] == REQUESTS

    result = shadow_report(cfg, client, labels_path=labels_path)
    assert result.status in (GateStatus.PASS, GateStatus.FAIL), result.reason
    assert result.metrics["labelled_pairs"] == REQUESTS
    # The pairs are the champion's answers and the shadow's own scores for the same rows.
    y = encode_target(rows, registry.cfg.dataset)
    assert 0.0 <= result.metrics["agreement"] <= 1.0
    assert np.isfinite(result.metrics["ci_low"]) and np.isfinite(result.metrics["delta"])
    assert len(y) == REQUESTS

    mv = client.get_model_version(name, shadow_version)
    assert mv.tags["gate.shadow"] == result.status.value
    assert float(mv.tags["shadow.pairs"]) == REQUESTS
    if result.status is GateStatus.PASS:
        assert alias_moves.missing_evidence(mv, ("shadow",)) == {}
    else:
        assert alias_moves.missing_evidence(mv, ("shadow",)) == {"shadow": "fail"}

    # Its table in `mlgate gates show`, after the version's other evidence.
    gates = CliRunner().invoke(
        app,
        ["gates", "show", name, shadow_version, "--json", "--config", str(registry.config_path)],
    )
    assert gates.exit_code == 0, gates.output
    assert [g["name"] for g in json.loads(gates.stdout)][-1:] == ["shadow"]

    shown = CliRunner().invoke(
        app, ["shadow", "status", "--json", "--config", str(registry.config_path)]
    )
    assert shown.exit_code == 0, shown.output
    assert f'"pairs": {REQUESTS}' in shown.output

    assert stop_shadow(client, name) == shadow_version
    assert shadow_state(client, name).version is None
    wait_model_shadow(server, None)


def wait_until_scored(server: ServiceProcess, rows: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        shadow = httpx.get(f"{server.url}/model", timeout=10.0).json()["shadow"]
        if shadow and shadow["scored_rows"] >= rows:
            return shadow
        assert time.monotonic() < deadline, shadow
        time.sleep(0.2)


def wait_for_log(registry: Registry, since, rows: int) -> pd.DataFrame:
    from datetime import UTC, datetime, timedelta

    deadline = time.monotonic() + 30
    location = registry.cfg.inference_log_location()
    while True:
        log = read_inference_log(
            location, registry.model_name, since, datetime.now(UTC) + timedelta(minutes=1)
        )
        if len(log) >= rows:
            return log
        assert time.monotonic() < deadline, len(log)
        time.sleep(0.3)
