"""The inference log's contract: layout, columns and types, atomic files, bounded queue; the
same layout on a filesystem URI (team mode) read back through the same filesystem."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from models.config import ConfigError, DatasetConfig, config_from_dict, load_config
from services import inference_log
from services.inference_log import InferenceLogWriter, LogStore, read_inference_log
from services.schema import RequestDecoder, RowBlock

pytestmark = pytest.mark.fast

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


def writer(tmp_path: Path | str, **kw: object) -> InferenceLogWriter:
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


def team_config(**serving: object) -> dict[str, object]:
    return {"dataset": DATASET.model_dump(mode="json"), "serving": serving}


def submit_rows(w: InferenceLogWriter, at: datetime, n: int) -> None:
    for i in range(n):
        moment = (at + timedelta(minutes=i)).timestamp()
        w.submit(moment, f"r{i}", 1.0, block((float(i), 2.0, "a")), np.array([0.1 * i]))


def test_a_file_uri_store_is_written_and_read_through_pyarrow(tmp_path: Path) -> None:
    # The shared store stands apart from anything of the serving host's; a space in its name
    # checks that the URI's percent-encoding is honoured.
    shared = tmp_path / "shared store"
    uri = shared.as_uri()
    cfg = config_from_dict(team_config(inference_log_uri=uri))
    assert cfg.inference_log_location() == uri
    w = writer(cfg.inference_log_location())
    assert w.location == f"{uri}/churn"
    w.start()
    at = datetime(2026, 4, 30, 23, 58, tzinfo=UTC)
    submit_rows(w, at, 4)
    assert w.flush(timeout=10)
    w.close()
    assert w.written_rows == 4 and w.dropped_rows == 0 and w.files_written == 2

    files = sorted(p.relative_to(shared) for p in shared.rglob("*") if p.is_file())
    assert [f.parent.as_posix() for f in files] == [
        "churn/date=2026-04-30",
        "churn/date=2026-05-01",
    ]
    assert all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    frame = read_inference_log(uri, "churn", at, at + timedelta(hours=1))
    assert frame["request_id"].tolist() == ["r0", "r1", "r2", "r3"]
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    # The same files read as a local directory: one layout, whichever way it is reached.
    local = read_inference_log(shared, "churn", at, at + timedelta(hours=1))
    pd.testing.assert_frame_equal(frame, local)
    assert read_inference_log(uri, "churn", at, at + timedelta(minutes=2))[
        "request_id"
    ].tolist() == [
        "r0",
        "r1",
    ]
    assert read_inference_log(uri, "nobody", at, at + timedelta(hours=1)).empty


def test_uri_readers_skip_temporary_files_and_other_names(tmp_path: Path) -> None:
    day = tmp_path / "churn" / "date=2026-01-01"
    day.mkdir(parents=True)
    (day / ".part-1-1-0.parquet.tmp").write_bytes(b"half a file")
    (day / "notes.txt").write_text("not a part")
    w = writer(tmp_path.as_uri())
    w.start()
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    submit_rows(w, at, 1)
    w.close()
    frame = read_inference_log(tmp_path.as_uri(), "churn", at, at + timedelta(hours=1))
    assert frame["request_id"].tolist() == ["r0"]
    # The writer left no temporary file of its own beside the planted one.
    assert sorted(p.name for p in day.iterdir() if not p.name.startswith("part-")) == [
        ".part-1-1-0.parquet.tmp",
        "notes.txt",
    ]


class RecordingHandler(pafs.FSSpecHandler):
    """fsspec's in-memory filesystem through pyarrow, recording uploads and renames."""

    def __init__(self) -> None:
        super().__init__(fsspec.filesystem("memory"))
        self.opened: list[str] = []
        self.moves: list[tuple[str, str]] = []

    def open_output_stream(self, path: str, metadata: object) -> object:
        self.opened.append(path)
        return super().open_output_stream(path, metadata)

    def move(self, src: str, dest: str) -> None:
        self.moves.append((src, dest))
        super().move(src, dest)


