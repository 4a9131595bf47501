"""The GPU graph of a tree ensemble: its trees compiled to plain ONNX tensor ops.

ONNX Runtime has no CUDA kernel for TreeEnsemble, so the CPU graph (`models.onnx_export`)
runs on the CPU even under the CUDA provider. This graph computes the same probabilities
with ops that have CUDA kernels (Gather, GatherElements, Greater, Add, ReduceSum): every
tree is walked at once, one depth level per step, the strategy Hummingbird calls
perf_tree_trav. Nodes are renumbered breadth first so that a node's children are adjacent:
one step is `node = left[node] + (x[feature[node]] > threshold[node])`, and a leaf is its
own left child with an infinite threshold, so walking past it stays on it.

Built here with `onnx.helper` from the fitted trees, not with Hummingbird: Hummingbird
pins onnx <= 1.16.1 and needs torch, neither of which the serving or training environment
should carry for a graph of a dozen nodes; and owning the compilation lets the graph mirror
scikit-learn exactly where parity is won or lost: a tree compares the float32 value of a
feature with a float64 threshold, so each threshold is stored as the largest float32 not
above it, which gives the same decision for every float32 input, in float32 arithmetic.

Input `features`: float32 [N, numeric + categorical], numeric values as the CPU graph gets
them (NaN for missing, imputed inside the graph), each categorical feature as the index of
its category in the fitted one-hot encoder, -1 for one it never saw (`encode_features`,
the service's encoder: no string tensor crosses to the GPU). The one-hot expansion is an
Equal against the category indices inside the graph. Output `probabilities`: float32 [N,
2], as the CPU graph's. The encoder's layout (features, categories) is stored in the
graph's metadata, so the bytes the sha256 covers are all a server needs.

On one CPU thread this graph is slower than TreeEnsemble (2.4x measured on an H200 host);
it is meant for the CUDA provider only, and `choose_graph` picks it only where CUDA is
really active for its session.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

FEATURES = "features"
PROBABILITIES = "probabilities"
GPU_ONNX_FILENAME = "model_gpu.onnx"
LAYOUT_METADATA_KEY = "mlgate.tree_graph.layout"
CUDA = "CUDAExecutionProvider"
# Rows per call where the GPU graph pays for itself (27M rows/s at 16,384 on an H200).
GPU_BATCH_ROWS = 16_384
_OPSET = 17


class UnsupportedModel(ValueError):
    """A pipeline this compiler does not know how to turn into tensor ops."""


@dataclass(frozen=True)
class FeatureLayout:
    """What the encoder puts in each column of `features`: the numeric features, then the
    categorical ones with the categories of the fitted one-hot encoder, in its order."""

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def width(self) -> int:
        return len(self.numeric) + len(self.categorical)

    def to_json(self) -> str:
        return json.dumps(
            {
                "numeric": list(self.numeric),
                "categorical": [[c, list(k)] for c, k in self.categorical],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureLayout:
        raw = json.loads(text)
        return cls(
            tuple(raw["numeric"]),
            tuple((str(c), tuple(map(str, k))) for c, k in raw["categorical"]),
        )


@dataclass(frozen=True)
class _Forest:
    """Every tree's nodes in one flat array, breadth first per tree: `left[i]` is the left
    child (the right one is `left[i] + 1`), a leaf its own left child with threshold +inf."""

    roots: np.ndarray  # int64 [T]
    feature: np.ndarray  # int64 [nodes]
    threshold: np.ndarray  # float32 [nodes]
    left: np.ndarray  # int64 [nodes]
    value: np.ndarray  # float32 [nodes]: the leaf's contribution to the sum
    depth: int


def tree_graph_supported(pipeline: Pipeline) -> bool:
    return isinstance(pipeline.steps[-1][1], (GradientBoostingClassifier, RandomForestClassifier))


def threshold_float32(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 not above each float64 threshold: for every float32 x,
    `x <= t` exactly when `x <= threshold_float32(t)`, as scikit-learn decides it (float32
    features, float64 thresholds)."""
    t = np.asarray(threshold, dtype=np.float64)
    t32 = t.astype(np.float32)
    above = t32.astype(np.float64) > t
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


