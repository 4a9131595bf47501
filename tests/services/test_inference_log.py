"""The inference log's contract: layout, columns and types, atomic files, bounded queue."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.config import DatasetConfig
from services.inference_log import InferenceLogWriter, read_inference_log
from services.schema import RequestDecoder, RowBlock

DATASET = DatasetConfig(
    path="unused.parquet",
    target="y",
    numeric_features=("tenure", "charges"),
    categorical_features=("contract",),
)
DECODER = RequestDecoder(DATASET, ["tenure", "charges"], ["contract"], 1000)


def block(*rows: tuple[float | None, float | None, str | None]) -> RowBlock:
    body = {"rows": [dict(zip(("tenure", "charges", "contract"), r, strict=True)) for r in rows]}
    import json

    return DECODER.decode(json.dumps(body).encode())


def writer(tmp_path: Path, **kw: object) -> InferenceLogWriter:
    options: dict[str, object] = {
        "model_name": "churn",
        "model_version": "7",
        "variant": "canary",
        "numeric": ["tenure", "charges"],
        "categorical": ["contract"],
        "max_queued_rows": 1000,
        "flush_rows": 10_000,
        "flush_s": 60.0,
    }
    options.update(kw)
    return InferenceLogWriter(tmp_path, **options)  # type: ignore[arg-type]


def test_rows_land_with_the_contract_layout_columns_and_types(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.start()
    ts = datetime(2026, 3, 1, 23, 59, 59, 250000, tzinfo=UTC).timestamp()
    assert w.submit(
        ts, "req-1", 3.5, block((1.0, None, "Two year"), (None, 20.5, None)), np.array([0.25, 0.75])
    )
    assert w.submit(ts + 1.0, "req-2", 1.0, block((5.0, 1.0, "x")), np.array([0.5]))
    assert w.flush(timeout=10)
    w.close()

    day1 = tmp_path / "churn" / "date=2026-03-01"
    day2 = tmp_path / "churn" / "date=2026-03-02"
    files = sorted(day1.iterdir()) + sorted(day2.iterdir())
    assert len(files) == 2
    for f in files:
        name, pid = f.name, str(os.getpid())
        assert name.startswith("part-") and name.endswith(".parquet") and f"-{pid}-" in name
    table = pq.read_table(files[0])
    assert table.schema.names == [
        "ts",
        "request_id",
        "model_name",
        "model_version",
        "variant",
        "latency_ms",
        "score",
        "tenure",
        "charges",
        "contract",
    ]
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    for name in ("request_id", "model_name", "model_version", "variant", "contract"):
        assert table.schema.field(name).type == pa.string()
    for name in ("latency_ms", "score", "tenure", "charges"):
        assert table.schema.field(name).type == pa.float64()
    rows = table.to_pylist()
    assert rows[0]["tenure"] == 1.0 and rows[0]["charges"] is None
    assert rows[1]["tenure"] is None and rows[1]["contract"] is None
    assert [r["score"] for r in rows] == [0.25, 0.75]
    assert {(r["request_id"], r["model_version"], r["variant"], r["latency_ms"]) for r in rows} == {
        ("req-1", "7", "canary", 3.5)
    }
    assert w.written_rows == 3 and w.dropped_rows == 0


def test_reader_returns_the_window_oldest_first(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.start()
    base = datetime(2026, 5, 2, 10, tzinfo=UTC)
    for i in range(5):
        at = (base + timedelta(minutes=30 * i)).timestamp()
        w.submit(at, f"r{i}", 1.0, block((float(i), 1.0, "a")), np.array([0.1 * i]))
    w.close()
    frame = read_inference_log(
        tmp_path, "churn", base + timedelta(minutes=30), base.replace(hour=12)
    )
    assert frame["request_id"].tolist() == ["r1", "r2", "r3"]
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    naive = read_inference_log(tmp_path, "churn", datetime(2026, 5, 2), datetime(2026, 5, 3))
    assert len(naive) == 5
    empty = read_inference_log(tmp_path, "nobody", base, base + timedelta(days=1))
    assert empty.empty and "score" in empty.columns


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    dropped: list[int] = []
    w = writer(tmp_path, max_queued_rows=3, on_dropped=dropped.append)
    started = time.perf_counter()
    assert w.submit(time.time(), "a", 1.0, block((1.0, 1.0, "a"), (2.0, 2.0, "b")), np.zeros(2))
    assert not w.submit(time.time(), "b", 1.0, block((1.0, 1.0, "a"), (2.0, 2.0, "b")), np.zeros(2))
    assert time.perf_counter() - started < 0.1
    assert dropped == [2] and w.dropped_rows == 2
    w.start()
    w.close()
    assert w.written_rows == 2


def test_unwritable_directory_drops_and_counts(tmp_path: Path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    dropped: list[int] = []
    w = writer(target, on_dropped=dropped.append)
    w.start()
    w.submit(time.time(), "a", 1.0, block((1.0, 1.0, "a")), np.zeros(1))
    w.close()
    assert dropped == [1] and w.written_rows == 0


def test_readers_never_see_temporary_files_and_read_other_writers(tmp_path: Path) -> None:
    day = tmp_path / "churn" / "date=2026-01-01"
    day.mkdir(parents=True)
    (day / ".part-1-1-0.parquet.tmp").write_bytes(b"half a file")
    at = pd.Timestamp("2026-01-01T12:00:00Z")
    pd.DataFrame(
        {
            "ts": [at],
            "request_id": ["x"],
            "model_name": ["churn"],
            "model_version": ["1"],
            "variant": ["stable"],
            "latency_ms": [1.0],
            "score": [0.5],
            "tenure": [3.0],
            "charges": [None],
            "contract": [None],
        }
    ).to_parquet(day / "part-2-2-0.parquet")
    frame = read_inference_log(
        tmp_path,
        "churn",
        at.to_pydatetime() - timedelta(hours=1),
        at.to_pydatetime() + timedelta(hours=1),
    )
    assert frame["request_id"].tolist() == ["x"]


@pytest.mark.parametrize("n", [2, 257])
def test_block_slices_round_trip_through_the_log(tmp_path: Path, n: int) -> None:
    rows = [(float(i), None if i % 3 else 1.5, None if i % 2 else f"c{i}") for i in range(n)]
    first, second = block(*rows[: n // 2]), block(*rows[n // 2 :])
    w = writer(tmp_path)
    w.start()
    now = time.time()
    w.submit(now, "r", 1.0, first, np.zeros(n // 2))
    w.submit(now, "s", 1.0, second, np.ones(n - n // 2))
    w.close()
    frame = read_inference_log(
        tmp_path,
        "churn",
        datetime.fromtimestamp(now - 5, UTC),
        datetime.fromtimestamp(now + 5, UTC),
    )
    assert frame["tenure"].tolist() == [r[0] for r in rows]
    assert [None if pd.isna(v) else v for v in frame["charges"]] == [r[1] for r in rows]
    assert [None if v is None or pd.isna(v) else v for v in frame["contract"]] == [
        r[2] for r in rows
    ]
