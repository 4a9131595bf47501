"""The request and response schema of `POST /predict`, generated from the dataset config.

Two validators describe the same schema. msgspec decodes every request (about ten times
faster than the pydantic path on a 1,000-row body) straight into value tuples in feature
order. Only a body it refuses goes to pydantic, whose errors name every offending field with
a type code; pydantic also supplies the OpenAPI document. The tests hold both to the same
answers.

Row rules: every configured feature, required; numbers for numeric features and strings
for categorical ones, strictly (`"3"` or `true` for a number and `3` for a category are
refused, not guessed); NaN, infinities and numbers beyond float32 range (the model computes
in float32) are refused; a missing value is `null`; a categorical value has at most
`serving.max_category_chars` characters (a label, not free text: the bound keeps what one
request costs the worker in proportion to what the model can use of it).

Body rules beyond the schema: UTF-8, as JSON must be (msgspec raises `UnicodeDecodeError`
for a bad byte inside a string, which is not one of its errors: it is caught here and named
a 400); no key twice in one object. JSON leaves a repeated key to the parser: msgspec and
pydantic keep the last value silently, a proxy or a log reader may keep the first. Neither
library reports them, so a decoded body whose colons outnumber its keys (a colon inside a
string, or a key repeated) is read once more by the standard library's parser, whose
`object_pairs_hook` sees every key: the common body pays one `bytes.count` (0.2 ms on
240 KB), a body with colons in its strings a second parse about as long as the first
(3.4 ms against msgspec's 3.2 ms on the same 1,000 rows, measured).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from models.config import DEFAULT_MAX_CATEGORY_CHARS, DatasetConfig

_MAX_ERRORS_SHOWN = 50
# The model computes in float32: a number beyond its range would reach it as infinity.
FLOAT32_MAX = 3.4028234663852886e38
_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


# Requests with at least this many rows get their columns built in the handler; smaller ones
# keep their value tuples until a batch (or an inference log flush) builds the columns of
# many at once: per-request numpy arrays cost more than the rows they hold.
EAGER_ROWS = 64
_COLON = ord(":")
_NUMPY_COUNT_BYTES = 16 * 1024


def _category_labels(values: Sequence[str | None], missing: Sequence[int]) -> np.ndarray:
    """One categorical column as the model is fed it: an object array of the decoded
    strings, null as `MISSING_CATEGORY`. Not `models.onnx_export.category_labels`: its
    fixed-width unicode array gives every row the width of the longest label, so one
    400,000-character label made a 1,000-row request take 1.5 GB; references cost 8 bytes a
    row whatever the labels hold. ONNX Runtime reads either as a string tensor, to the same
    scores (and builds and scores the object array faster, measured on 1,000 rows)."""
    labels = np.array(values, dtype=object)
    if len(missing):
        # Imported on first use, not at import: BentoML's arbiter imports this module, and
        # models.train brings pandas and scikit-learn.
        from models.train import MISSING_CATEGORY

        labels[np.asarray(missing, dtype=np.intp)] = MISSING_CATEGORY
    return labels


def _colons(body: bytes) -> int:
    """How many `:` bytes a body holds. In a large body numpy counts them about ten times
    faster than `bytes.count` (25 against 230 us in a 1,000-row body of 430 kB); in a
    single row's 400 bytes `bytes.count` is the faster (0.2 against 1.2 us)."""
    if len(body) < _NUMPY_COUNT_BYTES:
        return body.count(b":")
    return int(np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == _COLON))