def _flatten(trees: Sequence[Any], leaf_values: Sequence[np.ndarray]) -> _Forest:
    roots, feature, threshold, left, value = [], [], [], [], []
    offset, depth = 0, 0
    for tree, leaf in zip(trees, leaf_values, strict=True):
        order = [0]
        is_leaf = tree.children_left == -1
        for node in order:  # grows while read: breadth first, children adjacent
            if not is_leaf[node]:
                order.extend((int(tree.children_left[node]), int(tree.children_right[node])))
        new = np.empty(tree.node_count, dtype=np.int64)
        new[order] = np.arange(len(order))
        old = np.asarray(order)
        leaves = is_leaf[old]
        kids = np.where(leaves, new[old], new[np.where(leaves, 0, tree.children_left[old])])
        roots.append(offset)
        feature.append(np.where(leaves, 0, tree.feature[old]).astype(np.int64))
        thr = threshold_float32(tree.threshold[old])
        thr[leaves] = np.inf
        threshold.append(thr)
        left.append(kids + offset)
        value.append(np.where(leaves, leaf[old], 0.0))
        offset += len(order)
        depth = max(depth, int(tree.max_depth))
    return _Forest(
        np.asarray(roots, dtype=np.int64),
        np.concatenate(feature),
        np.concatenate(threshold).astype(np.float32),
        np.concatenate(left),
        np.concatenate(value).astype(np.float32),
        depth,
    )


def _ensemble(clf: Any, n_features: int) -> tuple[_Forest, float, bool]:
    """The flat forest, the constant added to its sum and whether a sigmoid follows."""
    if list(getattr(clf, "classes_", [])) and len(clf.classes_) != 2:
        raise UnsupportedModel(f"{type(clf).__name__} with {len(clf.classes_)} classes")
    if isinstance(clf, GradientBoostingClassifier):
        if clf.loss != "log_loss":
            raise UnsupportedModel(f"GradientBoostingClassifier with loss={clf.loss!r}")
        trees = [est.tree_ for est in clf.estimators_[:, 0]]
        values = [t.value[:, 0, 0] * clf.learning_rate for t in trees]
        forest = _flatten(trees, values)
        # The initial raw score, read off the public API: what decision_function adds to the
        # trees' sum (a DummyClassifier's log-odds by default, whatever `init` was).
        x0 = np.zeros((1, n_features), dtype=np.float32)
        leaves = clf.apply(x0)[0, :, 0].astype(np.intp)
        trees_sum = sum(float(v[i]) for v, i in zip(values, leaves, strict=True))
        return forest, float(clf.decision_function(x0)[0]) - trees_sum, True
    if isinstance(clf, RandomForestClassifier):
        trees = [est.tree_ for est in clf.estimators_]
        values = []
        for t in trees:
            v = t.value[:, 0, :]
            values.append(v[:, 1] / v.sum(axis=1) / len(trees))
        return _flatten(trees, values), 0.0, False
    raise UnsupportedModel(
        f"{type(clf).__name__}: only GradientBoostingClassifier and RandomForestClassifier "
        "compile to the GPU graph"
    )


@dataclass(frozen=True)
class _Prep:
    layout: FeatureLayout
    fill: np.ndarray  # float32 [numeric]: the imputer's statistics as the trees see them
    kept: np.ndarray  # int64: numeric columns the imputer kept
    onehot: list[tuple[int, int]]  # (column in `features`, categories) per categorical


def _preprocessing(pipeline: Pipeline) -> _Prep:
    prep = pipeline.steps[0][1] if len(pipeline.steps) == 2 else None
    if not isinstance(prep, ColumnTransformer):
        raise UnsupportedModel("expected Pipeline([ColumnTransformer, classifier])")
    numeric: list[str] = []
    fill: list[float] = []
    kept: list[int] = []
    categorical: list[tuple[str, tuple[str, ...]]] = []
    for name, step, columns in prep.transformers_:
        if name == "remainder" and step != "drop":
            raise UnsupportedModel("a ColumnTransformer that passes other columns through")
        if step == "drop":
            continue
        columns = list(columns)
        if isinstance(step, Pipeline):
            if len(step.steps) != 1 or not isinstance(step.steps[0][1], SimpleImputer):
                raise UnsupportedModel(
                    f"numeric steps {[n for n, _ in step.steps]}: only an imputer (a scaler "
                    "would move the thresholds; trees are trained unscaled)"
                )
            step = step.steps[0][1]
        if isinstance(step, SimpleImputer):
            stats = np.asarray(step.statistics_, dtype=np.float64)
            for i, c in enumerate(columns):
                # An all-missing column is dropped by the imputer, unless told to keep it.
                if np.isnan(stats[i]) and not step.keep_empty_features:
                    numeric.append(c)
                    continue
                kept.append(len(numeric))
                numeric.append(c)
                fill.append(0.0 if np.isnan(stats[i]) else stats[i])
        elif isinstance(step, OneHotEncoder):
            if step.drop_idx_ is not None or getattr(step, "_infrequent_enabled", False):
                raise UnsupportedModel("a one-hot encoder with drop or infrequent categories")
            for c, cats in zip(columns, step.categories_, strict=True):
                categorical.append((c, tuple(str(v) for v in cats)))
        else:
            raise UnsupportedModel(f"transformer {name!r} ({type(step).__name__})")
    layout = FeatureLayout(tuple(numeric), tuple(categorical))
    onehot = [(len(numeric) + j, len(cats)) for j, (_, cats) in enumerate(categorical)]
    return _Prep(
        layout, np.asarray(fill, dtype=np.float32), np.asarray(kept, dtype=np.int64), onehot
    )


