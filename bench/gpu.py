"""GPU bench: a tree model's CPU graph (TreeEnsemble) and GPU graph (tensor ops) on ONNX
Runtime's CPU and CUDA providers across batch sizes, batch scoring end to end, and nvForest
beside them when it is installed.

Standalone on purpose: a GPU host rarely holds the project's environment, so this imports
only numpy, pandas, onnx and onnxruntime (onnxruntime-gpu for CUDA), on Python 3.12, and
nothing of mlgate. Its input is a folder written where the project is installed:

    .venv/bin/python -m bench.gpu_prepare /tmp/gpu-bench        # model.onnx, model_gpu.onnx,
                                                                # rows.parquet, sklearn_scores.npy
    python bench/gpu.py /tmp/gpu-bench [--batches 1024,16384,262144] [--seconds 1.0]

Measured, each as rows per second (best of 3 timed repeats, each at least `--seconds` long
and at least 262,144 rows, after one untimed call):

- **kernels**: `session.run` alone on feeds built beforehand (not timed): the CPU graph
  (one input per column, strings for categories) and the GPU graph (one float32 matrix,
  categories as codes) on CPU with 1 intra-op thread and with all cores, and on CUDA when
  the CUDA provider is really active (what `get_providers()` says, not what was asked);
- **end to end**: `rows.parquet` read, encoded in chunks of 16,384 rows (the GPU graph's
  encoder: category codes from the layout stored in the graph), scored and written as
  Parquet, for each graph on the provider it would serve on;
- **parity**: both graphs against scikit-learn's probabilities (`sklearn_scores.npy`) on
  each provider, max absolute difference;
- **nvForest** (`nvforest-cu13`), when importable and the folder holds `model.treelite`
  and `encoded.npy` (written by `gpu_prepare` where treelite is installed): `predict_proba`
  on the encoded matrix, on the GPU.

Prints markdown tables; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd

# As in the project (models.train.MISSING_CATEGORY, models.tree_graph): spelled here
# because this file must not import the project; tests/models/test_tree_graph.py holds them
# equal.
MISSING_CATEGORY = "__missing__"
LAYOUT_METADATA_KEY = "mlgate.tree_graph.layout"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROBABILITIES = "probabilities"
FEATURES = "features"
MIN_TIMED_ROWS = 262_144
END_TO_END_CHUNK = 16_384


def make_session(path: Path, provider: str, threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    providers = [CUDA, CPU] if provider == CUDA else [CPU]
    providers = [p for p in providers if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def read_layout(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == LAYOUT_METADATA_KEY:
            return dict(json.loads(prop.value))
    raise SystemExit(f"{path} holds no {LAYOUT_METADATA_KEY!r}: not a GPU graph")


def cpu_feeds(frame: pd.DataFrame, schema: dict[str, Any]) -> dict[str, np.ndarray]:
    """The CPU graph's feeds, as `models.onnx_export.onnx_inputs_from_frame` builds them."""
    feeds: dict[str, np.ndarray] = {}
    for c in schema["numeric"]:
        values = pd.to_numeric(frame[c]).to_numpy(dtype=np.float32)
        feeds[c] = values.reshape(-1, 1)
    for c in schema["categorical"]:
        s = frame[c]
        labels = s.astype(object).where(s.notna(), MISSING_CATEGORY).astype(str)
        feeds[c] = labels.to_numpy(dtype=object).reshape(-1, 1)
    return feeds


