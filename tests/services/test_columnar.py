"""Columnar bodies on `/predict` against a real `bentoml serve` process: an Arrow IPC stream
and `{"columns": ...}` JSON score exactly as the same rows sent as JSON rows, the answer is
an Arrow stream when asked, and bad columns get the row path's refusals, naming the column
(and the row for a value)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest

from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS
from services.launcher import start_service
from services.schema import ARROW_STREAM, COLUMNS_JSON
from tests.services.conftest import AUTH, Registry, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def client(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("bentoml_home_columnar")
    with start_service(
        registry.config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        variant="blue",
        env={"BENTOML_HOME": str(home)},
    ) as proc:
        proc.wait_ready(timeout=START_TIMEOUT_S)
        with httpx.Client(base_url=proc.url, timeout=60.0, headers=AUTH) as c:
            yield c


def holdout_rows(registry: Registry, n: int) -> list[dict[str, Any]]:
    frame = registry.holdout[list(registry.cfg.dataset.features)].iloc[:n]
    rows: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    return rows


def with_nulls(registry: Registry, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every feature null in some rows, so both null paths are compared too."""
    out = [dict(r) for r in rows]
    for i, name in enumerate(registry.cfg.dataset.features):
        for row in out[i::37]:
            row[name] = None
    return out


def columns_of(registry: Registry, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in rows] for name in registry.cfg.dataset.features}