def export_tree_graph(pipeline: Pipeline) -> bytes:
    """The GPU graph of a fitted tree pipeline (`models.train.build_pipeline`), serialized.
    Raises `UnsupportedModel` for any other pipeline."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    prep = _preprocessing(pipeline)
    clf = pipeline.steps[-1][1]
    n_in = len(prep.kept) + sum(k for _, k in prep.onehot)
    if n_in != clf.n_features_in_:
        raise UnsupportedModel(
            f"preprocessing gives {n_in} columns, the classifier expects {clf.n_features_in_}"
        )
    forest, base, sigmoid = _ensemble(clf, n_in)

    inits: list[Any] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    nodes: list[Any] = []

    def op(kind: str, inputs: Sequence[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out

    parts: list[str] = []
    if len(prep.kept):
        numeric = op("Gather", [FEATURES, const("numeric_columns", prep.kept)], "numeric", axis=1)
        missing = op("IsNaN", [numeric], "numeric_missing")
        fill = const("numeric_fill", prep.fill.reshape(1, -1))
        parts.append(op("Where", [missing, fill, numeric], "numeric_imputed"))
    for j, (column, k) in enumerate(prep.onehot):
        code = op(
            "Gather",
            [FEATURES, const(f"cat{j}_column", np.array([column]))],
            f"cat{j}_code",
            axis=1,
        )
        hit = op(
            "Equal", [code, const(f"cat{j}_values", np.arange(k, dtype=np.float32))], f"cat{j}_hit"
        )
        parts.append(op("Cast", [hit], f"cat{j}_onehot", to=TensorProto.FLOAT))
    x = op("Concat", parts, "encoded", axis=1) if len(parts) > 1 else parts[0]

    feature = const("tree_feature", forest.feature)
    threshold = const("tree_threshold", forest.threshold)
    left = const("tree_left", forest.left)
    # [N, T] node indices, every tree at its root: the roots broadcast over the rows.
    rows = op("Shape", [x], "rows_shape", start=0, end=1)
    shape = op(
        "Concat", [rows, const("trees_count", np.array([len(forest.roots)]))], "walk_shape", axis=0
    )
    node = op("Expand", [const("tree_roots", forest.roots.reshape(1, -1)), shape], "node_0")
    for d in range(forest.depth):
        f = op("Gather", [feature, node], f"feature_{d}")
        xv = op("GatherElements", [x, f], f"value_{d}", axis=1)
        t = op("Gather", [threshold, node], f"threshold_{d}")
        right = op(
            "Cast", [op("Greater", [xv, t], f"goes_right_{d}")], f"right_{d}", to=TensorProto.INT64
        )
        node = op("Add", [op("Gather", [left, node], f"left_{d}"), right], f"node_{d + 1}")
    leaf = op("Gather", [const("tree_value", forest.value), node], "leaf_value")
    total = op("ReduceSum", [leaf, const("sum_axis", np.array([1]))], "tree_sum", keepdims=1)
    if sigmoid:
        raw = op("Add", [total, const("init_raw", np.array([[base]], dtype=np.float32))], "raw")
        positive = op("Sigmoid", [raw], "positive")
    else:
        positive = total
    one = const("one", np.array([[1.0]], dtype=np.float32))
    negative = op("Sub", [one, positive], "negative")
    op("Concat", [negative, positive], PROBABILITIES, axis=1)

    graph = helper.make_graph(
        nodes,
        "mlgate_tree_graph",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [None, prep.layout.width])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, 2])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="mlgate"
    )
    model.ir_version = 8
    helper.set_model_props(model, {LAYOUT_METADATA_KEY: prep.layout.to_json()})
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def read_layout(content: bytes) -> FeatureLayout:
    """The encoder's layout stored in a GPU graph."""
    import onnx

    model = onnx.load_model_from_string(content)
    for prop in model.metadata_props:
        if prop.key == LAYOUT_METADATA_KEY:
            return FeatureLayout.from_json(prop.value)
    raise ValueError(f"not a tree graph: no {LAYOUT_METADATA_KEY!r} in its metadata")


