"""Batch scoring of a CSV or Parquet input: its plan in partitions, each partition streamed in
batches, decoded under the service's row rules, scored by the ONNX graph, written as Parquet.

Row rules, those of `POST /predict` (services/schema.py) read for columns of a file: every
feature the model was trained on must be a column of the input, or nothing is scored (a
`DataError` naming them). A missing value is allowed: null, or NaN in a float column. A
numeric feature is a number (integer, float or decimal column), or text that is one (every
CSV column is read as text, and so is a string column in Parquet), finite and within float32
range: the model computes in float32. A categorical feature is text (or an integer, read as
its decimal text, as training reads it) of at most `serving.max_category_chars` characters.
Any other type (a boolean for a number, a float for a category, a date) is refused. A row
with a value a rule refuses is not scored: it goes to the rejects with every reason and its
values, and the output holds exactly the other rows, in input order.

The scored rows go through the service's encoder (`models.onnx_export
.onnx_inputs_from_columns`) into a session built as the service builds it, so a row scores
here what it scores there.

Memory is bounded by the batch, whatever the input's length: a partition (whole Parquet row
groups, of one or more files, or one CSV file) is read a batch at a time, and each scored
batch is appended to the partition's Parquet part at once. The next batch is read and
decoded on a helper thread while ONNX Runtime scores this one (both release the GIL).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.data import DataError
from models.onnx_export import onnx_inputs_from_columns, score_onnx, sha256_bytes
from models.train import MISSING_CATEGORY
from models.tree_graph import open_serving_session

# Rows per ONNX Runtime call; large enough that the call's own cost vanishes, small enough
# that a batch of wide rows stays a few tens of megabytes.
BATCH_ROWS = 65_536
# A partition is whole row groups up to about this many rows: few enough task runs that
# their overhead vanishes, enough partitions for a large input to spread over Dask workers.
PARTITION_ROWS = 1 << 20
# The data gate and PSI drift judge a uniform sample of the scored rows: the whole batch may
# not fit in memory, and shares need no more (a null share's standard error at 20,000 rows
# is at most 0.004, against the gate's tolerance of 0.02). A value too rare to be sampled
# is the row rules' to refuse, not the gates'.
GATE_SAMPLE_ROWS = 20_000

ROW_COLUMN = "row"  # the output's row id when the input has no id column: the ordinal
SCORE_COLUMN = "score"
LABEL_COLUMN = "label"
VERSION_COLUMN = "model_version"
PARQUET_SUFFIXES = (".parquet", ".pq")
REJECTS_SUFFIX = ".rejects.jsonl"
FLOAT32_MAX = float(np.finfo(np.float32).max)

# What a number looks like as text (after trimming spaces); exactly what Arrow's cast
# reads, less its "inf" and "nan".
_NUMBER = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_CSV_BLOCK_BYTES = 16 << 20
_SHOWN_CHARS = 80
_KEY = "__key__"
_SAMPLE_MARGIN = 1.25
_REPEATING = [LABEL_COLUMN, VERSION_COLUMN]  # output columns worth a dictionary page

T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Row groups of one Parquet file, or a whole CSV file (`row_groups` empty)."""

    path: str
    row_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Partition:
    """One unit of work: pieces read in order, its rows numbered from `first_row` (the
    ordinal in the whole input), `rows` of them (None: unknown before reading, CSV), and
    its share of the gate sample."""

    index: int
    pieces: tuple[Piece, ...]
    first_row: int
    rows: int | None
    sample_rows: int


@dataclass(frozen=True)
class BatchLayout:
    """What every partition reads and how it decodes it: the model's features in its order,
    the row id (the configured id column when the input has it, else the ordinal) and the
    type the output gives it."""

    csv: bool
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    id_column: str | None
    id_type: pa.DataType
    max_category_chars: int

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @property
    def columns(self) -> list[str]:
        return [*self.features, *([self.id_column] if self.id_column else [])]

    @property
    def id_name(self) -> str:
        return self.id_column or ROW_COLUMN

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                (self.id_name, self.id_type),
                (SCORE_COLUMN, pa.float64()),
                (LABEL_COLUMN, pa.int8()),
                (VERSION_COLUMN, pa.string()),
            ]
        )

    def sample_schema(self) -> pa.Schema:
        """The gate sample: features as the inference log holds them, and the score."""
        return pa.schema(
            [(c, pa.float64()) for c in self.numeric]
            + [(c, pa.string()) for c in self.categorical]
            + [(SCORE_COLUMN, pa.float64())]
        )