class RowBlock:
    """The rows of a request, or of a batch of requests, for the encoder and the inference
    log: value tuples (numeric features, then categorical ones, in the model's order) and,
    built once when first needed, the same rows by column.

    `numeric` is float64 shaped (numeric features, rows), NaN exactly where the client sent
    null (the schema refuses NaN). `labels` holds one object array of strings per
    categorical feature (null as `MISSING_CATEGORY`, what the model is fed), and `nulls`
    the matching mask of the nulls the client sent, or None when it sent none."""

    __slots__ = ("_labels", "_nulls", "_numeric", "k", "n", "rows")

    def __init__(
        self,
        rows: Sequence[tuple[Any, ...]] | None,
        n: int,
        k: int,
        columns: tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]
        | None = None,
    ) -> None:
        if rows is None and columns is None:
            raise ValueError("a RowBlock needs its rows or its columns")
        self.rows = rows
        self.n = n
        self.k = k
        self._numeric: np.ndarray | None = None
        self._labels: tuple[np.ndarray, ...] | None = None
        self._nulls: tuple[np.ndarray | None, ...] | None = None
        if columns is not None:
            self._numeric, self._labels, self._nulls = columns

    @classmethod
    def from_columns(
        cls,
        numeric: np.ndarray,
        labels: tuple[np.ndarray, ...],
        nulls: tuple[np.ndarray | None, ...],
    ) -> RowBlock:
        return cls(None, numeric.shape[1], numeric.shape[0], (numeric, labels, nulls))

    def __len__(self) -> int:
        return self.n

    @property
    def built(self) -> bool:
        return self._numeric is not None

    def build(self) -> RowBlock:
        if self._numeric is not None:
            return self
        assert self.rows is not None
        n, k = self.n, self.k
        # One transpose in C; None becomes NaN in the float64 block.
        columns = list(zip(*self.rows, strict=True))
        self._numeric = np.array(columns[:k], dtype=np.float64).reshape(k, n)
        labels: list[np.ndarray] = []
        nulls: list[np.ndarray | None] = []
        for column in columns[k:]:
            if column.count(None):
                missing = [i for i, v in enumerate(column) if v is None]
                mask = np.zeros(n, dtype=bool)
                mask[missing] = True
                labels.append(_category_labels(column, missing))
                nulls.append(mask)
            else:
                labels.append(_category_labels(column, ()))
                nulls.append(None)
        self._labels, self._nulls = tuple(labels), tuple(nulls)
        return self

    @property
    def numeric(self) -> np.ndarray:
        self.build()
        assert self._numeric is not None
        return self._numeric

    @property
    def labels(self) -> tuple[np.ndarray, ...]:
        self.build()
        assert self._labels is not None
        return self._labels

    @property
    def nulls(self) -> tuple[np.ndarray | None, ...]:
        self.build()
        assert self._nulls is not None
        return self._nulls

    @staticmethod
    def concat(blocks: Sequence[RowBlock]) -> RowBlock:
        """One block of all rows, in order. Runs of small blocks are joined as value tuples
        and their columns built once for the run (built one by one, thousands of tiny
        arrays would cost more than the rows); large blocks bring the columns they have.
        Joined tuples only, the result builds its columns when first asked."""
        if len(blocks) == 1:
            return blocks[0]
        segments: list[RowBlock] = []
        run: list[RowBlock] = []
        for b in blocks:
            if b.rows is not None and (b.n < EAGER_ROWS or not b.built):
                run.append(b)
                continue
            if run:
                segments.append(_join_rows(run))
                run = []
            segments.append(b)
        if run:
            segments.append(_join_rows(run))
        if len(segments) == 1:
            return segments[0]
        return _join_columns([s.build() for s in segments])


def _join_rows(blocks: Sequence[RowBlock]) -> RowBlock:
    if len(blocks) == 1:
        return blocks[0]
    rows: list[tuple[Any, ...]] = []
    for b in blocks:
        assert b.rows is not None
        rows.extend(b.rows)
    return RowBlock(rows, len(rows), blocks[0].k)


def _join_columns(blocks: Sequence[RowBlock]) -> RowBlock:
    numeric = np.concatenate([b.numeric for b in blocks], axis=1)
    labels = tuple(
        np.concatenate([b.labels[i] for b in blocks]) for i in range(len(blocks[0].labels))
    )
    nulls: list[np.ndarray | None] = []
    for i in range(len(blocks[0].nulls)):
        masks = [b.nulls[i] for b in blocks]
        if all(m is None for m in masks):
            nulls.append(None)
            continue
        filled = [
            np.zeros(b.n, dtype=bool) if m is None else m
            for b, m in zip(blocks, masks, strict=True)
        ]
        nulls.append(np.concatenate(filled))
    return RowBlock.from_columns(numeric, labels, tuple(nulls))


