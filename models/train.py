"""Building and fitting the scikit-learn pipeline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from models.config import DatasetConfig, TrainConfig
from models.data import DataError, encode_target

MISSING_CATEGORY = "__missing__"

_ESTIMATORS: dict[str, type[ClassifierMixin]] = {
    "logistic_regression": LogisticRegression,
    "gradient_boosting": GradientBoostingClassifier,
    "random_forest": RandomForestClassifier,
    "mlp": MLPClassifier,
}

_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "logistic_regression": {"max_iter": 1000},
    "gradient_boosting": {},
    "random_forest": {"n_estimators": 200, "min_samples_leaf": 2, "n_jobs": 1},
    "mlp": {"hidden_layer_sizes": (32,), "max_iter": 500, "early_stopping": True},
}


@dataclass(frozen=True)
class TrainedModel:
    pipeline: Pipeline
    estimator: str
    params: dict[str, Any]
    train_rows: int
    fit_seconds: float


def prepare_features(df: pd.DataFrame, dataset: DatasetConfig) -> pd.DataFrame:
    return prepare_columns(df, dataset.numeric_features, dataset.categorical_features)


def prepare_columns(
    df: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]
) -> pd.DataFrame:
    """The exact feature frame both sklearn and ONNX see: numeric as float32 values (what
    ONNX computes in), categorical as strings with nulls made an explicit category."""
    missing = [c for c in (*numeric, *categorical) if c not in df.columns]
    if missing:
        raise DataError(f"feature column(s) missing from the data: {', '.join(missing)}")
    out: dict[str, Any] = {}
    for col in numeric:
        try:
            out[col] = pd.to_numeric(df[col], errors="raise").astype(np.float32).astype(np.float64)
        except (ValueError, TypeError) as err:
            raise DataError(f"numeric feature {col!r} holds non-numeric values: {err}") from None
    for col in categorical:
        s = df[col]
        out[col] = s.astype(object).where(s.notna(), MISSING_CATEGORY).astype(str)
    return pd.DataFrame(out, index=df.index)


def build_pipeline(dataset: DatasetConfig, train: TrainConfig) -> Pipeline:
    params = {**_DEFAULT_PARAMS[train.estimator], **train.params}
    if "random_state" not in params:
        params["random_state"] = train.seed
    try:
        clf = _ESTIMATORS[train.estimator](**params)
    except TypeError as err:
        raise DataError(f"train.params do not fit estimator {train.estimator!r}: {err}") from None
    transformers: list[tuple[str, Any, list[str]]] = []
    if dataset.numeric_features:
        steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
        # Trees split on raw values; scaling them only adds float32 rounding that makes
        # ONNX disagree with sklearn at split thresholds.
        if train.estimator in ("logistic_regression", "mlp"):
            steps.append(("scale", StandardScaler()))
        numeric = Pipeline(steps)
        transformers.append(("num", numeric, list(dataset.numeric_features)))
    if dataset.categorical_features:
        onehot = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
        transformers.append(("cat", onehot, list(dataset.categorical_features)))
    return Pipeline([("prep", ColumnTransformer(transformers)), ("clf", clf)])


def train_model(df: pd.DataFrame, dataset: DatasetConfig, train: TrainConfig) -> TrainedModel:
    X = prepare_features(df, dataset)
    y = encode_target(df, dataset)
    if len(np.unique(y)) < 2:
        raise DataError(f"target column {dataset.target!r} has a single class in the train split")
    pipeline = build_pipeline(dataset, train)
    start = time.perf_counter()
    pipeline.fit(X, y)
    elapsed = time.perf_counter() - start
    return TrainedModel(
        pipeline=pipeline,
        estimator=train.estimator,
        params=pipeline.named_steps["clf"].get_params(),
        train_rows=len(df),
        fit_seconds=elapsed,
    )


def predict_proba(pipeline: Pipeline, df: pd.DataFrame, dataset: DatasetConfig) -> np.ndarray:
    """Probability of the positive class."""
    return np.asarray(pipeline.predict_proba(prepare_features(df, dataset))[:, 1])