@dataclass(frozen=True)
class BatchPlan:
    """An input cut into partitions, in input order, and how each is read."""

    source: Path
    layout: BatchLayout
    partitions: tuple[Partition, ...]

    @property
    def rows(self) -> int | None:
        """Rows of the whole input, when known before reading it (Parquet)."""
        counts = [p.rows for p in self.partitions]
        return None if None in counts else sum(c for c in counts if c is not None)


@dataclass(frozen=True)
class BatchTarget:
    """The output Parquet file and the rejects file beside it."""

    output: Path
    rejects: Path


@dataclass(frozen=True)
class BatchModel:
    """A registered version's ONNX graph and input schema, as a partition needs it."""

    version: str
    sha256: str
    schema: dict[str, Any]
    content: bytes = field(repr=False)
    # Tree ensembles: the GPU graph, scored with instead where CUDA is really active.
    gpu_content: bytes | None = field(default=None, repr=False)
    gpu_sha256: str | None = None


@dataclass(frozen=True)
class DecodedBatch:
    """One batch: its accepted rows as the model is fed them (`numeric` shaped (features,
    rows), NaN where missing; one object array of labels per categorical feature, a null
    as `MISSING_CATEGORY`), their categorical text with nulls kept (for the gates), their
    ids, and a record per refused row."""

    rows: int
    numeric: np.ndarray
    labels: tuple[np.ndarray, ...]
    text: tuple[pa.Array, ...]
    ids: pa.Array
    rejects: list[dict[str, Any]]

    @property
    def accepted(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PartitionResult:
    """A scored partition: its counts, its Parquet and rejects parts, its gate sample."""

    index: int
    rows: int
    scored: int
    rejected: int
    seconds: float
    output: str
    rejects: str
    sample: pa.Table = field(repr=False)
    graph: str = "cpu"  # which graph scored it: "cpu", or "gpu" (CUDA active)
    provider: str = "CPUExecutionProvider"


def batch_target(output: Path, source: Path) -> BatchTarget:
    """Where a batch is written: `output` (Parquet) and `<stem>.rejects.jsonl` beside it."""
    output = Path(output)
    if output.suffix.lower() not in PARQUET_SUFFIXES:
        raise DataError(f"output {output}: scores are written as Parquet, name it *.parquet")
    if output.is_dir():
        raise DataError(f"output {output} is a directory; name the Parquet file to write")
    resolved, src = output.resolve(), Path(source).resolve()
    if resolved == src or (src.is_dir() and resolved.is_relative_to(src)):
        raise DataError(f"output {output} is inside the input {source}; write it elsewhere")
    return BatchTarget(output, output.with_name(output.stem + REJECTS_SUFFIX))


def plan_batch(
    source: Path,
    schema: dict[str, Any],
    id_column: str | None,
    max_category_chars: int,
    partition_rows: int = PARTITION_ROWS,
    sample_rows: int = GATE_SAMPLE_ROWS,
) -> BatchPlan:
    """The partitions of a CSV file, a Parquet file or a directory of Parquet parts (every
    `*.parquet` / `*.pq` below it in path order, skipping `_`- and `.`-names as Spark and
    Hive write them), checked for the model's features. Only metadata is read."""
    source = Path(source)
    numeric, categorical = tuple(schema["numeric"]), tuple(schema["categorical"])
    if source.is_dir():
        files = parquet_parts(source)
        if not files:
            raise DataError(f"input folder {source} holds no Parquet parts (*.parquet, *.pq)")
    elif not source.is_file():
        raise DataError(f"input {source} not found")
    elif source.suffix.lower() == ".csv":
        header = _csv_header(source)
        _require_features(source, header, (*numeric, *categorical))
        used_id = id_column if id_column in header else None
        layout = BatchLayout(True, numeric, categorical, used_id, pa.string(), max_category_chars)
        only = Partition(0, (Piece(str(source)),), 0, None, sample_rows)
        return BatchPlan(source, layout, (only,))
    elif source.suffix.lower() in PARQUET_SUFFIXES:
        files = [source]
    else:
        raise DataError(
            f"input {source}: unsupported format {source.suffix!r} (CSV, Parquet, or a "
            "folder of Parquet parts)"
        )
    return _plan_parquet(
        source,
        files,
        numeric,
        categorical,
        id_column,
        max_category_chars,
        partition_rows,
        sample_rows,
    )


def parquet_parts(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in PARQUET_SUFFIXES
        and p.is_file()
        and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)
    )


