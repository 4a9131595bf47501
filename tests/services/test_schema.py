"""Two validators, one schema: the fast msgspec decoder and the pydantic model (which names
every error and feeds the OpenAPI document) accept and refuse the same bodies."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def decoder() -> RequestDecoder:
    # The model's order may differ from the config's.
    return RequestDecoder(DATASET, ["b", "a"], ["p"], MAX_ROWS)


def pydantic_accepts(body: bytes) -> bool:
    try:
        make_request_model(make_row_model(DATASET), MAX_ROWS).model_validate_json(body)
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
