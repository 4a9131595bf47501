"""Two validators, one schema: the fast msgspec decoder and the pydantic model (which names
every error and feeds the OpenAPI document) accept and refuse the same bodies."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.config import DatasetConfig
from models.train import MISSING_CATEGORY
from services.schema import (
    FLOAT32_MAX,
    ColumnarDecoder,
    RequestDecoder,
    RequestError,
    RowBlock,
    make_request_model,
    make_row_model,
)

pytestmark = pytest.mark.fast

DATASET = DatasetConfig(
    path="unused.parquet",
    target="y",
    numeric_features=("a", "b"),
    categorical_features=("p",),
)
MAX_ROWS = 5
# Shorter than the longest text hypothesis draws, so that it finds bodies over the bound.
MAX_CHARS = 4


@pytest.fixture(scope="module")
def decoder() -> RequestDecoder:
    # The model's order may differ from the config's.
    return RequestDecoder(DATASET, ["b", "a"], ["p"], MAX_ROWS, max_category_chars=MAX_CHARS)


def pydantic_accepts(body: bytes) -> bool:
    try:
        make_request_model(make_row_model(DATASET, MAX_CHARS), MAX_ROWS).model_validate_json(body)
    except ValidationError:
        return False
    return True


def decode(decoder: RequestDecoder, body: bytes) -> RowBlock | RequestError:
    try:
        return decoder.decode(body)
    except RequestError as err:
        return err


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.none(), max_size=1),
)
row = st.dictionaries(st.sampled_from(["a", "b", "p", "x"]), values, max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row, max_size=MAX_ROWS + 1))
def test_both_validators_agree_on_every_body(decoder: RequestDecoder, rows: list[Any]) -> None:
    body = json.dumps({"rows": rows}).encode()
    result = decode(decoder, body)
    assert isinstance(result, RowBlock) == pydantic_accepts(body), (body, result)
    if isinstance(result, RequestError):
        assert result.status in (413, 422)
        assert result.payload["error"]


def test_decoded_block_holds_columns_in_the_model_order(decoder: RequestDecoder) -> None:
    body = b'{"rows": [{"a": 1, "b": 2.5, "p": "x"}, {"a": null, "b": 0, "p": null}]}'
    block = decoder.decode(body)
    assert block.n == 2
    np.testing.assert_array_equal(block.numeric, [[2.5, 0.0], [1.0, np.nan]])
    assert block.labels[0].tolist() == ["x", MISSING_CATEGORY]
    assert block.nulls[0] is not None and block.nulls[0].tolist() == [False, True]
    again = decoder.decode(body)
    assert not again.built  # small requests keep their tuples until a batch needs columns
    joined = RowBlock.concat([again, decoder.decode(body).build()])
    assert joined.labels[0].tolist() == ["x", MISSING_CATEGORY, "x", MISSING_CATEGORY]
    assert joined.numeric[0].tolist() == [2.5, 0.0, 2.5, 0.0]
    fresh = decoder.decode(body)
    joined_rows = RowBlock.concat([fresh, fresh])
    assert not joined_rows.built and joined_rows.rows == [*fresh.rows, *fresh.rows]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        (b'{"rows": [{"a": 1, "b": 2,', 400, "JSON"),
        (b"", 400, "JSON"),
        (b"[1, 2]", 422, "invalid request"),
        (b'{"rows": []}', 422, "rows"),
        (b'{"rows": [{"a": NaN, "b": 1, "p": null}]}', 422, "rows.0.a"),
        (b'{"rows": [{"a": 1e39, "b": 1, "p": null}]}', 422, "rows.0.a"),
        (b'{"rows": [{"a": 1e400, "b": 1, "p": null}]}', 422, "rows.0.a"),
        (b'{"rows": [{"a": 1, "b": true, "p": null}]}', 422, "rows.0.b"),
        (b'{"rows": [{"a": 1, "b": 1, "p": 3}]}', 422, "rows.0.p"),
        (b'{"rows": [{"a": 1, "b": 1}]}', 422, "rows.0.p"),
        (b'{"rows": [{"a": 1, "b": 1, "p": null, "z": 1}]}', 422, "rows.0.z"),
        (b'{"rows": [{"a": 1, "b": 1, "p": null}], "extra": 1}', 422, "extra"),
        (b'{"rows": [' + b",".join([b'{"a":1,"b":1,"p":null}'] * 6) + b"]}", 413, "at most 5"),
    ],
)
def test_refusals_name_the_problem(
    decoder: RequestDecoder, body: bytes, status: int, named: str
) -> None:
    with pytest.raises(RequestError) as info:
        decoder.decode(body)
    assert info.value.status == status
    assert named in info.value.payload["error"]


def test_float32_bound_is_inclusive(decoder: RequestDecoder) -> None:
    body = json.dumps({"rows": [{"a": FLOAT32_MAX, "b": -FLOAT32_MAX, "p": "x"}]}).encode()
    assert decoder.decode(body).n == 1


def test_concat_keeps_row_order_across_small_and_large_blocks() -> None:
    decoder = RequestDecoder(DATASET, ["a", "b"], ["p"], 1000)

    def block(values: list[tuple[float | None, str | None]]) -> RowBlock:
        rows = [{"a": a, "b": 0.0, "p": p} for a, p in values]
        return decoder.decode(json.dumps({"rows": rows}).encode())

    large = [(float(i), f"c{i}") for i in range(100)]
    parts = [block([(1.0, "x")]), block(large), block([(None, None)]).build(), block([(2.0, "y")])]
    joined = RowBlock.concat(parts)
    expected = [(1.0, "x"), *large, (None, None), (2.0, "y")]
    assert joined.n == len(expected)
    got_a = [None if np.isnan(v) else v for v in joined.numeric[0].tolist()]
    assert got_a == [a for a, _ in expected]
    nulls = joined.nulls[0]
    assert nulls is not None
    assert [None if m else v for v, m in zip(joined.labels[0].tolist(), nulls, strict=True)] == [
        p for _, p in expected
    ]


# Hostile bodies: invalid UTF-8, duplicated keys, categories longer than the bound.


@pytest.mark.parametrize(
    ("body", "offset"),
    [
        (b'{"rows": [{"\xff": 1}]}', 12),
        (b'{"rows": [{"a": 1, "b": 1, "p": "ok\xff"}]}', 35),
        (b'{"rows": [{"a": 1, "b": 1, "p": "\xc3"}]}', 33),
        (b'{"rows": [{"a": 1, "b": 1, "p": null}]}\xff', 39),
    ],
    ids=["in-a-key", "in-a-value", "truncated-sequence", "outside-strings"],
)
def test_invalid_utf8_is_a_400_naming_it(decoder: RequestDecoder, body: bytes, offset: int) -> None:
    with pytest.raises(RequestError) as info:
        decoder.decode(body)
    assert info.value.status == 400
    message = info.value.payload["error"]
    assert "not valid UTF-8" in message and "JSON" in message
    assert f"at byte {offset}" in message


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"rows": [{"a": 1, "b": 1, "p": "x", "p": "y"}]}', "rows.0.p"),
        (b'{"rows": [{"a": 1, "b": 1, "p": "x"}, {"a": 1, "b": 1, "a": 2, "p": "x"}]}', "rows.1.a"),
        # The first value is refused by msgspec, the last accepted by pydantic.
        (b'{"rows": [{"a": 1, "b": 1, "p": 3, "p": "y"}]}', "rows.0.p"),
        (b'{"rows": [{"a": 1, "b": 1, "p": "x"}], "rows": [{"a": 1, "b": 1, "p": "x"}]}', "rows"),
    ],
    ids=["value", "second-row", "first-value-invalid", "top-level"],
)
def test_duplicated_key_is_a_422_naming_it(
    decoder: RequestDecoder, body: bytes, named: str
) -> None:
    with pytest.raises(RequestError) as info:
        decoder.decode(body)
    assert info.value.status == 422
    message = info.value.payload["error"]
    assert "duplicate" in message and named in message
    assert "JSON" not in message
    assert info.value.payload["detail"][0]["type"] == "duplicate_key"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"columns": {"a": [1], "b": [1], "a": [2], "p": ["x"]}}', "columns.a"),
        (
            b'{"columns": {"a": [1], "b": [1], "p": ["x"]}, '
            b'"columns": {"a": [2], "b": [2], "p": ["y"]}}',
            "columns",
        ),
    ],
    ids=["column", "top-level"],
)
def test_a_repeated_column_is_a_422_naming_it(body: bytes, named: str) -> None:
    columnar = ColumnarDecoder(["a", "b"], ["p"], MAX_ROWS)
    assert columnar.decode_json(b'{"columns": {"a": [1], "b": [1], "p": ["a:b"]}}').n == 1
    with pytest.raises(RequestError) as info:
        columnar.decode_json(body)
    assert info.value.status == 422
    assert f"duplicate key {named}" in info.value.payload["error"]
    assert info.value.payload["detail"][0]["type"] == "duplicate_key"


def test_a_duplicated_key_in_a_large_body_is_a_422_naming_it() -> None:
    """Bodies of 16 kB and more have their colons counted another way (numpy)."""
    decoder = RequestDecoder(DATASET, ["b", "a"], ["p"], 1000, max_category_chars=MAX_CHARS)
    row = b'{"a": 1, "b": 1, "p": "x"}'
    rows = [row] * 999 + [b'{"a": 1, "b": 1, "p": "x", "b": 2}']
    body = b'{"rows": [' + b", ".join(rows) + b"]}"
    assert len(body) > 16 * 1024
    assert decoder.decode(body.replace(b', "b": 2}', b"}")).n == 1000
    with pytest.raises(RequestError) as info:
        decoder.decode(body)
    assert info.value.status == 422
    assert "rows.999.b" in info.value.payload["error"]


def test_colons_inside_strings_are_not_taken_for_duplicates(decoder: RequestDecoder) -> None:
    block = decoder.decode(b'{"rows": [{"a": 1, "b": 1, "p": "a:b"}, {"a": 2, "b": 1, "p": ":"}]}')
    assert block.build().labels[0].tolist() == ["a:b", ":"]


def test_category_longer_than_the_bound_is_a_422_naming_the_field(
    decoder: RequestDecoder,
) -> None:
    at_bound = {"a": 1, "b": 1, "p": "é" * MAX_CHARS}
    assert decoder.decode(json.dumps({"rows": [at_bound]}).encode()).n == 1
    over = json.dumps({"rows": [at_bound, at_bound | {"p": "x" * (MAX_CHARS + 1)}]}).encode()
    assert not pydantic_accepts(over)
    with pytest.raises(RequestError) as info:
        decoder.decode(over)
    assert info.value.status == 422
    assert "rows.1.p" in info.value.payload["error"]
    assert info.value.payload["detail"][0]["type"] == "string_too_long"
    assert f"at most {MAX_CHARS} characters" in info.value.payload["detail"][0]["msg"]


def traced_peak(work: Callable[[], object]) -> int:
    """The peak of Python and numpy allocations while `work` runs, in bytes."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_encoder_memory_follows_the_request_not_rows_times_the_longest_label() -> None:
    """The worst case of the issue, scaled down: 1,000 rows, one label of 40,000 characters.
    As fixed-width unicode every row took the longest label's width (160 MB here, 1.6 GB for
    400,000 characters); as references to the decoded strings, the columns cost what the
    rows do, whatever the bound in the config."""
    n, long_label = 1000, "m" * 40_000
    rows = [(float(i), 1.0, long_label if i == 500 else ("x" if i % 3 else None)) for i in range(n)]
    request_bytes = len(long_label) + 64 * n

    peak = traced_peak(lambda: RowBlock(rows, n, 2).build())
    assert peak < request_bytes, f"{peak} bytes traced building one request's columns"

    # A batch: small requests joined (tuples), then one built block, joined by column.
    small = [RowBlock(rows[i : i + 10], 10, 2) for i in range(0, 500, 10)]
    large = RowBlock(rows[500:], 500, 2).build()
    peak = traced_peak(lambda: RowBlock.concat([*small, large]).labels)
    assert peak < request_bytes, f"{peak} bytes traced joining a batch"

    block = RowBlock.concat([*small, large])
    labels = block.labels[0]
    assert labels.dtype == object
    assert labels[500] is long_label
    assert labels[0] == MISSING_CATEGORY and labels[1] == "x"
    nulls = block.nulls[0]
    assert nulls is not None and nulls[:4].tolist() == [True, False, False, True]
