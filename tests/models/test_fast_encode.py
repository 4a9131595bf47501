"""The pandas-free encoder gives exactly the ONNX inputs of `prepare_features` +
`onnx_inputs_from_frame`: same names, dtypes, shapes and values, for any rows a JSON body
can hold (numbers of any size float64 holds, nulls, any strings), and it scores the same."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import DatasetConfig
from models.onnx_export import (
    category_labels,
    export_onnx,
    input_schema,
    make_session,
    onnx_inputs_from_columns,
    onnx_inputs_from_frame,
    onnx_inputs_from_rows,
    score_onnx,
)
from models.train import MISSING_CATEGORY, prepare_features, train_model

pytestmark = pytest.mark.fast

numbers = st.one_of(
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**53), max_value=2**53),
)
labels = st.one_of(
    st.none(), st.text(max_size=12), st.sampled_from(["Yes", "No", MISSING_CATEGORY])
)


def reference_feeds(rows: list[tuple[Any, ...]], dataset: DatasetConfig) -> dict[str, np.ndarray]:
    columns = [*dataset.numeric_features, *dataset.categorical_features]
    frame = pd.DataFrame([dict(zip(columns, r, strict=True)) for r in rows], columns=columns)
    return onnx_inputs_from_frame(prepare_features(frame, dataset), input_schema(dataset))


def assert_same_feeds(fast: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert fast.keys() == reference.keys()
    for name, expected in reference.items():
        got = fast[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        if expected.dtype.kind == "f":
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            assert got.tolist() == expected.tolist(), name


@pytest.fixture(scope="module")
def small_dataset() -> DatasetConfig:
    return DatasetConfig(
        path="unused.parquet",
        target="y",
        numeric_features=("a", "b", "c"),
        categorical_features=("p", "q"),
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(numbers, numbers, numbers, labels, labels),
        min_size=1,
        max_size=40,
    )
)
def test_rows_encode_exactly_as_the_pandas_path(
    small_dataset: DatasetConfig, rows: list[tuple[Any, ...]]
) -> None:
    schema = input_schema(small_dataset)
    assert_same_feeds(onnx_inputs_from_rows(rows, schema), reference_feeds(rows, small_dataset))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(labels, min_size=1, max_size=10), min_size=1, max_size=5))
def test_label_arrays_of_parts_concatenate_to_the_whole(parts: list[list[Any]]) -> None:
    whole = category_labels([v for part in parts for v in part])
    joined = np.concatenate([category_labels(part) for part in parts])
    assert joined.dtype == whole.dtype
    assert joined.tolist() == whole.tolist()


def test_known_missing_positions_give_the_same_labels() -> None:
    values = ("Yes", None, "a much longer label", None)
    assert category_labels(values, [1, 3]).tolist() == category_labels(values).tolist()
    assert category_labels(values, [1, 3]).dtype == category_labels(values).dtype
    assert category_labels(("a", "b"), ()).dtype == np.dtype("<U1")
    assert category_labels(("a", None)).tolist() == ["a", MISSING_CATEGORY]
    assert category_labels(("a", float("nan"))).tolist() == ["a", MISSING_CATEGORY]


def test_columns_must_match_the_schema(small_dataset: DatasetConfig) -> None:
    schema = input_schema(small_dataset)
    with pytest.raises(ValueError, match="schema"):
        onnx_inputs_from_columns(np.zeros((2, 1)), [category_labels(["x"])] * 2, schema)
    with pytest.raises(ValueError, match="schema"):
        onnx_inputs_from_rows([(1.0, 2.0)], schema)


def test_bundled_rows_score_identically(bundled_cfg, churn_df) -> None:
    ds = bundled_cfg.dataset
    schema = input_schema(ds)
    sample = churn_df.sample(300, random_state=0).reset_index(drop=True)
    sample.loc[0, "total_charges"] = None
    sample.loc[1, "contract"] = None
    records = json.loads(sample[list(ds.features)].to_json(orient="records"))
    rows = [tuple(r[c] for c in (*schema["numeric"], *schema["categorical"])) for r in records]
    fast = onnx_inputs_from_rows(rows, schema)
    assert_same_feeds(fast, reference_feeds(rows, ds))

    model = train_model(sample.assign(churn=sample["churn"]), ds, bundled_cfg.train)
    session = make_session(export_onnx(model.pipeline, ds).content, prefer_gpu=False)
    np.testing.assert_array_equal(
        score_onnx(session, fast), score_onnx(session, reference_feeds(rows, ds))
    )
