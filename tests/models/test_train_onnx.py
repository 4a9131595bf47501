from __future__ import annotations

import numpy as np
import pytest

from models.config import TrainConfig
from models.data import DataError, encode_target, hash_frame, load_dataset, split_data
from models.metrics import evaluate, metric_value
from models.onnx_export import export_onnx, make_session, predict_proba_onnx
from models.train import predict_proba, train_model

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def split(bundled_cfg, churn_df):
    return split_data(churn_df, bundled_cfg.dataset, bundled_cfg.train)


@pytest.mark.parametrize(
    ("estimator", "params"),
    [
        ("logistic_regression", {}),
        ("gradient_boosting", {"n_estimators": 30, "max_depth": 3}),
        ("random_forest", {"n_estimators": 20}),
        ("mlp", {"hidden_layer_sizes": [16]}),
    ],
)
def test_every_estimator_trains_and_onnx_matches_sklearn(bundled_cfg, split, estimator, params):
    ds = bundled_cfg.dataset
    model = train_model(split.train, ds, TrainConfig(estimator=estimator, params=params))
    sk = predict_proba(model.pipeline, split.holdout, ds)
    onnx_model = export_onnx(model.pipeline, ds)
    ox = predict_proba_onnx(make_session(onnx_model.content), split.holdout, ds)
    assert np.max(np.abs(sk - ox)) < 1e-4
    metrics = evaluate(encode_target(split.holdout, ds), sk)
    assert metrics["roc_auc"] > 0.75, metrics
    assert set(metrics) == {"roc_auc", "pr_auc", "log_loss", "brier", "f1"}


def test_split_is_stratified_and_seeded(bundled_cfg, churn_df, split):
    again = split_data(churn_df, bundled_cfg.dataset, bundled_cfg.train)
    assert again.holdout_hash == split.holdout_hash
    y_all = encode_target(churn_df, bundled_cfg.dataset).mean()
    y_hold = encode_target(split.holdout, bundled_cfg.dataset).mean()
    assert abs(y_all - y_hold) < 0.005
    assert len(split.holdout) == round(len(churn_df) * bundled_cfg.train.test_size)


def test_hash_ignores_format_but_not_content(churn_df, tmp_path):
    p = tmp_path / "c.csv"
    churn_df.to_csv(p, index=False)
    assert hash_frame(churn_df) == hash_frame(churn_df.copy())
    changed = churn_df.copy()
    changed.loc[0, "tenure"] = 99
    assert hash_frame(changed) != hash_frame(churn_df)


def test_missing_column_names_the_column(bundled_cfg, churn_df, tmp_path):
    p = tmp_path / "no_contract.parquet"
    churn_df.drop(columns=["contract"]).to_parquet(p)
    with pytest.raises(DataError, match="contract"):
        load_dataset(bundled_cfg.dataset, p)


def test_unknown_positive_label_is_named(bundled_cfg, churn_df):
    ds = bundled_cfg.dataset.model_copy(update={"positive_label": "Maybe"})
    with pytest.raises(DataError, match="Maybe"):
        encode_target(churn_df, ds)


def test_params_that_do_not_fit_the_estimator(bundled_cfg, split):
    with pytest.raises(DataError, match="n_estimators"):
        train_model(
            split.train,
            bundled_cfg.dataset,
            TrainConfig(estimator="logistic_regression", params={"n_estimators": 3}),
        )


def test_metrics_undefined_are_nan():
    assert np.isnan(metric_value("roc_auc", np.array([1, 1]), np.array([0.2, 0.9])))
    assert np.isnan(metric_value("roc_auc", np.array([]), np.array([])))
    assert np.isnan(metric_value("roc_auc", np.array([0, 1]), np.array([np.nan, 0.3])))