def _csv_header(path: Path) -> list[str]:
    # utf-8-sig: a byte-order mark is not part of the first column's name, as Arrow reads it.
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"input {path} is empty: a CSV input starts with a header row")
    return header


def _require_features(path: Path, names: Sequence[str], features: Sequence[str]) -> None:
    missing = [c for c in features if c not in names]
    if missing:
        raise DataError(
            f"input {path} lacks the model's feature column(s) {', '.join(missing)}; "
            "no row was scored"
        )


def _plan_parquet(
    source: Path,
    files: list[Path],
    numeric: tuple[str, ...],
    categorical: tuple[str, ...],
    id_column: str | None,
    max_category_chars: int,
    partition_rows: int,
    sample_rows: int,
) -> BatchPlan:
    groups: list[tuple[Path, list[int]]] = []
    id_types: list[pa.DataType] = []
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"input part {path} is not a Parquet file: {err}") from None
        names = parquet.schema_arrow.names
        _require_features(path, names, (*numeric, *categorical))
        if id_column in names:
            id_types.append(parquet.schema_arrow.field(id_column).type)
        meta = parquet.metadata
        groups.append((path, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]))
    if id_types and len(id_types) != len(files):
        raise DataError(
            f"id column {id_column!r} is in {len(id_types)} of the {len(files)} Parquet parts "
            f"of {source}: every part needs it, or none (rows are then numbered)"
        )
    chunks = _chunk_row_groups(groups, partition_rows)
    total = sum(rows for _, rows in chunks)
    partitions, first = [], 0
    for i, (pieces, rows) in enumerate(chunks):
        share = math.ceil(sample_rows * rows / total) if total else 0
        partitions.append(Partition(i, tuple(pieces), first, rows, share))
        first += rows
    layout = BatchLayout(
        False,
        numeric,
        categorical,
        id_column if id_types else None,
        _common_id_type(id_types) if id_types else pa.int64(),
        max_category_chars,
    )
    return BatchPlan(source, layout, tuple(partitions))


def _chunk_row_groups(
    groups: list[tuple[Path, list[int]]], partition_rows: int
) -> list[tuple[list[Piece], int]]:
    """Consecutive row groups, across files, in chunks of at least `partition_rows` rows
    (the last one may be smaller); a row group is never split."""
    chunks: list[tuple[list[Piece], int]] = []
    pieces: list[Piece] = []
    rows = 0
    for path, sizes in groups:
        chosen: list[int] = []
        for i, n in enumerate(sizes):
            chosen.append(i)
            rows += n
            if rows >= partition_rows:
                chunks.append(([*pieces, Piece(str(path), tuple(chosen))], rows))
                pieces, chosen, rows = [], [], 0
        if chosen:
            pieces.append(Piece(str(path), tuple(chosen)))
    if pieces:
        chunks.append((pieces, rows))
    return chunks


def _common_id_type(types: list[pa.DataType]) -> pa.DataType:
    plain = [t.value_type if pa.types.is_dictionary(t) else t for t in types]
    return plain[0] if all(t == plain[0] for t in plain) else pa.string()