def _category_codes(labels: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Index of each label in `categories`, -1 for a label not among them; vectorized
    (numpy's unicode order is the code-point order Python sorts strings in)."""
    cats = np.asarray(categories, dtype=str)
    order = np.argsort(cats, kind="stable")
    ordered = cats[order]
    values = np.asarray(labels, dtype=str)
    if not len(ordered):
        return np.full(len(values), -1.0, dtype=np.float32)
    at = np.searchsorted(ordered, values).clip(max=len(ordered) - 1)
    found = ordered[at] == values
    return np.where(found, order[at], -1).astype(np.float32)


def encode_features(
    numeric: np.ndarray, labels: Sequence[np.ndarray], schema: dict[str, Any], layout: FeatureLayout
) -> dict[str, np.ndarray]:
    """The GPU graph's feed for the columns `onnx_export.onnx_inputs_from_columns` takes:
    `numeric` float64 (len(schema["numeric"]), n) with NaN for missing, `labels` one array of
    category labels per `schema["categorical"]` feature (missing ones already
    `MISSING_CATEGORY`). Numbers become float32 as the CPU graph gets them."""
    n = numeric.shape[1]
    out = np.empty((n, layout.width), dtype=np.float32)
    where = {c: i for i, c in enumerate(schema["numeric"])}
    with np.errstate(over="ignore"):
        for j, c in enumerate(layout.numeric):
            out[:, j] = numeric[where[c]]
    by_name = dict(zip(schema["categorical"], labels, strict=True))
    for j, (c, cats) in enumerate(layout.categorical):
        out[:, len(layout.numeric) + j] = _category_codes(by_name[c], cats)
    return {FEATURES: out}


def make_encoder(content: bytes) -> Any:
    """`encode_features` bound to a GPU graph's layout, with the signature of
    `onnx_inputs_from_columns` (numeric, labels, schema) -> feeds."""
    layout = read_layout(content)

    def encode(numeric: np.ndarray, labels: Sequence[np.ndarray], schema: dict[str, Any]) -> Any:
        return encode_features(numeric, labels, schema, layout)

    return encode


@dataclass(frozen=True)
class GraphChoice:
    """Which graph serves, on which providers, and why."""

    graph: str  # "cpu" | "gpu"
    providers: tuple[str, ...]
    reason: str


def choose_graph(gpu_content: bytes | None, session_providers: Sequence[str]) -> GraphChoice:
    """The GPU graph only where a session of it really got CUDA (`session_providers`, what
    `InferenceSession.get_providers()` returned for it); the CPU graph otherwise, where
    TreeEnsemble is faster."""
    providers = tuple(session_providers)
    if gpu_content is None:
        return GraphChoice("cpu", providers, "no GPU graph (not a tree ensemble)")
    if providers and providers[0] == CUDA:
        return GraphChoice("gpu", providers, "CUDAExecutionProvider is active")
    return GraphChoice(
        "cpu", providers, "CUDAExecutionProvider is not active here: TreeEnsemble on CPU is faster"
    )


def open_serving_session(
    cpu_content: bytes, gpu_content: bytes | None
) -> tuple[Any, Any, GraphChoice]:
    """The session that serves, its encoder (None: the CPU graph's own,
    `onnx_inputs_from_columns`) and the choice made: the GPU graph's session is built only
    where the NVIDIA driver is present, and kept only where CUDA is really active for it."""
    from models.onnx_export import gpu_present, make_session

    if gpu_content is not None and gpu_present():
        session = make_session(gpu_content)
        choice = choose_graph(gpu_content, session.get_providers())
        if choice.graph == "gpu":
            return session, make_encoder(gpu_content), choice
    session = make_session(cpu_content)
    providers = tuple(session.get_providers())
    if gpu_content is None:
        return session, None, choose_graph(None, providers)
    if gpu_present():
        return session, None, choose_graph(gpu_content, ())
    return session, None, GraphChoice("cpu", providers, "no GPU here: TreeEnsemble on CPU")