class RequestError(Exception):
    """A request refused before it reached the model: status, the JSON body to send and any
    headers to send with it."""

    def __init__(
        self,
        status: int,
        payload: dict[str, Any],
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(payload.get("error", ""))
        self.status = status
        self.payload = payload
        self.headers = headers


class Prediction(BaseModel):
    score: float = Field(description="probability of the positive class")
    label: int = Field(description="1 when score > 0.5, as scikit-learn's predict")


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, naming each offending field")
    error_count: int | None = None
    detail: list[ErrorDetail] | None = None


class LastKnownGoodInfo(BaseModel):
    """Why the registry was not used at start-up, and when it gave the copy served instead."""

    fetched_at: str
    reason: str


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    sha256: str
    variant: str
    providers: list[str]
    # Which graph serves: "gpu" (a tree ensemble's tensor-op graph, only with CUDA active).
    graph: Literal["cpu", "gpu"] = "cpu"
    numeric_features: list[str]
    categorical_features: list[str]
    # "last_known_good": the registry could not be reached at start-up (see last_known_good).
    source: Literal["registry", "last_known_good"] = "registry"
    last_known_good: LastKnownGoodInfo | None = None
    # The version shadowing this worker's model (`mlgate shadow start`), with its row counts:
    # version, scored_rows, dropped_rows, failed_rows, queued_rows.
    shadow: dict[str, Any] | None = None


def make_row_model(
    dataset: DatasetConfig, max_category_chars: int = DEFAULT_MAX_CATEGORY_CHARS
) -> type[BaseModel]:
    """One input row: every configured feature, required, null allowed (the pipeline
    imputes numeric nulls and treats categorical nulls as a category of their own)."""
    fields: dict[str, Any] = {}
    for col in dataset.numeric_features:
        fields[col] = (float | None, Field(..., ge=-FLOAT32_MAX, le=FLOAT32_MAX))
    label = Annotated[str, Field(max_length=max_category_chars)]
    for col in dataset.categorical_features:
        fields[col] = (label | None, Field(...))
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    row: type[BaseModel] = create_model("Row", __config__=config, **fields)
    return row


def make_request_model(row_model: type[BaseModel], max_rows: int) -> type[BaseModel]:
    config = ConfigDict(extra="forbid", strict=True)
    request: type[BaseModel] = create_model(
        "PredictRequest",
        __config__=config,
        rows=(list[row_model], Field(..., min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
    )
    return request


def request_openapi_schema(
    dataset: DatasetConfig, max_rows: int, max_category_chars: int = DEFAULT_MAX_CATEGORY_CHARS
) -> dict[str, Any]:
    """The request body schema with the row schema inlined (no `$ref` for a client to
    chase)."""
    row_model = make_row_model(dataset, max_category_chars)
    schema = make_request_model(row_model, max_rows).model_json_schema()
    schema.pop("$defs", None)
    schema["properties"]["rows"]["items"] = row_model.model_json_schema()
    return schema


def _error_body(message: str, err: ValidationError) -> dict[str, Any]:
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    shown = errors[:_MAX_ERRORS_SHOWN]
    fields = list(dict.fromkeys(".".join(str(p) for p in e["loc"]) for e in shown if e["loc"]))
    return {
        "error": f"{message}: {', '.join(fields)}" if fields else message,
        "error_count": len(errors),
        "detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in shown],
    }


def classify_validation_error(err: ValidationError) -> tuple[int, dict[str, Any]]:
    """Malformed JSON is a 400, too many rows a 413, anything else about the body a 422;
    the body names each offending field as a dotted path (`rows.0.tenure`)."""
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, _error_body("request body is not valid JSON", err)
    for e in errors:
        if e["type"] == "too_long" and tuple(e["loc"]) == ("rows",):
            ctx = e.get("ctx", {})
            message = (
                f"{ctx.get('actual_length', 'too many')} rows in one request, "
                f"at most {ctx.get('max_length')} allowed"
            )
            return 413, {"error": message}
    return 422, _error_body("invalid request", err)


def _utf8_error(body: bytes) -> RequestError | None:
    """A 400 naming the first byte that is not UTF-8, or None when the body is UTF-8."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return RequestError(
            400,
            {
                "error": (
                    f"request body is not valid JSON: not valid UTF-8 at byte {err.start} "
                    f"(0x{body[err.start]:02x}: {err.reason}); JSON text must be UTF-8"
                )
            },
        )
    return None


class _RepeatedKey(Exception):
    def __init__(self, loc: list[str | int]) -> None:
        super().__init__(loc)
        self.loc = loc


def find_repeated_key(body: bytes, features: Sequence[str]) -> list[str | int] | None:
    """Where a JSON body names one key twice in an object (`["rows", 3, "tenure"]`, or
    `["rows"]` for the request's own key), or None when no key repeats or the body is not
    JSON the standard library reads. For bodies the schema accepted: rows are flat objects,
    so the parser closes them in order, each before the request object."""
    closed_rows = 0
    known = frozenset(features)

    def check(pairs: list[tuple[str, Any]]) -> None:
        nonlocal closed_rows
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(["rows", closed_rows, key] if key in known else [key])
            seen.add(key)
        closed_rows += 1

    loc: list[str | int] | None = _first_repeated(body, check)
    return loc


def _first_repeated(body: bytes, check: Callable[[list[tuple[str, Any]]], Any]) -> Any:
    """Parse `body` with `check` on every object's pairs: the place of the repeated key it
    raised, or None when none repeats or the body is not JSON the standard library reads."""
    try:
        json.loads(body, object_pairs_hook=check)
    except _RepeatedKey as repeated:
        return repeated.loc
    except (ValueError, RecursionError):
        return None
    return None


def _repeated_key_error(loc: list[str | int]) -> RequestError:
    field = ".".join(str(p) for p in loc)
    return RequestError(
        422,
        {
            "error": f"invalid request: duplicate key {field}",
            "error_count": 1,
            "detail": [
                {
                    "loc": loc,
                    "msg": (
                        "key given twice in one object; parsers disagree on which value "
                        "counts, so neither is used"
                    ),
                    "type": "duplicate_key",
                }
            ],
        },
    )


def _msgspec_error(err: Exception) -> RequestError:
    """The fallback when pydantic accepts what msgspec refused (a number beyond float
    range, an escape pydantic reads differently): msgspec's message, its path dotted.
    msgspec's ValidationError is a DecodeError too: only the others are about the JSON."""
    text = str(err)
    if not isinstance(err, msgspec.ValidationError):
        return RequestError(400, {"error": f"request body is not valid JSON: {text}"})
    match = _MSGSPEC_PATH.search(text)
    loc: list[str | int] = []
    if match:
        for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", match.group("path")):
            loc.append(part[0] if part[0] else int(part[1]))
    field = ".".join(str(p) for p in loc)
    message = text[: match.start()] if match else text
    return RequestError(
        422,
        {
            "error": f"invalid request: {field}" if field else f"invalid request: {message}",
            "error_count": 1,
            "detail": [{"loc": loc, "msg": message, "type": "invalid"}],
        },
    )


class RequestDecoder:
    """Bytes of a `/predict` body to a `RowBlock` in the model's feature order, or a
    `RequestError`."""

    def __init__(
        self,
        dataset: DatasetConfig,
        numeric: Sequence[str],
        categorical: Sequence[str],
        max_rows: int,
        max_category_chars: int = DEFAULT_MAX_CATEGORY_CHARS,
    ) -> None:
        if sorted(numeric) != sorted(dataset.numeric_features) or sorted(categorical) != sorted(
            dataset.categorical_features
        ):
            raise ValueError("the decoder's feature order must cover the dataset's features")
        self.order = (*numeric, *categorical)
        # Positional field names, renamed to the features: a feature need not be a valid
        # Python identifier.
        names = [f"f{i}" for i in range(len(self.order))]
        number = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
        label = Annotated[str, msgspec.Meta(max_length=max_category_chars)]
        types: list[Any] = [number | None] * len(numeric) + [label | None] * len(categorical)
        # gc=False: a 1,000-row body makes 1,000 of them, and they hold no references
        # that could form a cycle.
        row = msgspec.defstruct(
            "Row",
            list(zip(names, types, strict=True)),
            forbid_unknown_fields=True,
            rename=dict(zip(names, self.order, strict=True)),
            gc=False,
        )
        rows_type = Annotated[list[row], msgspec.Meta(min_length=1, max_length=max_rows)]  # type: ignore[valid-type]
        request = msgspec.defstruct(
            "PredictRequest", [("rows", rows_type)], forbid_unknown_fields=True
        )
        self._decoder = msgspec.json.Decoder(request)
        self._astuple = msgspec.structs.astuple
        self._rows = operator.attrgetter("rows")
        self._request_model = make_request_model(
            make_row_model(dataset, max_category_chars), max_rows
        )
        self._k = len(numeric)

    def decode(self, body: bytes) -> RowBlock:
        try:
            request = self._decoder.decode(body)
        except (msgspec.MsgspecError, UnicodeDecodeError) as err:
            raise self._explain(body, err) from None
        astuple = self._astuple
        rows = [astuple(r) for r in self._rows(request)]
        # Every feature once per row and `rows` once: as many keys, so as many colons,
        # unless a colon is inside a string or a key repeats.
        if _colons(body) != len(rows) * len(self.order) + 1:
            repeated = find_repeated_key(body, self.order)
            if repeated is not None:
                raise _repeated_key_error(repeated)
        block = RowBlock(rows, len(rows), self._k)
        return block.build() if len(rows) >= EAGER_ROWS else block

    def _explain(self, body: bytes, err: Exception) -> RequestError:
        not_utf8 = _utf8_error(body)
        if not_utf8 is not None:
            return not_utf8
        try:
            self._request_model.model_validate_json(body)
        except ValidationError as detailed:
            status, payload = classify_validation_error(detailed)
            return RequestError(status, payload)
        # pydantic keeps the last of a repeated key, msgspec checks every value.
        repeated = find_repeated_key(body, self.order)
        if repeated is not None:
            return _repeated_key_error(repeated)
        return _msgspec_error(err)


# Media types of the columnar bodies (README "Bulk requests"); JSON rows are the default.
ARROW_STREAM = "application/vnd.apache.arrow.stream"
COLUMNS_JSON = "application/vnd.mlgate.columns+json"


def _columnar_error(loc: list[str | int], message: str, kind: str) -> RequestError:
    field = ".".join(str(p) for p in loc)
    return RequestError(
        422,
        {
            "error": f"invalid request: {field}: {message}" if field else message,
            "error_count": 1,
            "detail": [{"loc": loc, "msg": message, "type": kind}],
        },
    )


class ColumnarDecoder:
    """Columnar bodies of `/predict` to a `RowBlock` built by column, or a `RequestError`:
    an Arrow IPC stream (one or more record batches) or `{"columns": {feature: [values]}}`.

    The same rules as JSON rows, checked over whole arrays rather than row by row (that is
    the speed of the columnar path): every feature, no other column; numbers for numeric
    features (Arrow: integer or floating types; JSON: numbers, not strings or booleans),
    strings for categorical ones; null for a missing value; NaN, infinities and numbers
    beyond float32 range refused; labels of at most `max_category_chars` characters; between
    one and `max_rows` rows. An error names the column and, for a value, its row
    (`columns.tenure.3`). The block holds the same float64 and object arrays the row path
    builds, so the encoder and the scores are the same."""

    def __init__(
        self,
        numeric: Sequence[str],
        categorical: Sequence[str],
        max_rows: int,
        max_category_chars: int = DEFAULT_MAX_CATEGORY_CHARS,
    ) -> None:
        self.numeric = tuple(numeric)
        self.categorical = tuple(categorical)
        self.order = (*self.numeric, *self.categorical)
        self.max_rows = max_rows
        self.max_category_chars = max_category_chars
        names = [f"f{i}" for i in range(len(self.order))]
        number = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
        label = Annotated[str, msgspec.Meta(max_length=max_category_chars)]
        types: list[Any] = [list[number | None]] * len(self.numeric) + [list[label | None]] * len(
            self.categorical
        )
        columns = msgspec.defstruct(
            "Columns",
            list(zip(names, types, strict=True)),
            forbid_unknown_fields=True,
            rename=dict(zip(names, self.order, strict=True)),
        )
        request = msgspec.defstruct(
            "ColumnarRequest", [("columns", columns)], forbid_unknown_fields=True
        )
        self._json = msgspec.json.Decoder(request)

    # --- columnar JSON ---------------------------------------------------------------------

    def decode_json(self, body: bytes) -> RowBlock:
        try:
            request = self._json.decode(body)
        except (msgspec.MsgspecError, UnicodeDecodeError) as err:
            raise self._explain_json(body, err) from None
        # The feature keys, `columns` and the request's: as many colons unless a string
        # holds one or a key repeats (see the module docstring).
        if _colons(body) != len(self.order) + 1:
            repeated = _repeated_column(body)
            if repeated is not None:
                raise _repeated_key_error(repeated)
        values = msgspec.structs.astuple(operator.attrgetter("columns")(request))
        self._check_lengths([len(v) for v in values])
        k = len(self.numeric)
        numeric = np.array(values[:k], dtype=np.float64).reshape(k, len(values[0]))
        pairs = [_labels_of(np.array(v, dtype=object)) for v in values[k:]]
        return RowBlock.from_columns(
            numeric, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        )

    def _explain_json(self, body: bytes, err: Exception) -> RequestError:
        not_utf8 = _utf8_error(body)
        if not_utf8 is not None:
            return not_utf8
        if not isinstance(err, msgspec.ValidationError):
            return RequestError(400, {"error": f"request body is not valid JSON: {err}"})
        text = str(err)
        match = _MSGSPEC_PATH.search(text)
        loc: list[str | int] = []
        if match:
            for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", match.group("path")):
                loc.append(part[0] if part[0] else int(part[1]))
        message = text[: match.start()] if match else text
        return _columnar_error(loc, message, "invalid")

    def _check_lengths(self, lengths: Sequence[int]) -> None:
        n = lengths[0] if lengths else 0
        for name, length in zip(self.order, lengths, strict=True):
            if length != n:
                raise _columnar_error(
                    ["columns", name],
                    f"{length} values where {self.order[0]} has {n}; every column needs one "
                    "value per row",
                    "length_mismatch",
                )
        if n == 0:
            raise _columnar_error(["columns"], "no rows: send at least one", "too_short")
        if n > self.max_rows:
            raise RequestError(
                413, {"error": f"{n} rows in one request, at most {self.max_rows} allowed"}
            )

    # --- Arrow IPC stream ------------------------------------------------------------------

    def decode_arrow(self, body: bytes) -> RowBlock:
        import pyarrow as pa

        try:
            table = pa.ipc.open_stream(body).read_all()
        except (pa.ArrowException, ValueError, OSError) as err:
            raise RequestError(
                400, {"error": f"request body is not an Arrow IPC stream: {err}"}
            ) from None
        names = table.column_names
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise _columnar_error(["columns", name], "column given twice", "duplicate_key")
            seen.add(name)
            if name not in self.order:
                raise _columnar_error(
                    ["columns", name],
                    f"unknown column; the model's features are {', '.join(self.order)}",
                    "extra_forbidden",
                )
        for name in self.order:
            if name not in seen:
                raise _columnar_error(["columns", name], "column missing", "missing")
        self._check_lengths([table.num_rows] * len(self.order))
        numeric = np.empty((len(self.numeric), table.num_rows), dtype=np.float64)
        for i, name in enumerate(self.numeric):
            numeric[i] = self._arrow_numbers(name, table.column(name))
        pairs = [self._arrow_labels(name, table.column(name)) for name in self.categorical]
        return RowBlock.from_columns(
            numeric, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        )

    def _arrow_numbers(self, name: str, column: Any) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise _columnar_error(
                ["columns", name],
                f"Arrow type {kind} refused; a numeric feature takes integer or floating "
                "values (null for missing)",
                "float_type",
            )
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        # NaN (or infinity) where Arrow holds a value: null is the missing value, NaN is not.
        valid = (
            np.ones(len(values), dtype=bool)
            if column.null_count == 0
            else pc.is_valid(column).to_numpy(zero_copy_only=False)
        )
        bad = valid & ~(np.abs(values) <= FLOAT32_MAX)
        if bad.any():
            row = int(np.argmax(bad))
            raise _columnar_error(
                ["columns", name, row],
                f"{values[row]!r} refused: NaN, infinity or beyond float32 range (send null "
                "for a missing value)",
                "finite_number",
            )
        return values

    def _arrow_labels(self, name: str, column: Any) -> tuple[np.ndarray, np.ndarray | None]:
        import pyarrow as pa
        import pyarrow.compute as pc

        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
            kind = column.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise _columnar_error(
                ["columns", name],
                f"Arrow type {kind} refused; a categorical feature takes string values "
                "(null for missing)",
                "string_type",
            )
        lengths = pc.utf8_length(column).to_numpy(zero_copy_only=False)
        too_long = np.nan_to_num(lengths, nan=0) > self.max_category_chars
        if too_long.any():
            row = int(np.argmax(too_long))
            raise _columnar_error(
                ["columns", name, row],
                f"String should have at most {self.max_category_chars} characters",
                "string_too_long",
            )
        values = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
        # Arrow counts its nulls: without any, no element-wise search for None.
        return (values, None) if column.null_count == 0 else _labels_of(values)


def _labels_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """An object array of strings and None to the model's labels and the nulls mask."""
    mask = values == None  # noqa: E711 (element-wise on an object array)
    if not mask.any():
        return values, None
    from models.train import MISSING_CATEGORY

    values = values.copy()
    values[mask] = MISSING_CATEGORY
    return values, mask


def _repeated_column(body: bytes) -> list[str | int] | None:
    """Where a columnar JSON body names a key twice (`["columns", "tenure"]`), or None."""

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(["columns", key] if key != "columns" else [key])
            seen.add(key)
        return dict(pairs)

    loc: list[str | int] | None = _first_repeated(body, check)
    return loc
