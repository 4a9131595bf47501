"""The GPU graph of tree ensembles: parity with scikit-learn on CPU, its encoder, the chooser."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto

from checks.parity import check_parity
from models.config import MlgateConfig, ParityGateConfig
from models.data import split_data
from models.onnx_export import (
    export_onnx,
    input_schema,
    make_session,
    predict_proba_gpu_graph,
    predict_proba_onnx,
    write_model_dir,
)
from models.train import MISSING_CATEGORY, prepare_features, train_model
from models.tree_graph import (
    CUDA,
    FEATURES,
    GPU_ONNX_FILENAME,
    UnsupportedModel,
    choose_graph,
    encode_features,
    export_tree_graph,
    read_layout,
    threshold_float32,
    tree_graph_supported,
)

pytestmark = pytest.mark.fast

TOLERANCE = 1e-5


def _train(cfg: MlgateConfig, df: pd.DataFrame, estimator: str, params: dict) -> tuple:
    train = cfg.train.model_copy(update={"estimator": estimator, "params": params})
    parts = split_data(df, cfg.dataset, train)
    return train_model(parts.train, cfg.dataset, train), parts.holdout


@pytest.mark.parametrize(
    ("estimator", "params"),
    [
        ("gradient_boosting", {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.05}),
        ("random_forest", {"n_estimators": 60}),
    ],
)
def test_gpu_graph_matches_sklearn_on_the_bundled_data(
    bundled_cfg: MlgateConfig, churn_df: pd.DataFrame, estimator: str, params: dict
) -> None:
    model, holdout = _train(bundled_cfg, churn_df, estimator, params)
    onnx_model = export_onnx(model.pipeline, bundled_cfg.dataset)
    assert onnx_model.gpu_content is not None and onnx_model.gpu_sha256
    sklearn = model.pipeline.predict_proba(prepare_features(holdout, bundled_cfg.dataset))[:, 1]
    gpu = predict_proba_gpu_graph(onnx_model, holdout, bundled_cfg.dataset)
    assert gpu is not None
    assert np.max(np.abs(gpu - sklearn)) <= TOLERANCE
    cpu = predict_proba_onnx(make_session(onnx_model.content), holdout, bundled_cfg.dataset)
    gate = check_parity(sklearn, cpu, bundled_cfg.gates.parity, gpu)
    assert gate.passed, gate.reason
    assert gate.metrics["gpu_graph.max_abs_diff"] <= TOLERANCE
    assert any("GPU graph" in c.check for c in gate.checks)


def test_gpu_graph_takes_one_float_matrix_and_no_strings(
    bundled_cfg: MlgateConfig, churn_df: pd.DataFrame
) -> None:
    model, _ = _train(bundled_cfg, churn_df, "gradient_boosting", {"n_estimators": 5})
    graph = onnx.load_model_from_string(export_tree_graph(model.pipeline))
    (inp,) = graph.graph.input
    assert inp.name == FEATURES and inp.type.tensor_type.elem_type == TensorProto.FLOAT
    kinds = {t.data_type for t in graph.graph.initializer}
    assert TensorProto.STRING not in kinds
    assert not {n.op_type for n in graph.graph.node} & {"TreeEnsembleClassifier", "OneHotEncoder"}
    layout = read_layout(graph.SerializeToString())
    assert layout.numeric == tuple(bundled_cfg.dataset.numeric_features)
    assert [c for c, _ in layout.categorical] == list(bundled_cfg.dataset.categorical_features)


def test_written_beside_the_cpu_graph(
    bundled_cfg: MlgateConfig, churn_df: pd.DataFrame, tmp_path
) -> None:
    model, _ = _train(bundled_cfg, churn_df, "gradient_boosting", {"n_estimators": 5})
    onnx_model = export_onnx(model.pipeline, bundled_cfg.dataset)
    folder = write_model_dir(onnx_model, bundled_cfg.dataset, tmp_path)
    assert (folder / GPU_ONNX_FILENAME).read_bytes() == onnx_model.gpu_content


def test_linear_models_get_no_gpu_graph(bundled_cfg: MlgateConfig, churn_df: pd.DataFrame) -> None:
    model, holdout = _train(bundled_cfg, churn_df, "logistic_regression", {})
    assert not tree_graph_supported(model.pipeline)
    with pytest.raises(UnsupportedModel):
        export_tree_graph(model.pipeline)
    onnx_model = export_onnx(model.pipeline, bundled_cfg.dataset)
    assert onnx_model.gpu_content is None
    assert predict_proba_gpu_graph(onnx_model, holdout, bundled_cfg.dataset) is None


def _synthetic(n: int, seed: int) -> tuple[pd.DataFrame, MlgateConfig]:
    """Values on a coarse grid (every split falls between two of them, and rows sit exactly
    on the float32 neighbours of the thresholds), missing values, an unseen category."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 20, n) * 0.1  # 0.1 steps: thresholds between non-representable values
    b = rng.integers(0, 5, n).astype(float)
    b[rng.random(n) < 0.1] = np.nan
    colour = rng.choice(np.array(["red", "green", "blue", None], dtype=object), n)
    y = ((a > 1.0) ^ (b == 2.0) ^ (colour == "red")) | (rng.random(n) < 0.1)
    df = pd.DataFrame({"a": a, "b": b, "colour": colour, "y": np.where(y, "yes", "no")})
    cfg = MlgateConfig.model_validate(
        {
            "dataset": {
                "path": "unused.parquet",
                "target": "y",
                "positive_label": "yes",
                "numeric_features": ["a", "b"],
                "categorical_features": ["colour"],
            },
            "train": {"estimator": "gradient_boosting", "seed": 1},
        }
    )
    return df, cfg


