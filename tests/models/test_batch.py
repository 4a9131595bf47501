"""Batch scoring's pure parts (models/batch.py): the row rules on columns of a file, the
encoding they lead to (the service's, for the same rows), the plan in partitions, the gate
sample, and a partition scored and joined with a small model, without Prefect or MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.batch import (
    ROW_COLUMN,
    BatchLayout,
    BatchModel,
    DecodedBatch,
    GateSample,
    batch_target,
    decode_batch,
    join_parts,
    join_samples,
    plan_batch,
    score_partition,
)
from models.config import DatasetConfig, TrainConfig
from models.data import DataError
from models.onnx_export import (
    export_onnx,
    input_schema,
    make_session,
    onnx_inputs_from_columns,
    predict_proba_with_schema,
)
from models.train import MISSING_CATEGORY, train_model
from services.schema import RequestDecoder

pytestmark = pytest.mark.fast

SCHEMA = {"numeric": ["a", "b"], "categorical": ["c"]}
DATASET = DatasetConfig(
    path="unused.parquet", target="y", numeric_features=("a", "b"), categorical_features=("c",)
)


def layout(max_chars: int = 10, id_column: str | None = None) -> BatchLayout:
    return BatchLayout(False, ("a", "b"), ("c",), id_column, pa.int64(), max_chars)


def test_row_rules_refuse_what_the_service_refuses_and_say_why() -> None:
    batch = pa.record_batch(
        {
            "a": pa.array([1.0, None, float("nan"), float("inf"), 1e39, 2.0, 3.0]),
            "b": pa.array(["3", None, " 4.5 ", "2", "abc", "1e5", "1e39"]),
            "c": pa.array(["x", None, "y", "x", "x", "far too long", "z"]),
        }
    )
    decoded = decode_batch(batch, layout(), first_row=100)
    assert decoded.rows == 7 and decoded.accepted == 3
    assert decoded.ids.to_pylist() == [100, 101, 102]
    np.testing.assert_array_equal(decoded.numeric, [[1.0, np.nan, np.nan], [3.0, np.nan, 4.5]])
    assert decoded.labels[0].tolist() == ["x", MISSING_CATEGORY, "y"]
    assert decoded.text[0].to_pylist() == ["x", None, "y"]
    refused = {r[ROW_COLUMN]: r for r in decoded.rejects}
    assert sorted(refused) == [103, 104, 105, 106]
    assert refused[103]["reason"] == "a: inf is not a finite number within float32 range"
    assert refused[104]["reason"] == (
        "a: 1e+39 is not a finite number within float32 range; b: 'abc' is not a number"
    )
    assert refused[105]["reason"] == (
        "c: 'far too long' is longer than 10 characters (serving.max_category_chars)"
    )
    assert refused[106]["reason"] == "b: '1e39' is not a finite number within float32 range"
    assert refused[103]["values"] == {"a": "inf", "b": "2", "c": "x"}
    json.dumps(decoded.rejects, allow_nan=False)


def test_types_the_schema_refuses_and_those_read_as_training_reads_them() -> None:
    batch = pa.record_batch(
        {
            "a": pa.array([True, None, False]),
            "b": pa.array([1, 2, 3], pa.int32()),
            "c": pa.array([1.5, None, None]),
        }
    )
    decoded = decode_batch(batch, layout(), first_row=0)
    assert decoded.ids.to_pylist() == [1]
    assert [r["reason"] for r in decoded.rejects] == [
        "a: True (bool) is not a number; c: 1.5 (double) is not a category (text)",
        "a: False (bool) is not a number",
    ]
    assert decoded.labels[0].tolist() == [MISSING_CATEGORY]

    integers = pa.record_batch(
        {
            "a": pa.nulls(2),
            "b": pa.array(["7", "8"]).dictionary_encode(),
            "c": pa.array([3, None], pa.int64()),
        }
    )
    decoded = decode_batch(integers, layout(), first_row=0)
    assert decoded.accepted == 2 and not decoded.rejects
    np.testing.assert_array_equal(decoded.numeric, [[np.nan, np.nan], [7.0, 8.0]])
    assert decoded.labels[0].tolist() == ["3", MISSING_CATEGORY]


def test_accepted_rows_are_fed_exactly_as_the_service_feeds_them() -> None:
    rows = [
        {"a": 1, "b": 2.5, "c": "x"},
        {"a": None, "b": -3.25e7, "c": None},
        {"a": 0.1, "b": None, "c": "a longer one"},
        {"a": 3.4e38, "b": -0.0, "c": ""},
    ]
    body = json.dumps({"rows": rows}).encode()
    block = RequestDecoder(DATASET, ["b", "a"], ["c"], 100).decode(body)
    schema = {"numeric": ["b", "a"], "categorical": ["c"]}
    served = onnx_inputs_from_columns(block.numeric, block.labels, schema)
    types = pa.schema([("a", pa.float64()), ("b", pa.float64()), ("c", pa.string())])
    batch = pa.Table.from_pylist(rows, schema=types).to_batches()[0]
    ours = BatchLayout(False, ("b", "a"), ("c",), None, pa.int64(), 256)
    decoded = decode_batch(batch, ours, first_row=0)
    fed = onnx_inputs_from_columns(decoded.numeric, decoded.labels, schema)
    assert fed.keys() == served.keys()
    for name, expected in served.items():
        assert fed[name].dtype == expected.dtype and fed[name].shape == expected.shape, name
        if expected.dtype.kind == "f":
            np.testing.assert_array_equal(fed[name], expected, err_msg=name)
        else:
            assert fed[name].tolist() == expected.tolist(), name


def numbered_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "a": np.arange(n, dtype=float),
            "b": np.ones(n),
            "c": ["x"] * n,
        }
    )


def write_parts(folder: Path, sizes: list[list[int]], rows: pd.DataFrame | None = None) -> None:
    """`rows` (default: numbered ones) in order as one Parquet file per entry of `sizes`,
    each with row groups of those sizes."""
    rows = numbered_rows(sum(map(sum, sizes))) if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for f, groups in enumerate(sizes):
        table = pa.Table.from_pandas(rows, preserve_index=False)
        with pq.ParquetWriter(folder / f"part-{f}.parquet", table.schema) as writer:
            for g in groups:
                writer.write_table(table.slice(start, g))
                start += g


def test_plan_cuts_whole_row_groups_across_parts(tmp_path: Path) -> None:
    write_parts(tmp_path / "in", [[10, 10, 10], [5], [20, 3]])
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / "_temporary.parquet").write_text("not Parquet")
    plan = plan_batch(tmp_path / "in", SCHEMA, "id", 256, partition_rows=25, sample_rows=100)
    assert [(p.first_row, p.rows) for p in plan.partitions] == [(0, 30), (30, 25), (55, 3)]
    assert [[(Path(x.path).name, x.row_groups) for x in p.pieces] for p in plan.partitions] == [
        [("part-0.parquet", (0, 1, 2))],
        [("part-1.parquet", (0,)), ("part-2.parquet", (0,))],
        [("part-2.parquet", (1,))],
    ]
    assert plan.rows == 58 and plan.layout.id_column == "id"
    assert sum(p.sample_rows for p in plan.partitions) >= 100
    assert plan_batch(tmp_path / "in", SCHEMA, "customer", 256).layout.id_name == ROW_COLUMN


def test_plan_refuses_inputs_and_outputs_it_cannot_use(tmp_path: Path) -> None:
    write_parts(tmp_path / "in", [[4], [4]])
    pd.DataFrame({"a": [1.0], "b": [1.0], "c": ["x"]}).to_parquet(tmp_path / "in" / "x.parquet")
    with pytest.raises(DataError, match=r"id column 'id' is in 2 of the 3 Parquet parts"):
        plan_batch(tmp_path / "in", SCHEMA, "id", 256)
    pd.DataFrame({"a": [1.0], "c": ["x"]}).to_csv(tmp_path / "no_b.csv", index=False)
    with pytest.raises(DataError, match=r"lacks the model's feature column\(s\) b"):
        plan_batch(tmp_path / "no_b.csv", SCHEMA, None, 256)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not found"):
        plan_batch(tmp_path / "nothing.parquet", SCHEMA, None, 256)
    with pytest.raises(DataError, match="no Parquet parts"):
        plan_batch(tmp_path / "empty", SCHEMA, None, 256)
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported format"):
        plan_batch(tmp_path / "data.json", SCHEMA, None, 256)
    with pytest.raises(DataError, match=r"\*\.parquet"):
        batch_target(tmp_path / "out.csv", tmp_path / "in")
    with pytest.raises(DataError, match="inside the input"):
        batch_target(tmp_path / "in" / "scores.parquet", tmp_path / "in")
    target = batch_target(tmp_path / "out" / "scores.parquet", tmp_path / "in")
    assert target.rejects == tmp_path / "out" / "scores.rejects.jsonl"


def numbered(n: int, start: int) -> tuple[DecodedBatch, np.ndarray]:
    values = np.arange(start, start + n, dtype=float)
    decoded = DecodedBatch(
        n,
        np.vstack([values, values]),
        (np.full(n, "x", dtype=object),),
        (pa.array(["x"] * n),),
        pa.array(np.arange(start, start + n)),
        [],
    )
    return decoded, values / 1e6


@pytest.mark.parametrize("expected_rows", [None, 100_000])
def test_gate_sample_is_uniform_bounded_and_seeded(expected_rows: int | None) -> None:
    def draw(seed: int) -> pa.Table:
        sample = GateSample(layout(), 2_000, seed, expected_rows)
        for start in range(0, 100_000, 5_000):
            sample.add(*numbered(5_000, start))
        return sample.table()

    table = draw(1)
    assert table.num_rows == 2_000
    assert table.schema == layout().sample_schema()
    a = table.column("a").to_numpy()
    assert len(np.unique(a)) == 2_000
    # The mean of 2,000 of 0..99,999 drawn uniformly: 49,999.5, standard error about 645.
    assert abs(a.mean() - 49_999.5) < 3_000
    assert draw(1).equals(table) and not draw(2).equals(table)
    assert GateSample(layout(), 10, 0).table().num_rows == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BatchModel:
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.normal(size=n),
            "c": rng.choice(["x", "y", "z"], n),
        }
    )
    df["y"] = ((df["a"] + (df["c"] == "x")) > 0.5).astype(int)
    trained = train_model(df, DATASET, TrainConfig(estimator="logistic_regression"))
    onnx = export_onnx(trained.pipeline, DATASET)
    return BatchModel("7", onnx.sha256, input_schema(DATASET), onnx.content)


def test_partitions_score_and_join_in_input_order(tmp_path: Path, model: BatchModel) -> None:
    rows = numbered_rows(100)
    rows.loc[[5, 77], "c"] = "a category far too long"
    write_parts(tmp_path / "in", [[30, 30], [25], [7, 8]], rows)
    plan = plan_batch(tmp_path / "in", model.schema, "id", 10, partition_rows=30, sample_rows=50)
    assert [(p.first_row, p.rows) for p in plan.partitions] == [
        (0, 30),
        (30, 30),
        (60, 32),
        (92, 8),
    ]
    staging = tmp_path / "staging"
    staging.mkdir()
    seen: list[int] = []
    parts = [
        score_partition(p, plan.layout, model, str(staging), batch_rows=16, on_batch=seen.append)
        for p in plan.partitions
    ]
    assert sum(seen) == 100 and max(seen) <= 16
    target = batch_target(tmp_path / "out" / "scores.parquet", tmp_path / "in")
    join_parts(parts, plan.layout, target, staging)

    out = pd.read_parquet(target.output)
    kept = rows.drop(index=[5, 77])
    assert out["id"].tolist() == kept["id"].tolist()
    expected = predict_proba_with_schema(make_session(model.content), kept, model.schema)
    np.testing.assert_allclose(out["score"], expected, atol=1e-6)
    assert out["label"].tolist() == (expected > 0.5).astype(int).tolist()
    assert set(out["model_version"]) == {"7"}
    refused = [json.loads(line) for line in target.rejects.read_text().splitlines()]
    assert [(r["row"], r["id"]) for r in refused] == [(5, "r5"), (77, "r77")]
    assert all(r["reason"].startswith("c: 'a category far too long' is longer") for r in refused)
    sample = join_samples(parts, plan.layout)
    assert 0 < sample.num_rows <= 50 and sample.column_names == ["a", "b", "c", "score"]

    tampered = BatchModel(model.version, model.sha256, model.schema, model.content + b"\0")
    with pytest.raises(ValueError, match="do not match their sha256"):
        score_partition(plan.partitions[0], plan.layout, tampered, str(staging))


def test_a_csv_is_read_as_text_under_the_same_rules(tmp_path: Path, model: BatchModel) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("id,c,a,b,extra\n1,x,0.5,1,q\n2,,NA,2,q\n3,y,abc,3,q\n4,z, 1e2 ,,q\n")
    plan = plan_batch(path, model.schema, "id", 256)
    assert plan.rows is None and plan.layout.id_type == pa.string()
    (tmp_path / "s").mkdir()
    part = score_partition(plan.partitions[0], plan.layout, model, str(tmp_path / "s"))
    assert (part.rows, part.scored, part.rejected) == (4, 3, 1)
    out = pq.read_table(part.output).to_pandas()
    assert out["id"].tolist() == ["1", "2", "4"]
    frame = pd.DataFrame({"a": [0.5, None, 100.0], "b": [1.0, 2.0, None], "c": ["x", None, "z"]})
    expected = predict_proba_with_schema(make_session(model.content), frame, model.schema)
    np.testing.assert_allclose(out["score"], expected, atol=1e-6)
    (refused,) = [json.loads(line) for line in Path(part.rejects).read_text().splitlines()]
    assert refused == {
        "row": 2,
        "id": "3",
        "reason": "a: 'abc' is not a number",
        "values": {"a": "abc", "b": "3", "c": "y"},
    }
