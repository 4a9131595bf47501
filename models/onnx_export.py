"""ONNX export of the fitted pipeline, and scoring it with ONNX Runtime.

The ONNX graph takes one input per feature column, named after the column, shaped [N, 1]:
float32 for numeric features, string for categorical ones. Output `probabilities` is [N, 2];
column 1 is the positive class. A tree ensemble also gets its GPU graph
(`models.tree_graph`), written beside it as `model_gpu.onnx`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from models.config import DatasetConfig
from models.train import MISSING_CATEGORY, prepare_columns, prepare_features
from models.tree_graph import GPU_ONNX_FILENAME, export_tree_graph, tree_graph_supported

PROBABILITIES = "probabilities"
ONNX_FILENAME = "model.onnx"
SCHEMA_FILENAME = "schema.json"


@dataclass(frozen=True)
class OnnxModel:
    content: bytes
    sha256: str
    providers: tuple[str, ...] = ()
    # Tree ensembles only: the same model compiled to tensor ops for the CUDA provider.
    gpu_content: bytes | None = None
    gpu_sha256: str | None = None

    @property
    def size_bytes(self) -> int:
        return len(self.content)


class ExternalDataError(ValueError):
    """An ONNX model whose tensors keep their data outside the model's own bytes."""


def find_external_data(content: bytes) -> list[str]:
    """Every tensor of the model that refers to external data (`data_location` EXTERNAL or
    `external_data` entries), described by name and place: initializers, sparse
    initializers, tensor attributes (Constant nodes), in the main graph, every subgraph
    (If, Loop, Scan bodies), every function and every training graph. The model is parsed
    from bytes, so nothing outside them is read."""
    import onnx

    model = onnx.load_model_from_string(content)
    graphs = [(model.graph, f"graph {model.graph.name!r}")]
    for info in model.training_info:
        graphs.append((info.initialization, "a training initialization graph"))
        graphs.append((info.algorithm, "a training algorithm graph"))
    found: list[str] = []
    for graph, where in graphs:
        found.extend(_external(_graph_tensors(graph, where)))
    for function in model.functions:
        for node in function.node:
            found.extend(_external(_node_tensors(node, f"function {function.name!r}")))
    return found


def check_no_external_data(content: bytes) -> None:
    """A served model is exactly the bytes whose sha256 the registry vouches for: ONNX
    Runtime would read a tensor's external data from a file beside the model (or, loading
    from bytes with optimizations off, relative to the working directory), which no hash
    covers. Raises `ExternalDataError` naming the tensors."""
    found = find_external_data(content)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ExternalDataError(
            f"{'; '.join(found[:3])}{more}: the model refers to external data, which its "
            "sha256 does not cover; save every tensor inside the model "
            "(onnx.save_model(..., save_as_external_data=False))"
        )


def _external(tensors: Iterator[tuple[str, Any]]) -> Iterator[str]:
    from onnx import TensorProto

    for where, tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location")
            at = f", location {location!r}" if location is not None else ""
            yield f"tensor {tensor.name!r} ({where}{at})"