@pytest.mark.parametrize("estimator", ["gradient_boosting", "random_forest"])
def test_rows_exactly_at_thresholds(estimator: str) -> None:
    df, cfg = _synthetic(3000, 7)
    train = cfg.train.model_copy(update={"estimator": estimator, "params": {"n_estimators": 40}})
    model = train_model(df, cfg.dataset, train)
    clf = model.pipeline.named_steps["clf"]
    trees = [e.tree_ for e in np.ravel(clf.estimators_)]
    thresholds = np.unique(np.concatenate([t.threshold[t.feature == 0] for t in trees]))
    # Rows on each threshold's float32 rounding and its neighbours, both sides.
    t32 = thresholds.astype(np.float32)
    probes = np.unique(
        np.concatenate(
            [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))]
        )
    ).astype(np.float64)
    rows = pd.DataFrame(
        {
            "a": np.repeat(probes, 3),
            "b": np.tile([np.nan, 2.0, 3.0], len(probes)),
            "colour": np.tile(["red", "purple", None], len(probes)),
            "y": "no",
        }
    )
    frame = pd.concat([df.head(500), rows], ignore_index=True)
    onnx_model = export_onnx(model.pipeline, cfg.dataset)
    sklearn = model.pipeline.predict_proba(prepare_features(frame, cfg.dataset))[:, 1]
    gpu = predict_proba_gpu_graph(onnx_model, frame, cfg.dataset)
    assert gpu is not None
    assert np.max(np.abs(gpu - sklearn)) <= TOLERANCE


def test_threshold_float32_decides_as_sklearn() -> None:
    rng = np.random.default_rng(3)
    t = rng.normal(size=2000)
    x = np.concatenate([t.astype(np.float32), rng.normal(size=2000).astype(np.float32)])
    t32 = threshold_float32(t)
    for i in range(0, 2000, 50):
        assert np.array_equal(x.astype(np.float64) <= t[i], x <= t32[i])


def test_encoder_codes_categories_and_unseen_ones() -> None:
    df, cfg = _synthetic(400, 2)
    model = train_model(df, cfg.dataset, cfg.train)
    layout = read_layout(export_tree_graph(model.pipeline))
    schema = input_schema(cfg.dataset)
    labels = [np.array(["blue", "purple", MISSING_CATEGORY, "red"], dtype=object)]
    numeric = np.array([[0.1, np.nan, 3e39, -1.0], [1.0, 2.0, np.nan, 4.0]])
    with np.errstate(over="ignore"):
        feeds = encode_features(numeric, labels, schema, layout)
    out = feeds[FEATURES]
    assert out.dtype == np.float32 and out.shape == (4, 3)
    cats = dict(layout.categorical)["colour"]
    assert out[:, 2].tolist() == [
        cats.index("blue"),
        -1,
        cats.index(MISSING_CATEGORY),
        cats.index("red"),
    ]
    assert np.isnan(out[1, 0]) and np.isinf(out[2, 0])


def test_unsupported_gradient_boosting_loss() -> None:
    df, cfg = _synthetic(300, 4)
    train = cfg.train.model_copy(update={"params": {"loss": "exponential", "n_estimators": 3}})
    model = train_model(df, cfg.dataset, train)
    with pytest.raises(UnsupportedModel, match="exponential"):
        export_tree_graph(model.pipeline)


def test_chooser_picks_cpu_without_cuda(bundled_cfg: MlgateConfig, churn_df: pd.DataFrame) -> None:
    model, _ = _train(bundled_cfg, churn_df, "gradient_boosting", {"n_estimators": 5})
    content = export_tree_graph(model.pipeline)
    session = make_session(content)
    providers = session.get_providers()
    choice = choose_graph(content, providers)
    if CUDA in providers:  # a GPU host: the GPU graph serves there
        assert choice.graph == "gpu"
    else:
        assert choice.graph == "cpu" and "not active" in choice.reason
    assert choose_graph(content, [CUDA, "CPUExecutionProvider"]).graph == "gpu"
    assert choose_graph(None, [CUDA]).graph == "cpu"


def test_parity_gate_fails_when_only_the_gpu_graph_disagrees() -> None:
    sklearn = np.linspace(0.0, 1.0, 50)
    gpu = sklearn.copy()
    gpu[3] += 2e-5
    gate = check_parity(sklearn, sklearn.copy(), ParityGateConfig(tolerance=1e-4), gpu)
    assert not gate.passed
    assert "GPU graph disagrees" in gate.reason
    assert gate.metrics["max_abs_diff"] == 0.0


def test_the_standalone_bench_imports_nothing_of_the_project() -> None:
    import ast
    from pathlib import Path

    import models.tree_graph as tree_graph

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
    tree = ast.parse(path.read_text())
    imported = {
        ((node.module or "") if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {
        "__future__",
        "argparse",
        "functools",
        "json",
        "os",
        "platform",
        "tempfile",
        "time",
        "collections",
        "pathlib",
        "typing",
        "numpy",
        "onnx",
        "onnxruntime",
        "pandas",
        "nvforest",
    }
    constants = {
        n.targets[0].id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Constant)
        and isinstance(n.targets[0], ast.Name)
    }
    assert constants["MISSING_CATEGORY"] == MISSING_CATEGORY
    assert constants["LAYOUT_METADATA_KEY"] == tree_graph.LAYOUT_METADATA_KEY
    assert constants["FEATURES"] == FEATURES
