"""Batch scoring end to end (`score_flow`, `mlgate score`): a copy of the session's seed
registry per test, real MLflow, Prefect's test harness, small inputs. The service's answer
for the same rows comes from its own in-process path: the request decoder and the worker's
`ModelRuntime.score_rows` (what `POST /predict` runs after the HTTP layer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from checks.result import GateStatus
from flows import registry
from flows.cli import app
from flows.demo import shifted_batch
from flows.score import BATCH_KIND, score_flow
from models.config import MlgateConfig, load_config
from models.model_ref import ModelRef
from models.onnx_export import OnnxModel, make_session, sha256_bytes
from models.registry_layout import MONITOR_EXPERIMENT, MONITORING_ARTIFACT
from services.app import ModelRuntime
from services.auth import Authenticator
from services.metrics import ServiceMetrics
from services.model_store import (
    LoadedModel,
    ModelIntegrityError,
    ModelNotFoundError,
    load_registered_model,
)
from tests.conftest import BUNDLED_DATA
from tests.flows.conftest import Seed, copy_registry

pytestmark = pytest.mark.integration


@pytest.fixture()
def env(seed: Seed, tmp_path: Path) -> tuple[Path, MlgateConfig, pd.DataFrame]:
    path = copy_registry(seed, tmp_path)
    return path, load_config(path), pd.read_parquet(BUNDLED_DATA)


def champion(cfg: MlgateConfig) -> LoadedModel:
    return load_registered_model(
        cfg.registry.resolved_tracking_uri(), ModelRef(cfg.registry.model_name, version="1")
    )


def service_scores(cfg: MlgateConfig, rows: pd.DataFrame) -> np.ndarray:
    """What the service answers for `rows`: JSON bodies of up to 1,000 rows through its
    decoder and its worker's scorer."""
    model = champion(cfg)
    session = make_session(model.content)
    runtime = ModelRuntime(
        model,
        session,
        cfg.dataset,
        cfg.serving,
        variant="stable",
        authenticator=Authenticator({}, 1.0, 1),
        log_writer=None,
        metrics=ServiceMetrics(model.name, model.version, "stable", "cpu", model.sha256),
    )
    features = rows[list(cfg.dataset.features)]
    records = pa.Table.from_pandas(features, preserve_index=False).to_pylist()
    scores = []
    for i in range(0, len(records), 1000):
        body = json.dumps({"rows": records[i : i + 1000]}).encode()
        scores.append(runtime.score_rows(runtime.decoder.decode(body)))
    return np.concatenate(scores)


def with_nulls(df: pd.DataFrame, n: int) -> pd.DataFrame:
    rows = df.sample(n, random_state=3).reset_index(drop=True)
    # Few enough (1 %) that the live data gate's null-share checks still pass.
    rows.loc[::97, "tenure"] = None
    rows.loc[::101, "contract"] = None
    rows.loc[::103, "monthly_charges"] = None
    return rows