def read_batches(partition: Partition, layout: BatchLayout, batch_rows: int) -> Iterator[Any]:
    """The partition's record batches, of the layout's columns only, one at a time."""
    for piece in partition.pieces:
        if layout.csv:
            yield from _csv_batches(Path(piece.path), layout)
        else:
            parquet = pq.ParquetFile(piece.path, read_dictionary=_text_columns(piece, layout))
            yield from parquet.iter_batches(
                batch_size=batch_rows, row_groups=list(piece.row_groups), columns=layout.columns
            )


def _text_columns(piece: Piece, layout: BatchLayout) -> list[str]:
    """The categorical features a Parquet file holds as text: read as dictionaries, each
    distinct value is decoded once instead of once per row (four times faster to read, and
    the labels need no hashing)."""
    schema = pq.read_schema(piece.path)
    return [c for c in layout.categorical if _is_text(schema.field(c).type)]


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _csv_batches(path: Path, layout: BatchLayout) -> Iterator[Any]:
    # Every column as text: types guessed from the first block would fail on a later one,
    # and the row rules decide what a value is. Arrow's null markers ("", NA, NaN, null...)
    # are missing values, as pandas reads them for training.
    columns = layout.columns
    convert = pacsv.ConvertOptions(
        column_types=dict.fromkeys(columns, pa.string()),
        include_columns=columns,
        strings_can_be_null=True,
    )
    read = pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES)
    with pacsv.open_csv(path, read_options=read, convert_options=convert) as reader:
        yield from reader


def decode_batch(batch: Any, layout: BatchLayout, first_row: int) -> DecodedBatch:
    """One record batch (`first_row` the ordinal of its first row) under the row rules."""
    n = batch.num_rows
    refused = np.zeros(n, dtype=bool)
    reasons: dict[int, list[str]] = {}

    def refuse(bad: np.ndarray | None, column: pa.Array, why: Callable[[Any], str]) -> None:
        if bad is None or not bad.any():
            return
        where = np.flatnonzero(bad)
        refused[where] = True
        for i, value in zip(where.tolist(), column.take(where).to_pylist(), strict=True):
            reasons.setdefault(i, []).append(why(value))

    numeric = np.empty((len(layout.numeric), n), dtype=np.float64)
    for i, name in enumerate(layout.numeric):
        column = _plain(batch.column(name))
        numeric[i], bad = _numbers(column)
        refuse(bad, column, _number_reason(name, column.type))
    labels, text = [], []
    for name in layout.categorical:
        column = batch.column(name)
        encoded, words, bad = _categories(column, layout.max_category_chars)
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        refuse(bad, column, _category_reason(name, kind, layout.max_category_chars))
        labels.append(encoded)
        text.append(words)
    if layout.id_column:
        ids = pc.cast(_plain(batch.column(layout.id_column)), layout.id_type)
    else:
        ids = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    if not refused.any():
        return DecodedBatch(n, numeric, tuple(labels), tuple(text), ids, [])
    rejects = [_reject(batch, layout, i, first_row, ids, reasons[i]) for i in reasons]
    keep = ~refused
    mask = pa.array(keep)
    return DecodedBatch(
        n,
        numeric[:, keep],
        tuple(column[keep] for column in labels),
        tuple(column.filter(mask) for column in text),
        ids.filter(mask),
        sorted(rejects, key=lambda r: r[ROW_COLUMN]),
    )