@pytest.fixture()
def memory_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, RecordingHandler]]:
    """`memory://` URIs open one recording in-memory filesystem (standing in for a store
    pyarrow would reach over the network)."""
    handler = RecordingHandler()
    root = f"/inference-{uuid.uuid4().hex}"
    store = LogStore(pafs.PyFileSystem(handler), root)
    opened: list[str] = []

    def open_store(uri: str) -> LogStore:
        opened.append(uri)
        return store

    monkeypatch.setattr(inference_log, "open_log_store", open_store)
    yield "memory://team/log", handler
    assert opened and set(opened) == {"memory://team/log"}
    handler.fs.rm(root, recursive=True)


def test_an_object_store_gets_each_part_in_one_upload_at_its_final_name(
    memory_store: tuple[str, RecordingHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, handler = memory_store
    monkeypatch.setattr(inference_log, "ATOMIC_PUT_STORES", frozenset({"py::fsspec+memory"}))
    w = writer(uri)
    w.start()
    at = datetime(2026, 6, 1, 8, tzinfo=UTC)
    submit_rows(w, at, 3)
    w.close()
    assert w.written_rows == 3 and handler.moves == []
    assert len(handler.opened) == 1
    final = handler.opened[0]
    assert "/churn/date=2026-06-01/part-" in final and final.endswith(".parquet")
    frame = read_inference_log(uri, "churn", at, at + timedelta(hours=1))
    assert frame["request_id"].tolist() == ["r0", "r1", "r2"]


def test_a_renaming_store_gets_a_temporary_name_then_a_move(
    memory_store: tuple[str, RecordingHandler],
) -> None:
    uri, handler = memory_store
    w = writer(uri)
    w.start()
    at = datetime(2026, 6, 1, 8, tzinfo=UTC)
    submit_rows(w, at, 2)
    w.close()
    assert w.written_rows == 2
    [(tmp, final)] = handler.moves
    assert handler.opened == [tmp]
    assert tmp.rsplit("/", 1)[1] == f".{final.rsplit('/', 1)[1]}.tmp"
    frame = read_inference_log(uri, "churn", at, at + timedelta(hours=1))
    assert frame["request_id"].tolist() == ["r0", "r1"]


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://host/log", "unknown scheme 'ftp'"),
        ("shared/log", "is not a URI"),
        ("file://relative/log", "absolute path"),
        ("s3:///prefix", "names its bucket"),
    ],
)
def test_a_bad_log_uri_is_refused_naming_the_field(uri: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(team_config(inference_log_uri=uri))
    assert "serving.inference_log_uri" in str(err.value) and says in str(err.value)


def test_a_log_dir_and_a_log_uri_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"inference_log_dir .* or serving\.inference_log_uri"):
        config_from_dict(
            team_config(inference_log_dir=str(tmp_path), inference_log_uri=tmp_path.as_uri())
        )


def test_the_log_uri_comes_from_the_file_or_the_environment_unresolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = team_config(inference_log_uri="s3://team-bucket/inference?region=eu-west-1")
    path = tmp_path / "conf" / "mlgate.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.inference_log_location() == "s3://team-bucket/inference?region=eu-west-1"
    monkeypatch.setenv("MLGATE_SERVING__INFERENCE_LOG_URI", "gs://other/log")
    assert load_config(path).inference_log_location() == "gs://other/log"
    # The embedded default is untouched: a relative directory is the file's, as before.
    path.write_text(yaml.safe_dump(team_config(inference_log_dir="logs")))
    monkeypatch.delenv("MLGATE_SERVING__INFERENCE_LOG_URI")
    assert load_config(path).inference_log_location() == (tmp_path / "conf" / "logs").resolve()


def test_a_uri_pyarrow_cannot_open_is_a_clear_error_for_readers_and_dropped_for_writers() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="'nosuch://bucket/log' is not a filesystem URI") as err:
        read_inference_log("nosuch://bucket/log?secret=x", "churn", at, at + timedelta(hours=1))
    assert "secret" not in str(err.value)
    dropped: list[int] = []
    w = writer("nosuch://bucket/log", on_dropped=dropped.append)
    w.start()
    submit_rows(w, at, 2)
    w.close()
    assert dropped == [2] and w.written_rows == 0
