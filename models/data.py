"""Loading, hashing and splitting tabular data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from models.config import DatasetConfig, TrainConfig

SUPPORTED_SUFFIXES = (".csv", ".parquet", ".pq")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file and the column."""


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    holdout: pd.DataFrame
    holdout_hash: str


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise DataError(f"data file {path}: unsupported format {suffix!r} (use CSV or Parquet)")


def load_dataset(dataset: DatasetConfig, path: Path | None = None) -> pd.DataFrame:
    """Read the data and check the configured columns exist; everything finer is the data gate."""
    path = Path(path or dataset.path)
    df = read_table(path)
    needed = [dataset.target, *dataset.features]
    if dataset.id_column:
        needed.append(dataset.id_column)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"data file {path} lacks configured column(s) {', '.join(missing)} "
            f"(it has: {', '.join(map(str, df.columns))})"
        )
    return df


def hash_frame(df: pd.DataFrame) -> str:
    """A content hash independent of the file format: same rows and columns, same hash."""
    h = hashlib.sha256()
    h.update(",".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def encode_target(df: pd.DataFrame, dataset: DatasetConfig) -> np.ndarray:
    """1 for the positive label, 0 otherwise; labels are compared as strings so YAML's
    `"Yes"`, `1` and `true` all match what the file holds."""
    col = df[dataset.target]
    if col.isna().any():
        raise DataError(f"target column {dataset.target!r} has {int(col.isna().sum())} null(s)")
    positive = str(dataset.positive_label).lower()
    as_str = col.astype(str).str.lower()
    y = (as_str == positive).to_numpy(dtype=np.int64)
    if y.sum() == 0:
        seen = sorted(col.astype(str).unique())[:10]
        raise DataError(
            f"positive label {dataset.positive_label!r} never occurs in target column "
            f"{dataset.target!r} (values seen: {seen})"
        )
    return y


def split_data(df: pd.DataFrame, dataset: DatasetConfig, train: TrainConfig) -> Split:
    y = encode_target(df, dataset)
    train_df, holdout_df = train_test_split(
        df, test_size=train.test_size, random_state=train.seed, stratify=y
    )
    holdout_df = holdout_df.reset_index(drop=True)
    return Split(
        train=train_df.reset_index(drop=True),
        holdout=holdout_df,
        holdout_hash=hash_frame(holdout_df),
    )