def _graph_tensors(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    for tensor in graph.initializer:
        yield f"initializer of {where}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer of {where}", sparse.values
        yield f"sparse initializer of {where}", sparse.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    node_name = node.name or node.op_type
    for attr in node.attribute:
        at = f"attribute {attr.name!r} of node {node_name!r} in {where}"
        if attr.HasField("t"):
            yield at, attr.t
        yield from ((at, t) for t in attr.tensors)
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield at, s.values
            yield at, s.indices
        subgraphs = [attr.g] if attr.HasField("g") else []
        for i, graph in enumerate([*subgraphs, *attr.graphs]):
            name = graph.name or f"{attr.name}[{i}]"
            yield from _graph_tensors(graph, f"subgraph {name!r} of {at}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(pipeline: Pipeline, dataset: DatasetConfig) -> OnnxModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    initial_types: list[tuple[str, Any]] = [
        (c, FloatTensorType([None, 1])) for c in dataset.numeric_features
    ] + [(c, StringTensorType([None, 1])) for c in dataset.categorical_features]
    clf = pipeline.named_steps["clf"]
    onx = to_onnx(
        pipeline,
        initial_types=initial_types,
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
        final_types=None,
    )
    for out in onx.graph.output:
        if out.name == "probabilities":
            break
    else:
        # skl2onnx names it `probabilities` for every supported classifier; fail loudly if not.
        names = [o.name for o in onx.graph.output]
        raise RuntimeError(f"ONNX graph has no 'probabilities' output (outputs: {names})")
    content = onx.SerializeToString()
    gpu = export_tree_graph(pipeline) if tree_graph_supported(pipeline) else None
    return OnnxModel(
        content=content,
        sha256=sha256_bytes(content),
        gpu_content=gpu,
        gpu_sha256=sha256_bytes(gpu) if gpu is not None else None,
    )


def input_schema(dataset: DatasetConfig) -> dict[str, Any]:
    """What a caller must send: stored with the model so the service needs no config."""
    return {
        "numeric": list(dataset.numeric_features),
        "categorical": list(dataset.categorical_features),
        "output": PROBABILITIES,
    }


def onnx_inputs_from_frame(X: pd.DataFrame, schema: dict[str, Any]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for c in schema["numeric"]:
        feeds[c] = X[c].to_numpy(dtype=np.float32).reshape(-1, 1)
    for c in schema["categorical"]:
        feeds[c] = X[c].to_numpy(dtype=object).astype(str).reshape(-1, 1)
    return feeds


def category_labels(values: Sequence[Any], missing: Sequence[int] | None = None) -> np.ndarray:
    """One categorical column as `onnx_inputs_from_frame(prepare_columns(...))` feeds it: a
    unicode array (dtype `<U` as wide as its longest label) where a missing value (None or
    NaN) is `MISSING_CATEGORY` and any other value is `str(value)`.

    `missing` lists the indices of the missing values when the caller knows them already
    (a decoder that saw the nulls); otherwise they are found here."""
    if missing is None:
        missing = [i for i, v in enumerate(values) if v is None or v != v]
    labels = np.array(values, dtype=str)
    if len(missing):
        # Missing values hold str(None) or str(nan) here, shorter than the marker, so the
        # frame path's width is the longer of this one and the marker's.
        width = max(labels.dtype.itemsize // 4, len(MISSING_CATEGORY))
        labels = labels.astype(f"<U{width}")
        labels[np.asarray(missing, dtype=np.intp)] = MISSING_CATEGORY
    return labels


def onnx_inputs_from_columns(
    numeric: np.ndarray, labels: Sequence[np.ndarray], schema: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The feeds `onnx_inputs_from_frame(prepare_columns(...))` builds, without pandas.

    `numeric` is a float64 array shaped (len(schema["numeric"]), n), NaN where a value is
    missing; `labels` holds one `category_labels` array per `schema["categorical"]` feature
    (arrays of several requests may be concatenated: numpy widens to the longest, as the
    frame path does). The feeds are identical in dtype, shape and value; the serving path
    uses this because the DataFrame round trip costs milliseconds per call."""
    names, categorical = schema["numeric"], schema["categorical"]
    if numeric.shape[0] != len(names) or len(labels) != len(categorical):
        raise ValueError(
            f"{numeric.shape[0]} numeric and {len(labels)} categorical columns given, "
            f"the schema has {len(names)} and {len(categorical)}"
        )
    n = numeric.shape[1]
    feeds: dict[str, np.ndarray] = {}
    # Beyond float32's range a value becomes infinity, in the frame path too.
    with np.errstate(over="ignore"):
        as_float32 = numeric.astype(np.float32)
    for i, c in enumerate(names):
        feeds[c] = as_float32[i].reshape(n, 1)
    for c, column in zip(categorical, labels, strict=True):
        feeds[c] = column.reshape(n, 1)
    return feeds


def onnx_inputs_from_rows(
    rows: Sequence[Sequence[Any]], schema: dict[str, Any]
) -> dict[str, np.ndarray]:
    """`onnx_inputs_from_columns` for rows holding their values in the order
    `schema["numeric"]` then `schema["categorical"]`: numbers or None, then labels or
    None, as a JSON body decodes them."""
    k = len(schema["numeric"])
    width = k + len(schema["categorical"])
    n = len(rows)
    # One transpose in C gives every column; zip of no rows gives no columns at all.
    columns = list(zip(*rows, strict=True)) if n else [()] * width
    if len(columns) != width:
        raise ValueError(f"rows hold {len(columns)} values, the schema {width} features")
    numeric = np.array(columns[:k], dtype=np.float64).reshape(k, n)
    return onnx_inputs_from_columns(numeric, [category_labels(c) for c in columns[k:]], schema)


def gpu_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def make_session(content: bytes, prefer_gpu: bool = True, threads: int = 1) -> Any:
    """ONNX Runtime session, CUDA first when present; one intra-op thread, spinning off,
    because a serving worker shares the cores with its siblings."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime-gpu lists CUDA even without a GPU and then logs a loading error; ask for
    # CUDA only where the NVIDIA driver is present.
    wanted = ("CUDAExecutionProvider",) if prefer_gpu and gpu_present() else ()
    available = ort.get_available_providers()
    providers = [p for p in (*wanted, "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(content, sess_options=opts, providers=providers)


def score_onnx(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    (probs,) = session.run([PROBABILITIES], feeds)
    return np.asarray(probs[:, 1], dtype=np.float64)


def predict_proba_onnx(session: Any, df: pd.DataFrame, dataset: DatasetConfig) -> np.ndarray:
    X = prepare_features(df, dataset)
    return score_onnx(session, onnx_inputs_from_frame(X, input_schema(dataset)))


def predict_proba_with_schema(session: Any, df: pd.DataFrame, schema: dict[str, Any]) -> np.ndarray:
    """Score with the columns a registered model was trained on, whatever today's config says."""
    X = prepare_columns(df, schema["numeric"], schema["categorical"])
    return score_onnx(session, onnx_inputs_from_frame(X, schema))


def latency_per_row_us(session: Any, df: pd.DataFrame, dataset: DatasetConfig) -> float:
    """Median single-row ONNX Runtime latency over up to 200 rows, in microseconds."""
    X = prepare_features(df.head(200), dataset)
    schema = input_schema(dataset)
    rows = [onnx_inputs_from_frame(X.iloc[[i]], schema) for i in range(len(X))]
    if not rows:
        return float("nan")
    times = []
    for feeds in rows:
        t = time.perf_counter()
        score_onnx(session, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def write_model_dir(model: OnnxModel, dataset: DatasetConfig, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ONNX_FILENAME).write_bytes(model.content)
    if model.gpu_content is not None:
        (out_dir / GPU_ONNX_FILENAME).write_bytes(model.gpu_content)
    (out_dir / SCHEMA_FILENAME).write_text(json.dumps(input_schema(dataset), indent=2))
    return out_dir


def predict_proba_gpu_graph(
    model: OnnxModel, df: pd.DataFrame, dataset: DatasetConfig
) -> np.ndarray | None:
    """The GPU graph's probabilities of the positive class (None for a model without one),
    fed by the service's encoder; on CUDA where present, else on CPU, so its parity is
    checked wherever training runs."""
    if model.gpu_content is None:
        return None
    from models.tree_graph import make_encoder

    X = prepare_features(df, dataset)
    schema = input_schema(dataset)
    numeric = X[schema["numeric"]].to_numpy(dtype=np.float64).T.reshape(len(schema["numeric"]), -1)
    labels = [X[c].to_numpy(dtype=object) for c in schema["categorical"]]
    session = make_session(model.gpu_content)
    return score_onnx(session, make_encoder(model.gpu_content)(numeric, labels, schema))