def gpu_feeds(frame: pd.DataFrame, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """The GPU graph's feed, as `models.tree_graph.encode_features` builds it."""
    numeric, categorical = layout["numeric"], layout["categorical"]
    out = np.empty((len(frame), len(numeric) + len(categorical)), dtype=np.float32)
    for j, c in enumerate(numeric):
        out[:, j] = pd.to_numeric(frame[c]).to_numpy(dtype=np.float32)
    for j, (c, cats) in enumerate(categorical):
        s = frame[c]
        labels = s.astype(object).where(s.notna(), MISSING_CATEGORY).astype(str).to_numpy(str)
        known = np.asarray(cats, dtype=str)
        order = np.argsort(known, kind="stable")
        ordered = known[order]
        at = np.searchsorted(ordered, labels).clip(max=len(ordered) - 1)
        out[:, len(numeric) + j] = np.where(ordered[at] == labels, order[at], -1)
    return {FEATURES: out}


def rows_per_second(call: Callable[[], Any], rows: int, seconds: float) -> float:
    call()
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while True:
            call()
            done += rows
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= MIN_TIMED_ROWS:
                break
        best = max(best, done / elapsed)
    return best


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "—"
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M"
    return f"{rate / 1e3:.0f}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batches", default="1024,16384,262144")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    folder: Path = args.folder
    batches = [int(b) for b in args.batches.split(",")]
    schema = json.loads((folder / "schema.json").read_text())
    cpu_path, gpu_path = folder / "model.onnx", folder / "model_gpu.onnx"
    layout = read_layout(gpu_path)
    frame = pd.read_parquet(folder / "rows.parquet")
    cores = os.cpu_count() or 1

    configs: list[tuple[str, str, int]] = [
        ("CPU 1 thread", CPU, 1),
        (f"CPU {cores} threads", CPU, cores),
    ]
    probe = make_session(gpu_path, CUDA, 1)
    cuda_active = probe.get_providers()[0] == CUDA
    if cuda_active:
        configs.append(("CUDA", CUDA, 1))
    print(
        f"# GPU bench: {platform.machine()}, {cores} CPUs, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__} (providers available: "
        f"{', '.join(ort.get_available_providers())}); CUDA active for the GPU graph: "
        f"{cuda_active}; {len(frame):,} rows\n"
    )

    largest = frame.head(max(batches))
    feeds = {
        "cpu": cpu_feeds(largest, schema),
        "gpu": gpu_feeds(largest, layout),
    }
    graphs = {"cpu": cpu_path, "gpu": gpu_path}
    results: dict[str, Any] = {"cuda_active": cuda_active, "kernels": {}, "parity": {}}

    reference_path = folder / "sklearn_scores.npy"
    reference = np.load(reference_path) if reference_path.is_file() else None
    for graph, path in graphs.items():
        for label, provider, threads in configs:
            session = make_session(path, provider, threads)
            served_on = session.get_providers()[0]
            if reference is not None:
                n = min(len(reference), len(largest))
                part = {k: v[:n] for k, v in feeds[graph].items()}
                (probs,) = session.run([PROBABILITIES], part)
                diff = float(np.max(np.abs(probs[:, 1].astype(np.float64) - reference[:n])))
                results["parity"][f"{graph}|{label}"] = diff
            for batch in batches:
                part = {k: v[:batch] for k, v in feeds[graph].items()}
                rate = rows_per_second(
                    functools.partial(session.run, [PROBABILITIES], part), batch, args.seconds
                )
                results["kernels"][f"{graph}|{label}|{batch}"] = rate
                shown = f"{graph} graph, {label} ({served_on}), {batch:,} rows/call"
                print(f"  {shown}: {fmt_rate(rate)} rows/s")

    nvforest_rates = measure_nvforest(folder, batches, args.seconds)
    results["nvforest"] = nvforest_rates

    # End to end: read, encode, score, write, with each graph where it would serve.
    e2e: dict[str, float] = {}
    plans = [("cpu graph, CPU 1 thread", cpu_path, CPU, 1, "cpu")]
    plans.append(("gpu graph, CPU 1 thread", gpu_path, CPU, 1, "gpu"))
    if cuda_active:
        plans.append(("gpu graph, CUDA", gpu_path, CUDA, 1, "gpu"))
    for label, path, provider, threads, graph in plans:
        session = make_session(path, provider, threads)
        e2e[label] = end_to_end(folder, session, schema, layout, graph)
        print(f"  end to end, {label}: {fmt_rate(e2e[label])} rows/s")
    results["end_to_end"] = e2e

    print()
    print(markdown(results, configs, batches, cuda_active))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def end_to_end(
    folder: Path, session: Any, schema: dict[str, Any], layout: dict[str, Any], graph: str
) -> float:
    start = time.perf_counter()
    frame = pd.read_parquet(folder / "rows.parquet")
    scores = np.empty(len(frame), dtype=np.float64)
    for lo in range(0, len(frame), END_TO_END_CHUNK):
        chunk = frame.iloc[lo : lo + END_TO_END_CHUNK]
        feeds = cpu_feeds(chunk, schema) if graph == "cpu" else gpu_feeds(chunk, layout)
        (probs,) = session.run([PROBABILITIES], feeds)
        scores[lo : lo + len(chunk)] = probs[:, 1]
    with tempfile.TemporaryDirectory() as tmp:
        frame.assign(score=scores).to_parquet(Path(tmp) / "scored.parquet", index=False)
    return len(frame) / (time.perf_counter() - start)


