from __future__ import annotations

import pandas as pd
import pytest

from models.config import config_from_dict
from models.data import DataError
from models.starter import infer_dataset_config, infer_model_name, propose_slice_columns

pytestmark = pytest.mark.fast


def test_infers_churn_schema(churn_df):
    raw = infer_dataset_config(churn_df, "churn", "data/churn.parquet")
    ds = raw["dataset"]
    assert ds["id_column"] == "customer_id"
    assert ds["positive_label"] == "Yes"  # the rarer class
    assert "tenure" in ds["numeric_features"] and "contract" in ds["categorical_features"]
    assert "customer_id" not in ds["numeric_features"] + ds["categorical_features"]
    config_from_dict({"dataset": ds})


def test_other_table_with_free_text_and_timestamp():
    df = pd.DataFrame(
        {
            "row": range(200),
            "amount": [float(i % 17) for i in range(200)],
            "city": ["a", "b", "c", "d"] * 50,
            "note": [f"free text {i}" for i in range(200)],
            "when": pd.date_range("2026-01-01", periods=200, freq="h"),
            "flag": [0, 1] * 100,
            "const": [1] * 200,
        }
    )
    raw = infer_dataset_config(df, "flag", "x.csv")
    ds = raw["dataset"]
    assert ds["positive_label"] == 1
    assert ds["id_column"] == "row"
    assert ds["numeric_features"] == ["amount"]
    assert ds["categorical_features"] == ["city"]
    assert ds["timestamp_column"] == "when"
    assert set(raw["_skipped"]) == {"note", "when", "const"}


def test_target_errors_name_the_problem():
    df = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    with pytest.raises(DataError, match="'z' not found"):
        infer_dataset_config(df, "z", "x.csv")
    with pytest.raises(DataError, match="exactly 2 classes"):
        infer_dataset_config(df, "y", "x.csv")
    df2 = pd.DataFrame({"x": [1, 2, 3, 4], "y": ["a", "b", "a", "b"]})
    with pytest.raises(DataError, match="--positive 'c'"):
        infer_dataset_config(df2, "y", "x.csv", positive="c")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("data/churn.parquet", "churn"),
        ("/exports/Loan Book (2024).csv", "Loan_Book_2024"),
        ("exports/.loans.v2.csv", "loans.v2"),
        ("exports/crédit-risque.parquet", "cr_dit-risque"),
        ("exports/###.csv", "model"),
    ],
)
def test_model_name_comes_from_the_file_stem(path, name, churn_df):
    assert infer_model_name(path) == name
    ds = infer_dataset_config(churn_df, "churn", path)["dataset"]
    assert config_from_dict({"dataset": ds, "registry": {"model_name": name}})


def test_model_name_option_wins_and_must_be_a_registry_name():
    assert infer_model_name("loans.csv", "credit-risk") == "credit-risk"
    for bad in ("credit risk", "", "..", "-x", "loans/v2"):
        with pytest.raises(DataError, match="--name"):
            infer_model_name("loans.csv", bad)


def _credit(n: int = 2000) -> pd.DataFrame:
    """A credit-like table: `marital` has three categories far too rare for a holdout slice,
    `home` has a rare null group, `job` has enough rows in every category."""
    marital = ["married"] * (n // 2) + ["single"] * (n // 2 - 150)
    marital += ["divorced"] * 80 + ["separated"] * 40 + ["widow"] * 30
    home = (["owner", "rent"] * n)[: n - 20] + [None] * 20
    return pd.DataFrame(
        {
            "income": [float(i % 97) for i in range(n)],
            "marital": marital,
            "home": home,
            "job": (["fixed", "freelance", "partime"] * n)[:n],
            "status": (["good", "good", "bad"] * n)[:n],
        }
    )


def test_slice_column_proposed_only_where_every_category_fills_a_holdout_slice():
    df = _credit()
    ds = infer_dataset_config(df, "status", "credit.csv")["dataset"]
    assert ds["categorical_features"] == ["marital", "home", "job"]
    # marital: 30 widows are ~8 holdout rows; home: 20 nulls are a slice of ~5 rows.
    assert ds["slice_columns"] == ["job"]


def test_slice_proposal_uses_the_holdout_share_and_the_gate_minimum():
    df = _credit()
    cats = ["marital", "home", "job"]
    assert propose_slice_columns(df, cats, 0.25, 100, limit=3) == ["job"]
    # 30 widows at a holdout of half the rows give 15 rows: enough for a minimum of 15.
    assert propose_slice_columns(df, cats, 0.5, 15, limit=3) == ["marital", "job"]
    assert propose_slice_columns(df, cats, 0.5, 10, limit=3) == cats
    assert propose_slice_columns(df.head(300), cats, 0.25, 100) == []
