"""`mlgate init`: infer a starter config (the dataset and the model's name) from any table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from models.config import ChampionGateConfig, TrainConfig
from models.data import DataError

_ID_NAME = re.compile(r"(^id$|_id$|^id_|^uuid$|^key$|customer.?id|account.?id)", re.IGNORECASE)
# A text column with more distinct values than this share of the rows is an identifier or
# free text, not a category a one-hot encoder should learn.
MAX_CATEGORY_SHARE = 0.5
MAX_CATEGORIES = 200
# What registry.model_name allows, starting with a letter or digit: the name also names
# files and folders (trigger state, inference log), where "." or ".." would mean another.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
FALLBACK_MODEL_NAME = "model"
MAX_SLICE_CATEGORIES = 5


def infer_model_name(data_path: Path | str, name: str | None = None) -> str:
    """`name` when given (a valid registry name, else a DataError), otherwise the data
    file's stem made into one: `Loan Book (2024).csv` is `Loan_Book_2024`."""
    if name is not None:
        if not _MODEL_NAME.fullmatch(name):
            raise DataError(
                f"--name {name!r} is not a model name: letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        return name
    stem = _NOT_IN_NAME.sub("_", Path(data_path).stem).strip("_.-")
    return stem if _MODEL_NAME.fullmatch(stem) else FALLBACK_MODEL_NAME


def infer_id_column(df: pd.DataFrame, target: str) -> str | None:
    candidates = [c for c in df.columns if c != target and df[c].notna().all() and df[c].is_unique]
    by_name = [c for c in candidates if _ID_NAME.search(str(c))]
    if by_name:
        return str(by_name[0])
    for c in candidates:
        s = df[c]
        if pd.api.types.is_integer_dtype(s) and s.is_monotonic_increasing and len(s) > 1:
            return str(c)
        if s.dtype == object and len(s) > 20:
            return str(c)
    return None


def infer_positive_label(labels: pd.Series, positive: str | None) -> str | int | bool:
    values = labels.dropna().unique().tolist()
    if len(values) != 2:
        raise DataError(
            f"target column {labels.name!r} must have exactly 2 classes for a binary model, "
            f"found {len(values)}: {sorted(map(str, values))[:10]}"
        )
    if positive is not None:
        if positive not in {str(v) for v in values}:
            raise DataError(
                f"--positive {positive!r} is not a value of {labels.name!r} "
                f"(values: {sorted(map(str, values))})"
            )
        return positive
    if set(values) <= {0, 1} or set(values) <= {True, False}:
        return 1 if not isinstance(values[0], bool) else True
    # Without a hint the rarer class is the event worth predicting (churn, fraud, default).
    return str(labels.value_counts().idxmin())


def propose_slice_columns(
    df: pd.DataFrame,
    categorical: list[str],
    holdout_share: float,
    min_slice_rows: int,
    limit: int = 1,
) -> list[str]:
    """The first `limit` categorical columns with 2 to MAX_SLICE_CATEGORIES categories whose
    every category, null included, is expected to bring at least `min_slice_rows` rows to a
    holdout of `holdout_share`. A column with a rarer category is skipped, not grouped: the
    champion gate judges one slice per value, so grouping would need a value-to-group map
    in the config for the gate to read. The count is an expectation (the split is
    stratified on the target, not on the column); a category that lands a few rows short is
    reported by the gate as too small to judge, which does not block."""
    proposed = []
    for col in categorical:
        # Grouped the way the champion gate groups a slice: by the value's text, so a null
        # is a slice of its own ("nan").
        counts = df[col].astype(str).value_counts()
        if 2 <= len(counts) <= MAX_SLICE_CATEGORIES and (
            counts.min() * holdout_share >= min_slice_rows
        ):
            proposed.append(col)
    return proposed[:limit]


def infer_dataset_config(
    df: pd.DataFrame, target: str, data_path: str, positive: str | None = None
) -> dict[str, Any]:
    if target not in df.columns:
        raise DataError(
            f"target column {target!r} not found (columns: {', '.join(map(str, df.columns))})"
        )
    positive_label = infer_positive_label(df[target], positive)
    id_column = infer_id_column(df, target)
    numeric, categorical, timestamp = [], [], None
    skipped: dict[str, str] = {}
    for col in df.columns:
        if col in (target, id_column):
            continue
        s = df[col]
        name = str(col)
        if pd.api.types.is_datetime64_any_dtype(s):
            timestamp = timestamp or name
            skipped[name] = "timestamp"
        elif pd.api.types.is_bool_dtype(s):
            categorical.append(name)
        elif pd.api.types.is_numeric_dtype(s):
            if s.nunique(dropna=True) <= 1:
                skipped[name] = "constant"
            else:
                numeric.append(name)
        else:
            n = s.nunique(dropna=True)
            if n <= 1:
                skipped[name] = "constant"
            elif n > MAX_CATEGORIES or n > MAX_CATEGORY_SHARE * len(s):
                skipped[name] = f"{n} distinct values: identifier or free text"
            else:
                categorical.append(name)
    if not numeric and not categorical:
        raise DataError("no usable feature columns found")
    # The written config keeps the defaults of both, so they are the ones `train` uses.
    slices = propose_slice_columns(
        df, categorical, TrainConfig().test_size, ChampionGateConfig().min_slice_rows
    )
    return {
        "dataset": {
            "path": data_path,
            "target": target,
            "positive_label": positive_label,
            "id_column": id_column,
            "numeric_features": numeric,
            "categorical_features": categorical,
            "slice_columns": slices,
            "timestamp_column": timestamp,
        },
        "_skipped": skipped,
    }
