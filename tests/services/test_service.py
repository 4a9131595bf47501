"""The prediction service as clients and `mlgate serve` see it: a real `bentoml serve`
process answering real HTTP, and the registry checks it relies on.

Every refusal is checked for its status, a message naming the problem, not reaching the
model, and the service answering good requests afterwards. The load test and the shutdown
test are bounded in requests and seconds."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from models.model_ref import ModelRef
from models.onnx_export import input_schema, make_session, predict_proba_onnx, sha256_file
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG
from services.inference_log import read_inference_log
from services.launcher import ServiceProcess, ServiceStartError, start_service
from services.model_store import (
    ModelIntegrityError,
    ModelNotFoundError,
    load_registered_model,
)
from tests.services.conftest import (
    AUTH,
    ENV_KEYS,
    ENV_TOKEN,
    LIMITED_TOKEN,
    REVOKED_TOKEN,
    Registry,
    free_port,
)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300.0
VARIANT = "blue"


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("bentoml_home")
    with start_service(
        registry.config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        variant=VARIANT,
        env={"BENTOML_HOME": str(home), "MLGATE_API_KEYS": ENV_KEYS},
    ) as proc:
        proc.wait_ready(timeout=START_TIMEOUT_S)
        yield proc


@pytest.fixture(scope="module")
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0, headers=AUTH) as c:
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


def metric(client: httpx.Client, sample: str, **labels: str) -> float:
    """A sample of /metrics summed over the label sets that contain `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def batches(client: httpx.Client) -> float:
    return metric(client, "mlgate_batch_rows_count")


def assert_still_serving(registry: Registry, client: httpx.Client) -> None:
    rows = request_rows(registry, 1, start=7)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert_matches_in_process(registry, rows, resp.json())


def test_one_row_scores_as_onnx_runtime_in_process(
    registry: Registry, client: httpx.Client
) -> None:
    rows = request_rows(registry, 1)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-request-id"]
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


def test_concurrent_requests_are_scored_in_shared_batches(
    registry: Registry, server: ServiceProcess, client: httpx.Client
) -> None:
    n = 64
    rows = request_rows(registry, n, start=1000)
    before = batches(client)

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60.0, limits=limits, headers=AUTH
        ) as ac:
            return await asyncio.gather(*(ac.post("/predict", json={"rows": [r]}) for r in rows))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * n
    scores = np.array([r.json()["predictions"][0]["score"] for r in responses])
    np.testing.assert_allclose(scores, in_process_scores(registry, rows), rtol=0, atol=1e-6)
    # Fewer ONNX Runtime calls than requests: at least one call scored several requests.
    assert batches(client) - before < n


# The refusals. Each names the problem, none reaches the model, the service goes on.

BAD_ROWS = [
    ({"tenure": "twelve"}, "tenure", "float_type"),
    ({"contract": 12}, "contract", "string_type"),
    ({"senior_citizen": True}, "senior_citizen", "float_type"),
    ({"monthly_charges": {"value": 3}}, "monthly_charges", "float_type"),
    ({"total_charges": 1e39}, "total_charges", "less_than_equal"),
    ({"favourite_colour": "teal"}, "favourite_colour", "extra_forbidden"),
    ({"payment_method": ...}, "payment_method", "missing"),
]


@pytest.mark.parametrize(
    ("change", "field", "error_type"),
    BAD_ROWS,
    ids=[
        "string-for-number",
        "number-for-category",
        "bool-for-number",
        "object-for-number",
        "beyond-float32",
        "extra",
        "missing",
    ],
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
    before = batches(client)
    resp = client.post("/predict", json={"rows": [good, row]})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert f"rows.1.{field}" in body["error"]
    assert {"loc": ["rows", 1, field], "type": error_type} in [
        {"loc": d["loc"], "type": d["type"]} for d in body["detail"]
    ]
    assert batches(client) == before
    assert_still_serving(registry, client)


def test_nan_and_infinity_are_a_422_naming_the_field(
    registry: Registry, client: httpx.Client
) -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        row = request_rows(registry, 1)[0] | {"tenure": value}
        # Python's json writes NaN and Infinity, as many clients do.
        resp = client.post(
            "/predict",
            content=json.dumps({"rows": [row]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 422, (value, resp.text)
        assert "rows.0.tenure" in resp.json()["error"]
        assert resp.json()["detail"][0]["type"] == "finite_number"
    assert_still_serving(registry, client)


def test_body_problems_are_400_or_422_naming_them(registry: Registry, client: httpx.Client) -> None:
    rows = request_rows(registry, 1)
    before = batches(client)
    cases: list[tuple[bytes, int, str]] = [
        (b'{"rows": [{"tenure": 1,', 400, "JSON"),
        (b"", 400, "JSON"),
        (b"\xff\xfe", 400, "JSON"),
        (b"{}", 422, "rows"),
        (b"[]", 422, "invalid request"),
        (b'{"rows": []}', 422, "rows"),
        (b'{"rows": {}}', 422, "rows"),
        (json.dumps({"rows": rows, "threshold": 0.3}).encode(), 422, "threshold"),
    ]
    for content, status, named in cases:
        resp = client.post(
            "/predict", content=content, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == status, (content, resp.text)
        assert named in resp.json()["error"], (content, resp.text)
    assert batches(client) == before
    assert_still_serving(registry, client)


def test_hostile_bodies_and_headers_are_4xx_naming_the_problem(
    registry: Registry, client: httpx.Client
) -> None:
    good = json.dumps({"rows": request_rows(registry, 1)}).encode()
    assert b'"tenure": ' in good and b'"contract": "' in good
    as_json = {"Content-Type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (good.replace(b'"tenure"', b'"ten\xffure"'), as_json, 400, "not valid UTF-8"),
        (good.replace(b'"contract": "', b'"contract": "\xc3'), as_json, 400, "not valid UTF-8"),
        (good.replace(b'"tenure": ', b'"tenure": 1, "tenure": '), as_json, 422, "duplicate"),
        (good, {"Content-Type": "text/plain"}, 415, "text/plain"),
        (good, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        (good, {"Content-Type": "application/json; charset=utf-16"}, 415, "utf-16"),
        (gzip.compress(good), {**as_json, "Content-Encoding": "gzip"}, 415, "gzip"),
    ]
    before = batches(client)
    for content, headers, status, named in cases:
        resp = client.post("/predict", content=content, headers=headers)
        assert resp.status_code == status, (content[:60], headers, resp.text)
        assert named in resp.json()["error"], (content[:60], headers, resp.text)
        if status == 415 and "Content-Encoding" in headers:
            assert resp.headers["accept-encoding"] == "identity"
    assert batches(client) == before
    for headers in ({}, {"Content-Type": "application/json; charset=UTF-8"}):
        resp = client.post("/predict", content=good, headers=headers)
        assert resp.status_code == 200, (headers, resp.text)
    assert_still_serving(registry, client)


def peak_rss_bytes(server: ServiceProcess) -> int:
    """The peak resident memory (VmHWM) of the service's processes, summed, in bytes."""
    total = 0
    root = psutil.Process(server.pid)
    for proc in (root, *root.children(recursive=True)):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        total += int(kib) * 1024
    return total


def test_worst_case_category_is_a_422_and_costs_the_workers_no_memory(
    registry: Registry, server: ServiceProcess, client: httpx.Client
) -> None:
    """The issue's worst case: 1,000 rows (under the body limit) with one 400,000-character
    category. As fixed-width unicode labels it raised the worker's peak RSS by 1.5 GB."""
    rows = request_rows(registry, 1000)
    rows[500]["contract"] = "m" * 400_000
    body = json.dumps({"rows": rows}).encode()
    assert len(body) < 1_000_000
    before = batches(client)
    peak = peak_rss_bytes(server)
    started = time.monotonic()
    resp = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    elapsed = time.monotonic() - started
    grown = peak_rss_bytes(server) - peak
    print(f"worst case: {resp.status_code} in {elapsed:.2f} s, peak RSS +{grown / 2**20:.0f} MiB")
    assert resp.status_code == 422, resp.text[:300]
    error = resp.json()["error"]
    assert "rows.500.contract" in error, error
    max_chars = registry.cfg.serving.max_category_chars
    assert f"at most {max_chars} characters" in resp.json()["detail"][0]["msg"]
    assert grown < 100 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    assert batches(client) == before
    assert_still_serving(registry, client)


def test_too_many_rows_or_too_large_a_body_is_a_413(
    registry: Registry, client: httpx.Client
) -> None:
    limit = registry.cfg.serving.max_rows_per_request
    before = batches(client)
    rows = request_rows(registry, 1) * (limit + 1)
    resp = client.post("/predict", json={"rows": rows})
    assert resp.status_code == 413, resp.text
    assert f"at most {limit}" in resp.json()["error"]

    padded = json.dumps({"rows": request_rows(registry, 1)}) + " " * (8 * 1024 * 1024)
    resp = client.post(
        "/predict", content=padded.encode(), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413, resp.text
    assert "bytes" in resp.json()["error"]

    # No Content-Length (chunked): refused while reading, not after.
    def chunks() -> Iterator[bytes]:
        yield b'{"rows": ['
        for _ in range(200):
            yield b" " * 65536

    resp = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert batches(client) == before
    assert_still_serving(registry, client)


def test_api_keys_401_403_and_429_each_say_why(
    registry: Registry, server: ServiceProcess, client: httpx.Client
) -> None:
    body = {"rows": request_rows(registry, 1)}
    before = batches(client)
    with httpx.Client(base_url=server.url, timeout=30.0) as bare:
        missing = bare.post("/predict", json=body)
        assert missing.status_code == 401
        assert "Authorization" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")

        wrong_scheme = bare.post("/predict", json=body, headers={"Authorization": "Basic eDp5"})
        assert wrong_scheme.status_code == 401
        assert "Bearer" in wrong_scheme.json()["error"]

        unknown = bare.post("/predict", json=body, headers={"Authorization": "Bearer guess"})
        assert unknown.status_code == 403
        assert unknown.json()["error"] == "unknown API key"

        revoked = bare.post(
            "/predict", json=body, headers={"Authorization": f"Bearer {REVOKED_TOKEN}"}
        )
        assert revoked.status_code == 403
        assert "'retired'" in revoked.json()["error"] and "revoked" in revoked.json()["error"]

        from_env = bare.post(
            "/predict", json=body, headers={"Authorization": f"Bearer {ENV_TOKEN}"}
        )
        assert from_env.status_code == 200, from_env.text

        tiny = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
        statuses = [bare.post("/predict", json=body, headers=tiny) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        limited = statuses[-1]
        assert int(limited.headers["retry-after"]) >= 1
        assert "'tiny'" in limited.json()["error"] and "rate limit" in limited.json()["error"]
        # The refused request did not reach the model; the two served ones and the env
        # key's did.
    assert batches(client) - before == 3
    assert metric(client, "mlgate_requests_total", status="401") >= 2
    assert metric(client, "mlgate_requests_total", status="403") >= 2
    assert metric(client, "mlgate_requests_total", status="429") >= 1
    assert_still_serving(registry, client)


def test_health_metrics_model_and_openapi(registry: Registry, client: httpx.Client) -> None:
    with httpx.Client(base_url=client.base_url, timeout=10.0) as bare:
        assert bare.get("/livez").status_code == 200
        assert bare.get("/readyz").status_code == 200
        info = bare.get("/model")
        text = bare.get("/metrics")
    assert info.status_code == 200, info.text
    model = info.json()
    assert model["name"] == registry.model_name
    assert model["version"] == registry.champion_version
    assert model["alias"] == CHAMPION_ALIAS
    assert model["variant"] == VARIANT
    assert model["sha256"] == sha256_file(registry.model_dir / "model.onnx")
    assert "CPUExecutionProvider" in model["providers"]
    assert model["numeric_features"] == list(registry.cfg.dataset.numeric_features)

    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(text.text)}
    assert {
        "mlgate_requests",
        "mlgate_request_latency_seconds",
        "mlgate_batch_rows",
        "mlgate_score",
        "mlgate_inference_log_rows",
        "mlgate_model_info",
    } <= families
    version = registry.champion_version
    assert metric(client, "mlgate_requests_total", status="200", model_version=version) > 0
    assert metric(client, "mlgate_score_count", model_version=version, variant=VARIANT) > 0

    spec = client.get("/docs.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    row = body["schema"]["properties"]["rows"]["items"]
    assert set(row["required"]) == set(registry.cfg.dataset.features)
    assert row["additionalProperties"] is False
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "401", "403", "413", "422", "429", "503"} <= set(responses)
    assert "/model" in spec["paths"]


def wait_for_log_rows(
    registry: Registry, prefix: str, expected: int, timeout: float = 20.0
) -> pd.DataFrame:
    now = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    while True:
        frame = read_inference_log(
            registry.cfg.inference_log_dir(),
            registry.model_name,
            now - timedelta(hours=1),
            now + timedelta(hours=1),
        )
        mine = frame[frame["request_id"].str.startswith(prefix)]
        if len(mine) >= expected or time.monotonic() > deadline:
            return mine
        time.sleep(0.25)


def test_each_prediction_is_in_the_inference_log(registry: Registry, client: httpx.Client) -> None:
    rows = request_rows(registry, 3, start=40)
    rows[1]["tenure"] = None
    rows[2]["contract"] = None
    resp = client.post("/predict", json={"rows": rows}, headers={"X-Request-ID": "log-check-1"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "log-check-1"
    logged = wait_for_log_rows(registry, "log-check-", 3)
    assert len(logged) == 3
    assert set(logged["model_name"]) == {registry.model_name}
    assert set(logged["model_version"]) == {registry.champion_version}
    assert set(logged["variant"]) == {VARIANT}
    assert (logged["latency_ms"] > 0).all()
    np.testing.assert_allclose(
        logged["score"], [p["score"] for p in resp.json()["predictions"]], rtol=0, atol=0
    )
    assert logged["tenure"].tolist()[0] == rows[0]["tenure"]
    assert pd.isna(logged["tenure"].tolist()[1])
    assert logged["contract"].tolist()[2] is None
    assert logged["contract"].tolist()[0] == rows[0]["contract"]
    assert str(logged["ts"].dtype) == "datetime64[us, UTC]"


def test_bounded_load_gives_no_5xx_and_loses_no_log_rows(
    registry: Registry, server: ServiceProcess, client: httpx.Client
) -> None:
    """2,000 requests (single rows and 20-row requests) from 32 connections, at most 30 s."""
    n_requests, connections, budget_s = 2000, 32, 30.0
    pool = request_rows(registry, 200, start=1500)
    dropped_before = metric(client, "mlgate_inference_log_rows_total", outcome="dropped")

    async def run() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=connections)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n_requests):
            queue.put_nowait(i)
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + budget_s

        async with httpx.AsyncClient(
            base_url=server.url, timeout=30.0, limits=limits, headers=AUTH
        ) as ac:

            async def worker() -> None:
                while not queue.empty() and time.monotonic() < deadline:
                    i = queue.get_nowait()
                    size = 20 if i % 10 == 0 else 1
                    rows = [pool[(i + k) % len(pool)] for k in range(size)]
                    r = await ac.post(
                        "/predict", json={"rows": rows}, headers={"X-Request-ID": f"load-{i}"}
                    )
                    out.append((r.status_code, size))

            await asyncio.gather(*(worker() for _ in range(connections)))
        return out

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    statuses = [s for s, _ in results]
    assert len(results) == n_requests, f"only {len(results)} requests in {budget_s} s"
    assert [s for s in statuses if s >= 500] == []
    assert set(statuses) == {200}
    sent_rows = sum(size for _, size in results)

    logged = wait_for_log_rows(registry, "load-", sent_rows)
    assert len(logged) == sent_rows, f"{sent_rows - len(logged)} rows missing from the log"
    assert logged["request_id"].nunique() == n_requests
    dropped = metric(client, "mlgate_inference_log_rows_total", outcome="dropped")
    assert dropped == dropped_before
    print(f"load: {n_requests} requests, {sent_rows} rows in {elapsed:.1f} s")


def test_schemathesis_finds_no_server_error(server: ServiceProcess, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(cli),
            "run",
            f"{server.url}/docs.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: {AUTH['Authorization']}",
            "--max-examples",
            "60",
            "--seed",
            "7",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "20",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout, result.stdout[-2000:]
    assert server.is_running()


def test_sigterm_finishes_requests_in_flight_and_writes_their_log_rows(
    registry: Registry, server: ServiceProcess
) -> None:
    """The last test of the module's server: it stops it, as `ServiceProcess.stop` does."""
    rows = request_rows(registry, 1000)

    async def run() -> list[object]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, headers=AUTH) as ac:

            async def one(i: int) -> object:
                try:
                    r = await ac.post(
                        "/predict", json={"rows": rows}, headers={"X-Request-ID": f"drain-{i}"}
                    )
                    return r.status_code
                except httpx.ConnectError:
                    return "refused"

            tasks = [asyncio.create_task(one(i)) for i in range(8)]
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks, return_exceptions=True))

    outcomes = asyncio.run(run())
    code = server.process.wait(timeout=60)
    assert code == 0, server.output_tail()
    # A request the server had accepted is answered; none is cut off or failed.
    assert all(o in (200, "refused") for o in outcomes), outcomes
    served = outcomes.count(200)
    assert served >= 1, outcomes
    logged = wait_for_log_rows(registry, "drain-", served * 1000, timeout=5)
    assert len(logged) == served * 1000
    assert "stopped:" in server.output_tail(80)


def test_unknown_alias_fails_start_up_fast_with_the_reason(
    registry: Registry, tmp_path: Path
) -> None:
    with (
        start_service(
            registry.config_path,
            ModelRef(registry.model_name, alias="nope"),
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
        source=f"{registry.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=registry.run_id,
        tags=tags,
    )
    return str(mv.version)


def test_champion_loads_verified(registry: Registry) -> None:
    model = load_registered_model(
        registry.tracking_uri, ModelRef(registry.model_name, alias=CHAMPION_ALIAS)
    )
    onnx_path = registry.model_dir / "model.onnx"
    assert model.version == registry.champion_version
    assert model.alias == CHAMPION_ALIAS
    assert model.sha256 == sha256_file(onnx_path)
    assert model.content == onnx_path.read_bytes()
    assert model.schema == input_schema(registry.cfg.dataset)


def test_sha256_tag_that_does_not_match_the_file_is_refused(registry: Registry) -> None:
    wrong = "0" * 64
    version = _register_version(registry, {SHA_TAG: wrong})
    with pytest.raises(ModelIntegrityError) as info:
        load_registered_model(registry.tracking_uri, ModelRef(registry.model_name, version=version))
    message = str(info.value)
    assert wrong in message
    assert sha256_file(registry.model_dir / "model.onnx") in message
    assert registry.model_name in message
    assert f"version {version}" in message


def test_version_without_sha256_tag_is_refused(registry: Registry) -> None:
    version = _register_version(registry, {})
    with pytest.raises(ModelIntegrityError, match=f"no {SHA_TAG} tag"):
        load_registered_model(registry.tracking_uri, ModelRef(registry.model_name, version=version))


def test_unknown_alias_version_or_model_is_not_found(registry: Registry) -> None:
    uri, name = registry.tracking_uri, registry.model_name
    with pytest.raises(ModelNotFoundError, match=r"no alias @nope \(aliases: @champion"):
        load_registered_model(uri, ModelRef(name, alias="nope"))
    with pytest.raises(ModelNotFoundError, match="has no version 999"):
        load_registered_model(uri, ModelRef(name, version="999"))
    with pytest.raises(ModelNotFoundError, match="no registered model 'ghost'"):
        load_registered_model(uri, ModelRef("ghost", alias=CHAMPION_ALIAS))


def test_cache_is_reused_only_while_it_matches_the_tag(registry: Registry, tmp_path: Path) -> None:
    uri, name = registry.tracking_uri, registry.model_name
    champion = ModelRef(name, alias=CHAMPION_ALIAS)
    first = load_registered_model(uri, champion, cache_dir=tmp_path)
    cached = tmp_path / name / first.version / "model.onnx"
    assert cached.read_bytes() == first.content

    cached.write_bytes(b"tampered")
    again = load_registered_model(uri, champion, cache_dir=tmp_path)
    assert again.sha256 == first.sha256
    assert cached.read_bytes() == first.content

    shutil.rmtree(tmp_path / name)
    by_version = load_registered_model(
        uri, ModelRef(name, version=first.version), cache_dir=tmp_path
    )
    assert (by_version.sha256, by_version.content) == (first.sha256, first.content)