def measure_nvforest(folder: Path, batches: list[int], seconds: float) -> dict[str, float]:
    try:
        import nvforest
    except ImportError:
        print("  nvForest: not installed (pip install nvforest-cu13), skipped")
        return {}
    model_file, encoded_file = folder / "model.treelite", folder / "encoded.npy"
    if not (model_file.is_file() and encoded_file.is_file()):
        print(f"  nvForest: {model_file.name} or {encoded_file.name} missing, skipped")
        return {}
    forest = nvforest.load_model(model_file, model_type="treelite_checkpoint", device="gpu")
    encoded = np.load(encoded_file).astype(np.float32)
    rates: dict[str, float] = {}
    for batch in batches:
        part = encoded[:batch]
        rate = rows_per_second(functools.partial(forest.predict_proba, part), len(part), seconds)
        rates[str(batch)] = rate
        print(f"  nvForest (GPU), {batch:,} rows/call: {fmt_rate(rate)} rows/s")
    return rates


def markdown(
    results: dict[str, Any], configs: list[tuple[str, str, int]], batches: list[int], cuda: bool
) -> str:
    kernels = results["kernels"]
    head = ["graph", "provider", *[f"{b:,} rows/call" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for graph in ("cpu", "gpu"):
        for label, _, _ in configs:
            rates = [kernels.get(f"{graph}|{label}|{b}") for b in batches]
            lines.append(f"| {graph} | {label} | " + " | ".join(fmt_rate(r) for r in rates) + " |")
    if not cuda:
        lines.append("| gpu | CUDA | " + " | ".join("pending a GPU host" for _ in batches) + " |")
    for label, _, _ in configs:
        ratios = []
        for b in batches:
            g, c = kernels.get(f"gpu|{label}|{b}"), kernels.get(f"cpu|{label}|{b}")
            ratios.append(f"{g / c:.2f}x" if g and c else "—")
        lines.append(f"| gpu / cpu graph | {label} | " + " | ".join(ratios) + " |")
    if cuda:
        ratios = []
        for b in batches:
            g, c = kernels.get(f"gpu|CUDA|{b}"), kernels.get(f"cpu|CPU 1 thread|{b}")
            ratios.append(f"{g / c:.1f}x" if g and c else "—")
        lines.append("| gpu graph on CUDA / cpu graph on 1 thread | | " + " | ".join(ratios) + " |")
    if results.get("nvforest"):
        rates = [results["nvforest"].get(str(b)) for b in batches]
        lines.append("| nvForest | GPU | " + " | ".join(fmt_rate(r) for r in rates) + " |")
    out = ["Kernels (`session.run` only, rows/s):", "", *lines, ""]
    out += [
        "Parity against scikit-learn (max |p - sklearn|):",
        "",
        "| graph, provider | max diff |",
        "| --- | --- |",
    ]
    out += [f"| {k.replace('|', ', ')} | {v:.1e} |" for k, v in results["parity"].items()]
    out += ["", "End to end (Parquet read, encode, score, Parquet write; rows/s):", ""]
    out += ["| graph, provider | rows/s |", "| --- | --- |"]
    out += [f"| {k} | {fmt_rate(v)} |" for k, v in results["end_to_end"].items()]
    return "\n".join(out)


if __name__ == "__main__":
    main()