def test_batch_scores_are_the_services_and_the_run_holds_the_evidence(env, tmp_path):
    path, cfg, df = env
    rows = with_nulls(df, 1500)
    source = tmp_path / "rows.parquet"
    rows.to_parquet(source, index=False)
    output = tmp_path / "out" / "scores.parquet"

    outcome = score_flow(str(source), str(output), str(path), version="1")

    out = pd.read_parquet(output)
    assert list(out.columns) == ["customer_id", "score", "label", "model_version"]
    assert out["customer_id"].tolist() == rows["customer_id"].tolist()
    expected = service_scores(cfg, rows)
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert out["label"].tolist() == [1 if s > 0.5 else 0 for s in expected]
    assert set(out["model_version"]) == {"1"}
    assert (tmp_path / "out" / "scores.rejects.jsonl").read_text() == ""
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]

    assert (outcome.rows, outcome.scored, outcome.rejected) == (1500, 1500, 0)
    client = registry.connect(cfg.registry)
    run = client.get_run(outcome.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == MONITOR_EXPERIMENT and run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["kind"] == BATCH_KIND and tags["model_version"] == "1"
    assert tags["input"] == str(source) and tags["output"] == str(output)
    assert tags["gate.data"] == "pass" and tags["gate.drift"] == "pass"
    assert metrics["rows"] == 1500 and metrics["rows_scored"] == 1500
    assert metrics["rows_rejected"] == 0 and metrics["rows_per_s"] > 0
    assert metrics["gate_sample_rows"] == 1500 and "psi.contract" in metrics
    logged = registry.load_json_artifact(client, outcome.run_id, MONITORING_ARTIFACT)
    assert {g["name"] for g in logged["gates"]} == {"data", "drift"}
    assert logged["scored"] == 1500


def test_a_folder_of_parquet_parts_and_a_csv_score_alike(env, tmp_path):
    path, cfg, df = env
    rows = with_nulls(df, 900)
    folder = tmp_path / "parts" / "date=2026-01-01"
    folder.mkdir(parents=True)
    table = pa.Table.from_pandas(rows, preserve_index=False)
    for i, (start, n) in enumerate([(0, 400), (400, 300), (700, 200)]):
        pq.write_table(table.slice(start, n), folder / f"part-{i}.parquet", row_group_size=100)
    rows.to_csv(tmp_path / "rows.csv", index=False)

    parts = score_flow(
        str(tmp_path / "parts"),
        str(tmp_path / "from_parts.parquet"),
        str(path),
        progress=True,
        batch_rows=64,
        partition_rows=200,
    )
    csv = score_flow(str(tmp_path / "rows.csv"), str(tmp_path / "from_csv.parquet"), str(path))

    assert parts.partitions == 5 and parts.scored == 900 and csv.scored == 900
    from_parts = pd.read_parquet(tmp_path / "from_parts.parquet")
    from_csv = pd.read_parquet(tmp_path / "from_csv.parquet")
    assert from_parts["customer_id"].tolist() == rows["customer_id"].tolist()
    assert from_csv["customer_id"].tolist() == rows["customer_id"].astype(str).tolist()
    expected = service_scores(cfg, rows)
    np.testing.assert_allclose(from_parts["score"].to_numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_csv["score"].to_numpy(), expected, rtol=0, atol=1e-6)


def test_refused_rows_go_to_the_rejects_file_and_the_others_are_scored(env, tmp_path):
    path, cfg, df = env
    rows = df.sample(300, random_state=5).reset_index(drop=True)
    rows["tenure"] = rows["tenure"].astype(object)
    rows["monthly_charges"] = rows["monthly_charges"].astype(object)
    bad = {
        4: ("tenure", "twelve", "tenure: 'twelve' is not a number"),
        50: ("monthly_charges", "inf", "monthly_charges: 'inf' is not a number"),
        51: ("contract", "x" * 300, "contract: 'xxx"),
        299: ("tenure", "1e40", "tenure: '1e40' is not a finite number within float32 range"),
    }
    for i, (column, value, _) in bad.items():
        rows.loc[i, column] = value
    source = tmp_path / "rows.csv"
    rows.to_csv(source, index=False)
    output = tmp_path / "scores.parquet"

    result = CliRunner().invoke(
        app, ["score", "--input", str(source), "--output", str(output), "--config", str(path)]
    )

    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "scored 296 of 300 rows with churn v1" in said and "4 row(s) refused" in said
    refused = [json.loads(line) for line in (tmp_path / "scores.rejects.jsonl").open()]
    assert [r["row"] for r in refused] == sorted(bad)
    for record in refused:
        column, value, reason = bad[record["row"]]
        assert record["reason"].startswith(reason), record["reason"]
        assert record["customer_id"] == str(rows.loc[record["row"], "customer_id"])
        assert record["values"][column] == value
    out = pd.read_parquet(output)
    kept = rows.drop(index=list(bad))
    assert out["customer_id"].tolist() == kept["customer_id"].astype(str).tolist()
    np.testing.assert_allclose(out["score"], service_scores(cfg, kept), rtol=0, atol=1e-6)
    client = registry.connect(cfg.registry)
    experiment = client.get_experiment_by_name(MONITOR_EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.kind = '{BATCH_KIND}'")
    assert run.data.metrics["rows_rejected"] == 4 and run.data.metrics["rows_scored"] == 296
    assert run.data.tags["rejects"] == str(tmp_path / "scores.rejects.jsonl")


def test_a_drifted_batch_is_recorded_as_drift(env, tmp_path):
    path, cfg, df = env
    source = tmp_path / "shifted.parquet"
    shifted_batch(df, 1000, 0).to_parquet(source, index=False)

    outcome = score_flow(str(source), str(tmp_path / "scores.parquet"), str(path), alias="champion")

    drift = next(g for g in outcome.gates if g.name == "drift")
    assert drift.status is GateStatus.FAIL and "contract" in drift.reason
    run = registry.connect(cfg.registry).get_run(outcome.run_id)
    assert run.data.tags["gate.drift"] == "fail"
    assert run.data.metrics["psi.contract"] > 0.25


def test_a_missing_version_or_a_tampered_artifact_is_a_clear_error(env, tmp_path):
    path, cfg, df = env
    source = tmp_path / "rows.parquet"
    df.head(50).to_parquet(source, index=False)
    output = tmp_path / "scores.parquet"
    args = ["score", "--input", str(source), "--output", str(output), "--config", str(path)]

    missing = CliRunner().invoke(app, [*args, "--version", "99"])
    assert missing.exit_code == 1
    assert "registered model 'churn' has no version 99" in " ".join(missing.output.split())
    both = CliRunner().invoke(app, [*args, "--version", "1", "--alias", "champion"])
    assert both.exit_code == 2 and "not both" in " ".join(both.output.split())
    with pytest.raises(ModelNotFoundError, match="no alias @nobody"):
        score_flow(str(source), str(output), str(path), alias="nobody")

    client = registry.connect(cfg.registry)
    content = champion(cfg).content
    mv = registry.register_onnx_model(
        client,
        cfg.registry,
        cfg.dataset,
        OnnxModel(content, sha256_bytes(content)),
        run_name="tampered",
        tags={},
    )
    stored = Path(mv.source.removeprefix("file://")) / "model.onnx"
    assert stored.read_bytes() == content
    stored.write_bytes(content + b"\0")
    with pytest.raises(ModelIntegrityError, match=r"sha256 of model\.onnx is"):
        score_flow(str(source), str(output), str(path), version=str(mv.version))
    tampered = CliRunner().invoke(app, [*args, "--version", str(mv.version)])
    assert tampered.exit_code == 1
    assert "refusing to serve it" in " ".join(tampered.output.split())
    assert not output.exists()


def test_partitions_fan_out_over_the_configured_dask_workers(seed, tmp_path):
    """Two local worker processes stand in for team mode's; the test harness's Prefect API
    is the server they report to."""
    from distributed import LocalCluster

    df = pd.read_parquet(BUNDLED_DATA).head(2000)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(4):
        df.iloc[i * 500 : (i + 1) * 500].to_parquet(folder / f"part-{i}.parquet", index=False)
    (tmp_path / "local").mkdir()
    (tmp_path / "dask").mkdir()
    local_path = copy_registry(seed, tmp_path / "local")
    local = score_flow(str(folder), str(tmp_path / "local.parquet"), str(local_path))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        path = copy_registry(
            seed, tmp_path / "dask", dask={"scheduler_address": cluster.scheduler_address}
        )
        outcome = score_flow(
            str(folder), str(tmp_path / "dask.parquet"), str(path), partition_rows=500
        )
        assert "score_partition" in cluster.scheduler.task_prefixes

    assert (outcome.partitions, outcome.scored, local.partitions) == (4, 2000, 1)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "dask.parquet"), pd.read_parquet(tmp_path / "local.parquet")
    )
    assert [g.status for g in outcome.gates] == [g.status for g in local.gates]