def arrow_stream(registry: Registry, rows: list[dict[str, Any]], batches: int = 1) -> bytes:
    ds = registry.cfg.dataset
    types = {
        **dict.fromkeys(ds.numeric_features, pa.float64()),
        **dict.fromkeys(ds.categorical_features, pa.string()),
    }
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns_of(registry, rows).items()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for chunk in table.to_batches(max_chunksize=-(-len(rows) // batches)):
            writer.write_batch(chunk)
    return bytes(sink.getvalue().to_pybytes())


def arrow_table(registry: Registry, columns: dict[str, pa.Array]) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def scores(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([p["score"] for p in resp.json()["predictions"]])


def test_columnar_bodies_score_exactly_as_json_rows(
    registry: Registry, client: httpx.Client
) -> None:
    rows = with_nulls(registry, holdout_rows(registry, 1000))
    as_rows = scores(client.post("/predict", json={"rows": rows}))
    as_columns = scores(
        client.post(
            "/predict",
            content=json.dumps({"columns": columns_of(registry, rows)}),
            headers={"Content-Type": COLUMNS_JSON},
        )
    )
    as_arrow = scores(
        client.post(
            "/predict",
            content=arrow_stream(registry, rows, batches=3),
            headers={"Content-Type": ARROW_STREAM},
        )
    )
    assert as_rows.shape == (1000,)
    np.testing.assert_array_equal(as_columns, as_rows)
    np.testing.assert_array_equal(as_arrow, as_rows)


def test_arrow_answer_when_accept_asks_for_it(registry: Registry, client: httpx.Client) -> None:
    rows = holdout_rows(registry, 20)
    expected = scores(client.post("/predict", json={"rows": rows}))
    resp = client.post(
        "/predict",
        content=arrow_stream(registry, rows),
        headers={"Content-Type": ARROW_STREAM, "Accept": f"{ARROW_STREAM}, application/json;q=0.5"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == ARROW_STREAM
    table = pa.ipc.open_stream(resp.content).read_all()
    np.testing.assert_array_equal(table.column("score").to_numpy(), expected)
    assert table.column("label").to_pylist() == [int(s > 0.5) for s in expected]
    assert table.schema.metadata[b"model_version"] == registry.champion_version.encode()
    # JSON rows in, Arrow out too; and `*/*` stays JSON.
    resp = client.post("/predict", json={"rows": rows}, headers={"Accept": ARROW_STREAM})
    assert resp.headers["content-type"] == ARROW_STREAM
    resp = client.post("/predict", json={"rows": rows}, headers={"Accept": "*/*"})
    assert resp.headers["content-type"] == "application/json"


def post_columns(client: httpx.Client, columns: dict[str, Any]) -> httpx.Response:
    return client.post(
        "/predict", content=json.dumps({"columns": columns}), headers={"Content-Type": COLUMNS_JSON}
    )


def post_arrow(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/predict", content=body, headers={"Content-Type": ARROW_STREAM})


def test_bad_columnar_json_is_refused_naming_the_column(
    registry: Registry, client: httpx.Client
) -> None:
    ds = registry.cfg.dataset
    num, cat = ds.numeric_features[0], ds.categorical_features[0]
    good = columns_of(registry, holdout_rows(registry, 5))

    missing = {k: v for k, v in good.items() if k != num}
    resp = post_columns(client, missing)
    assert resp.status_code == 422 and num in resp.json()["error"], resp.text

    resp = post_columns(client, {**good, "surprise": [1] * 5})
    assert resp.status_code == 422 and "surprise" in resp.json()["error"], resp.text

    resp = post_columns(client, {**good, num: [1.0, 2.0, "3", 4.0, 5.0]})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["columns", num, 2]

    resp = post_columns(client, {**good, cat: ["a", "b", 7, "c", "d"]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["columns", cat, 2]

    resp = post_columns(client, {**good, num: [1.0, 2.0]})
    assert resp.status_code == 422 and num in resp.json()["error"], resp.text

    resp = post_columns(client, {k: [] for k in good})
    assert resp.status_code == 422, resp.text

    limit = registry.cfg.serving.max_rows_per_request
    many = holdout_rows(registry, 1) * (limit + 1)
    resp = post_columns(client, columns_of(registry, many))
    assert resp.status_code == 413 and f"at most {limit}" in resp.json()["error"], resp.text

    resp = client.post("/predict", content=b'{"columns": {', headers={"Content-Type": COLUMNS_JSON})
    assert resp.status_code == 400, resp.text


def test_bad_arrow_is_refused_naming_the_column(registry: Registry, client: httpx.Client) -> None:
    ds = registry.cfg.dataset
    num, cat = ds.numeric_features[0], ds.categorical_features[0]
    good = {k: pa.array(v) for k, v in columns_of(registry, holdout_rows(registry, 5)).items()}

    resp = post_arrow(client, arrow_table(registry, {k: v for k, v in good.items() if k != cat}))
    assert resp.status_code == 422 and cat in resp.json()["error"], resp.text

    resp = post_arrow(client, arrow_table(registry, {**good, "surprise": pa.array([1] * 5)}))
    assert resp.status_code == 422 and "surprise" in resp.json()["error"], resp.text

    as_text = pa.array(["1", "2", "3", "4", "5"])
    resp = post_arrow(client, arrow_table(registry, {**good, num: as_text}))
    assert resp.status_code == 422, resp.text
    assert num in resp.json()["error"] and "string" in resp.json()["error"]

    resp = post_arrow(client, arrow_table(registry, {**good, cat: pa.array([1, 2, 3, 4, 5])}))
    assert resp.status_code == 422 and cat in resp.json()["error"], resp.text

    for bad in (float("nan"), float("inf"), 1e39):
        values = pa.array([1.0, 2.0, 3.0, bad, 5.0])
        resp = post_arrow(client, arrow_table(registry, {**good, num: values}))
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["columns", num, 3]

    long = "x" * (registry.cfg.serving.max_category_chars + 1)
    labels = pa.array(["a", long, "b", "c", "d"])
    resp = post_arrow(client, arrow_table(registry, {**good, cat: labels}))
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["columns", cat, 1]

    resp = post_arrow(client, b"not an arrow stream")
    assert resp.status_code == 400 and "Arrow IPC stream" in resp.json()["error"], resp.text

    resp = client.post("/predict", content=b"a,b\n", headers={"Content-Type": "text/csv"})
    assert resp.status_code == 415 and ARROW_STREAM in resp.json()["error"], resp.text

    # After every refusal the service still scores.
    rows = holdout_rows(registry, 3)
    assert scores(post_arrow(client, arrow_stream(registry, rows))).shape == (3,)
