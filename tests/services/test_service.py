"""The prediction service as clients and `mlgate serve` see it: a real `bentoml serve`
process answering real HTTP, and the registry checks it relies on."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from models.onnx_export import input_schema, make_session, predict_proba_onnx, sha256_file
from services.launcher import ServiceProcess, ServiceStartError, start_service
from services.model_store import (
    ModelIntegrityError,
    ModelNotFoundError,
    load_registered_model,
)
from tests.services.conftest import Registry, free_port

START_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("bentoml_home")
    with start_service(
        registry.config_path,
        alias="champion",
        version=None,
        port=free_port(),
        env={"BENTOML_HOME": str(home)},
    ) as proc:
        proc.wait_ready(timeout=START_TIMEOUT_S)
        yield proc


@pytest.fixture(scope="module")
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def request_rows(registry: Registry, n: int, start: int = 0) -> list[dict[str, Any]]:
    """Holdout rows as a client sends them: JSON numbers, strings and nulls."""
    frame = registry.holdout[list(registry.cfg.dataset.features)].iloc[start : start + n]
    rows: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    return rows


def in_process_scores(registry: Registry, rows: list[dict[str, Any]]) -> np.ndarray:
    session = make_session((registry.model_dir / "model.onnx").read_bytes(), prefer_gpu=False)
    return predict_proba_onnx(session, pd.DataFrame(rows), registry.cfg.dataset)


def assert_matches_in_process(
    registry: Registry, rows: list[dict[str, Any]], body: dict[str, Any]
) -> None:
    assert body["model_name"] == registry.model_name
    assert body["model_version"] == registry.champion_version
    scores = np.array([p["score"] for p in body["predictions"]])
    expected = in_process_scores(registry, rows)
    assert scores.shape == expected.shape
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == [int(s > 0.5) for s in scores]


def test_one_row_scores_as_onnx_runtime_in_process(
    registry: Registry, client: httpx.Client
) -> None:
    rows = request_rows(registry, 1)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["predictions"]) == 1
    assert_matches_in_process(registry, rows, resp.json())


def test_fifty_rows_with_nulls_score_as_onnx_runtime_in_process(
    registry: Registry, client: httpx.Client
) -> None:
    rows = request_rows(registry, 50, start=100)
    rows[0]["total_charges"] = None
    rows[1]["tenure"] = None
    rows[2]["contract"] = None
    rows[3]["payment_method"] = None
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert_matches_in_process(registry, rows, resp.json())


def test_request_larger_than_a_batch_keeps_row_order(
    registry: Registry, client: httpx.Client
) -> None:
    n = 2 * registry.cfg.serving.max_batch_size + 17
    assert n <= registry.cfg.serving.max_rows_per_request
    rows = request_rows(registry, n, start=500)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert_matches_in_process(registry, rows, resp.json())


def _batch_histogram(client: httpx.Client) -> tuple[float, float]:
    """(requests, batches) seen so far by the adaptive batcher of /score_rows."""
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(
        r'^bentoml_service_adaptive_batch_size_(sum|count)\{[^}]*method_name="score_rows"'
        r"[^}]*\} (\S+)$"
    )
    for line in client.get("/metrics").text.splitlines():
        if m := pattern.match(line):
            totals[m.group(1)] += float(m.group(2))
    return totals["sum"], totals["count"]


def test_concurrent_requests_are_scored_in_shared_batches(
    registry: Registry, server: ServiceProcess, client: httpx.Client
) -> None:
    n = 64
    rows = request_rows(registry, n, start=1000)
    requests_before, batches_before = _batch_histogram(client)

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as ac:
            return await asyncio.gather(*(ac.post("/predict", json={"rows": [r]}) for r in rows))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * n
    scores = np.array([r.json()["predictions"][0]["score"] for r in responses])
    np.testing.assert_allclose(scores, in_process_scores(registry, rows), rtol=0, atol=1e-6)

    requests_after, batches_after = _batch_histogram(client)
    assert requests_after - requests_before == n
    # Fewer batches than requests: at least one ONNX Runtime call scored several requests.
    assert batches_after - batches_before < n


@pytest.mark.parametrize(
    ("change", "field", "error_type"),
    [
        ({"tenure": "twelve"}, "tenure", "float_type"),
        ({"contract": 12}, "contract", "string_type"),
        ({"senior_citizen": True}, "senior_citizen", "float_type"),
        ({"favourite_colour": "teal"}, "favourite_colour", "extra_forbidden"),
        ({"payment_method": ...}, "payment_method", "missing"),
    ],
    ids=["string-for-number", "number-for-category", "bool-for-number", "extra", "missing"],
)
def test_bad_row_is_a_422_naming_the_field_and_the_service_still_answers(
    registry: Registry,
    client: httpx.Client,
    change: dict[str, Any],
    field: str,
    error_type: str,
) -> None:
    good, row = request_rows(registry, 2)
    for key, value in change.items():
        if value is ...:
            del row[key]
        else:
            row[key] = value
    resp = client.post("/predict", json={"rows": [good, row]})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert f"rows.1.{field}" in body["error"]
    assert {"loc": ["rows", 1, field], "type": error_type} in [
        {"loc": d["loc"], "type": d["type"]} for d in body["detail"]
    ]

    after = client.post("/predict", json={"rows": [good]})
    assert after.status_code == 200, after.text
    assert_matches_in_process(registry, [good], after.json())


def test_body_without_rows_or_with_extra_top_level_field_is_a_422(
    registry: Registry, client: httpx.Client
) -> None:
    rows = request_rows(registry, 1)
    for body, field in (({}, "rows"), ({"rows": rows, "threshold": 0.3}, "threshold")):
        resp = client.post("/predict", json=body)
        assert resp.status_code == 422, resp.text
        assert field in resp.json()["error"]
    assert client.post("/predict", json={"rows": []}).status_code == 422


def test_too_many_rows_is_a_413(registry: Registry, client: httpx.Client) -> None:
    limit = registry.cfg.serving.max_rows_per_request
    rows = request_rows(registry, 1) * (limit + 1)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 413, resp.text
    assert str(limit) in resp.json()["error"]

    padded = json.dumps({"rows": request_rows(registry, 1)}) + " " * (8 * 1024 * 1024)
    resp = client.post(
        "/predict", content=padded.encode(), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413, resp.text
    assert "bytes" in resp.json()["error"]


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    resp = client.post(
        "/predict", content=b'{"rows": [{"tenure": 1,', headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert "JSON" in resp.json()["error"]


def test_model_endpoint_names_the_verified_version(
    registry: Registry, client: httpx.Client
) -> None:
    resp = client.get("/model")
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert info["name"] == registry.model_name
    assert info["version"] == registry.champion_version
    assert info["alias"] == "champion"
    assert info["sha256"] == sha256_file(registry.model_dir / "model.onnx")
    assert "CPUExecutionProvider" in info["providers"]
    assert info["numeric_features"] == list(registry.cfg.dataset.numeric_features)


def test_openapi_documents_the_row_schema(registry: Registry, client: httpx.Client) -> None:
    resp = client.get("/docs.json")
    assert resp.status_code == 200, resp.text
    spec = resp.json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    row = body["schema"]["properties"]["rows"]["items"]
    assert set(row["required"]) == set(registry.cfg.dataset.features)
    assert row["additionalProperties"] is False
    assert "/model" in spec["paths"]


def test_unknown_alias_fails_start_up_fast_with_the_reason(
    registry: Registry, tmp_path: Path
) -> None:
    with (
        start_service(
            registry.config_path,
            alias="nope",
            version=None,
            port=free_port(),
            env={"BENTOML_HOME": str(tmp_path / "bentoml_home")},
        ) as proc,
        pytest.raises(ServiceStartError, match="no alias @nope"),
    ):
        proc.wait_ready(timeout=START_TIMEOUT_S)
    assert not proc.is_running()


# The registry checks, on model_store directly.


def _register_version(registry: Registry, tags: dict[str, str]) -> str:
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    mv = client.create_model_version(
        registry.model_name,
        source=f"{registry.artifact_uri}/model",
        run_id=registry.run_id,
        tags=tags,
    )
    return str(mv.version)


def test_champion_loads_verified(registry: Registry) -> None:
    model = load_registered_model(registry.tracking_uri, registry.model_name, alias="champion")
    onnx_path = registry.model_dir / "model.onnx"
    assert model.version == registry.champion_version
    assert model.alias == "champion"
    assert model.sha256 == sha256_file(onnx_path)
    assert model.content == onnx_path.read_bytes()
    assert model.schema == input_schema(registry.cfg.dataset)


def test_sha256_tag_that_does_not_match_the_file_is_refused(registry: Registry) -> None:
    wrong = "0" * 64
    version = _register_version(registry, {"onnx_sha256": wrong})
    with pytest.raises(ModelIntegrityError) as info:
        load_registered_model(registry.tracking_uri, registry.model_name, version=version)
    message = str(info.value)
    assert wrong in message
    assert sha256_file(registry.model_dir / "model.onnx") in message
    assert registry.model_name in message
    assert f"version {version}" in message


def test_version_without_sha256_tag_is_refused(registry: Registry) -> None:
    version = _register_version(registry, {})
    with pytest.raises(ModelIntegrityError, match="no onnx_sha256 tag"):
        load_registered_model(registry.tracking_uri, registry.model_name, version=version)


def test_unknown_alias_version_or_model_is_not_found(registry: Registry) -> None:
    uri, name = registry.tracking_uri, registry.model_name
    with pytest.raises(ModelNotFoundError, match=r"no alias @nope \(aliases: @champion"):
        load_registered_model(uri, name, alias="nope")
    with pytest.raises(ModelNotFoundError, match="has no version 999"):
        load_registered_model(uri, name, version="999")
    with pytest.raises(ModelNotFoundError, match="no registered model 'ghost'"):
        load_registered_model(uri, "ghost", alias="champion")
    with pytest.raises(ValueError, match="exactly one"):
        load_registered_model(uri, name, alias="champion", version="1")


def test_cache_is_reused_only_while_it_matches_the_tag(registry: Registry, tmp_path: Path) -> None:
    uri, name = registry.tracking_uri, registry.model_name
    first = load_registered_model(uri, name, alias="champion", cache_dir=tmp_path)
    cached = tmp_path / name / first.version / "model.onnx"
    assert cached.read_bytes() == first.content

    cached.write_bytes(b"tampered")
    again = load_registered_model(uri, name, alias="champion", cache_dir=tmp_path)
    assert again.sha256 == first.sha256
    assert cached.read_bytes() == first.content

    shutil.rmtree(tmp_path / name)
    by_version = load_registered_model(uri, name, version=first.version, cache_dir=tmp_path)
    assert (by_version.sha256, by_version.content) == (first.sha256, first.content)