def _plain(column: Any) -> Any:
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _numbers(column: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Values as float64 (NaN where missing) and which are refused (None: none)."""
    kind = column.type
    if _is_number_type(kind):
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        # NaN compares False: missing, not refused; infinities are beyond the bound too.
        beyond = np.abs(values) > FLOAT32_MAX
        return values, (beyond if beyond.any() else None)
    if _is_text(kind):
        trimmed = pc.utf8_trim_whitespace(column)
        is_number = pc.fill_null(pc.match_substring_regex(trimmed, _NUMBER), False)
        parsed = pc.if_else(is_number, trimmed, pa.scalar(None, trimmed.type))
        values = pc.cast(parsed, pa.float64()).to_numpy(zero_copy_only=False)
        not_number = pc.and_(column.is_valid(), pc.invert(is_number))
        bad = not_number.to_numpy(zero_copy_only=False) | (np.abs(values) > FLOAT32_MAX)
        return values, (bad if bad.any() else None)
    values = np.full(len(column), np.nan)
    present = column.is_valid().to_numpy(zero_copy_only=False)
    return values, (present if present.any() else None)


def _number_reason(name: str, kind: pa.DataType) -> Callable[[Any], str]:
    def why(value: Any) -> str:
        if isinstance(value, str) and not re.match(_NUMBER, value.strip()):
            return f"{name}: {_shown(value)} is not a number"
        if isinstance(value, str) or _is_number_type(kind):
            return f"{name}: {_shown(value)} is not a finite number within float32 range"
        return f"{name}: {_shown(value)} ({kind}) is not a number"

    return why


def _is_number_type(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def _categories(column: Any, max_chars: int) -> tuple[np.ndarray, pa.Array, np.ndarray | None]:
    """Labels as the model is fed them, the text with nulls kept, and which are refused.
    Each distinct value becomes a Python string once: the labels are references to them."""
    kind = column.type
    if not (pa.types.is_dictionary(kind) and _is_text(kind.value_type)):
        column = _plain(column)
        if pa.types.is_integer(column.type):
            column = pc.cast(column, pa.string())
        if not _is_text(column.type):
            present = column.is_valid().to_numpy(zero_copy_only=False)
            labels = np.full(len(column), MISSING_CATEGORY, dtype=object)
            nulls = pa.nulls(len(column), pa.string())
            return labels, nulls, (present if present.any() else None)
        column = pc.dictionary_encode(column)
    words = column.dictionary
    index = column.indices.fill_null(len(words)).to_numpy(zero_copy_only=False)
    known = np.empty(len(words) + 1, dtype=object)
    known[:-1] = words.to_numpy(zero_copy_only=False)
    known[-1] = MISSING_CATEGORY
    too_long = np.append(
        pc.greater(pc.utf8_length(words), max_chars).to_numpy(zero_copy_only=False), False
    )
    bad = too_long[index] if too_long.any() else None
    return known[index], column, bad


def _category_reason(name: str, kind: pa.DataType, max_chars: int) -> Callable[[Any], str]:
    def why(value: Any) -> str:
        if isinstance(value, str | int) and not isinstance(value, bool):
            return (
                f"{name}: {_shown(value)} is longer than {max_chars} characters "
                "(serving.max_category_chars)"
            )
        return f"{name}: {_shown(value)} ({kind}) is not a category (text)"

    return why


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _reject(
    batch: Any, layout: BatchLayout, i: int, first_row: int, ids: pa.Array, why: list[str]
) -> dict[str, Any]:
    record: dict[str, Any] = {ROW_COLUMN: first_row + i}
    if layout.id_column:
        record[layout.id_column] = _json_value(ids[i].as_py())
    record["reason"] = "; ".join(why)
    record["values"] = {c: _json_value(batch.column(c)[i].as_py()) for c in layout.features}
    return record


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def output_batch(ids: pa.Array, scores: np.ndarray, version: str, layout: BatchLayout) -> Any:
    """The output rows of a batch: id, score, label (1 when score > 0.5, as the service
    answers), model version."""
    return pa.record_batch(
        [
            ids,
            pa.array(scores, pa.float64()),
            pa.array((scores > 0.5).astype(np.int8)),
            pa.repeat(pa.scalar(version, pa.string()), len(scores)),
        ],
        schema=layout.output_schema(),
    )


class GateSample:
    """A uniform sample without replacement of at most `size` accepted rows of a stream,
    with their scores: every row draws a random key and the rows of the `size` smallest
    keys are kept (bottom-k sampling). Seeded, so a partition samples the same rows every
    run."""

    def __init__(
        self, layout: BatchLayout, size: int, seed: int, expected_rows: int | None = None
    ) -> None:
        self._layout = layout
        self._size = size
        self._rng = np.random.default_rng(seed)
        self._tables: list[pa.Table] = []
        self._held = 0
        # With the stream's length known, keys above this bound would almost surely be
        # trimmed away: never taking those rows keeps the sample uniform and its cost low.
        self._threshold = min(1.0, _SAMPLE_MARGIN * size / expected_rows) if expected_rows else 1.0

    def add(self, decoded: DecodedBatch, scores: np.ndarray) -> None:
        if not self._size or not len(scores):
            return
        keys = self._rng.random(len(scores))
        chosen = np.flatnonzero(keys < self._threshold)
        if not chosen.size:
            return
        layout = self._layout
        columns: dict[str, Any] = {
            c: decoded.numeric[i, chosen] for i, c in enumerate(layout.numeric)
        }
        for name, text in zip(layout.categorical, decoded.text, strict=True):
            columns[name] = pc.cast(text.take(pa.array(chosen)), pa.string())
        columns[SCORE_COLUMN] = scores[chosen]
        columns[_KEY] = keys[chosen]
        self._tables.append(pa.table(columns))
        self._held += chosen.size
        if self._held >= 2 * self._size:
            self._trim()

    def _trim(self) -> None:
        table = pa.concat_tables(self._tables)
        if table.num_rows > self._size:
            keys = table.column(_KEY).to_numpy()
            kept = np.argpartition(keys, self._size - 1)[: self._size]
            table = table.take(pa.array(np.sort(kept)))
            self._threshold = float(keys[kept].max())
        self._tables, self._held = [table], table.num_rows

    def table(self) -> pa.Table:
        if not self._tables:
            return self._layout.sample_schema().empty_table()
        self._trim()
        return self._tables[0].drop_columns([_KEY]).cast(self._layout.sample_schema())


def _ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each made on a helper thread while the caller works on the one before."""
    with ThreadPoolExecutor(1, thread_name_prefix="mlgate-batch-read") as pool:
        pending = pool.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item


def _handed_off(items: Iterator[T], consume: Callable[[T], None]) -> None:
    """`consume` each item on a helper thread, in order and one at a time, while the
    caller makes the next."""
    with ThreadPoolExecutor(1, thread_name_prefix="mlgate-batch-write") as pool:
        pending = None
        for item in items:
            if pending is not None:
                pending.result()
            pending = pool.submit(consume, item)
        if pending is not None:
            pending.result()


def _decoded(
    batches: Iterator[Any],
    layout: BatchLayout,
    schema: dict[str, Any],
    first_row: int,
    encode: Callable[..., dict[str, np.ndarray]] = onnx_inputs_from_columns,
) -> Iterator[tuple[DecodedBatch, dict[str, np.ndarray] | None]]:
    for batch in batches:
        decoded = decode_batch(batch, layout, first_row)
        first_row += decoded.rows
        feeds = encode(decoded.numeric, decoded.labels, schema) if decoded.accepted else None
        yield decoded, feeds


class _PartOutput:
    """What one partition keeps of its scored batches: the Parquet part, the rejects part,
    the gate sample and the counts."""

    def __init__(
        self,
        stem: Path,
        layout: BatchLayout,
        version: str,
        sample: GateSample,
        on_batch: Callable[[int], None] | None,
    ) -> None:
        self.output, self.rejects = stem.with_suffix(".parquet"), stem.with_suffix(REJECTS_SUFFIX)
        self.layout, self.version, self.sample, self.on_batch = layout, version, sample, on_batch
        self.rows = self.scored = self.rejected = 0
        self._writer = _writer(self.output, layout)
        self._refused = self.rejects.open("w", encoding="utf-8")

    def keep(self, scored: tuple[DecodedBatch, np.ndarray]) -> None:
        decoded, scores = scored
        if len(scores):
            self._writer.write_batch(output_batch(decoded.ids, scores, self.version, self.layout))
        for record in decoded.rejects:
            self._refused.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.sample.add(decoded, scores)
        self.rows += decoded.rows
        self.scored += len(scores)
        self.rejected += len(decoded.rejects)
        if self.on_batch is not None:
            self.on_batch(decoded.rows)

    def close(self) -> None:
        self._writer.close()
        self._refused.close()


def score_partition(
    partition: Partition,
    layout: BatchLayout,
    model: BatchModel,
    out_dir: str,
    batch_rows: int = BATCH_ROWS,
    on_batch: Callable[[int], None] | None = None,
) -> PartitionResult:
    """Score one partition into `out_dir`: `part-<index>.parquet` (the output rows) and
    `part-<index>.rejects.jsonl` (one JSON object per refused row: its ordinal `row`, its id,
    `reason` and `values`). `on_batch` is told the rows of each batch done.

    Three stages, so that ONNX Runtime is never kept waiting on a 2-core host: a helper
    thread reads and decodes the next batch, this thread scores, another helper writes the
    one before."""
    if sha256_bytes(model.content) != model.sha256:
        raise ValueError(
            f"model version {model.version}: the ONNX bytes handed to partition "
            f"{partition.index} do not match their sha256 {model.sha256}; refusing to score"
        )
    if model.gpu_content is not None and sha256_bytes(model.gpu_content) != model.gpu_sha256:
        raise ValueError(
            f"model version {model.version}: the GPU graph handed to partition "
            f"{partition.index} does not match its sha256 {model.gpu_sha256}; refusing to score"
        )
    session, gpu_encode, choice = open_serving_session(model.content, model.gpu_content)
    sample = GateSample(layout, partition.sample_rows, partition.index, partition.rows)
    started = time.perf_counter()
    decoded = _decoded(
        read_batches(partition, layout, batch_rows),
        layout,
        model.schema,
        partition.first_row,
        gpu_encode or onnx_inputs_from_columns,
    )
    scored = (
        (batch, score_onnx(session, feeds) if feeds is not None else np.empty(0))
        for batch, feeds in _ahead(decoded)
    )
    stem = Path(out_dir) / f"part-{partition.index:05d}"
    part = _PartOutput(stem, layout, model.version, sample, on_batch)
    try:
        _handed_off(scored, part.keep)
    finally:
        part.close()
    return PartitionResult(
        partition.index,
        part.rows,
        part.scored,
        part.rejected,
        time.perf_counter() - started,
        str(part.output),
        str(part.rejects),
        sample.table(),
        graph=choice.graph,
        provider=session.get_providers()[0],
    )


def _writer(path: Path, layout: BatchLayout) -> pq.ParquetWriter:
    # Dictionary pages only where values repeat: for the scores (all distinct) building one
    # until Parquet gives up on it tripled the write time, for a larger file.
    return pq.ParquetWriter(path, layout.output_schema(), use_dictionary=_REPEATING)


def join_parts(
    parts: Sequence[PartitionResult], layout: BatchLayout, target: BatchTarget, staging: Path
) -> None:
    """The parts, in partition order, as the target's output and rejects files: each is
    written in `staging` (beside the target) and moved into place once complete."""
    joined = Path(staging) / "joined.parquet"
    if len(parts) == 1:
        os.replace(parts[0].output, joined)
    else:
        with _writer(joined, layout) as writer:
            for part in parts:
                parquet = pq.ParquetFile(part.output)
                for i in range(parquet.num_row_groups):
                    writer.write_table(parquet.read_row_group(i))
    refused = Path(staging) / "joined.rejects.jsonl"
    with refused.open("wb") as out:
        for part in parts:
            with open(part.rejects, "rb") as f:
                shutil.copyfileobj(f, out)
    target.output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(joined, target.output)
    os.replace(refused, target.rejects)


def join_samples(parts: Sequence[PartitionResult], layout: BatchLayout) -> pa.Table:
    """The partitions' samples as one: each holds its partition's share of the rows."""
    if not parts:
        return layout.sample_schema().empty_table()
    return pa.concat_tables([p.sample for p in parts])
