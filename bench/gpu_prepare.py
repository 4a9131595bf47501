"""Writes the inputs of `bench/gpu.py`: both graphs of the bundled model and rows to score.

`bench/gpu.py` runs on GPU hosts that rarely hold the project's environment, so it imports
nothing of mlgate; this step, run where the project is installed, gives it a folder to copy:

- `model.onnx` (the CPU graph, TreeEnsemble, string inputs) and `model_gpu.onnx` (the GPU
  graph, `models.tree_graph`), exported from the bundled config's model trained on the
  bundled churn data (gradient boosting by default, `--estimator random_forest` for the
  other tree ensemble), with `schema.json`;
- `rows.parquet`: the feature columns of the bundled data resampled to `--rows` rows
  (seeded), nulls kept, as a client or `mlgate score` would send them;
- `sklearn_scores.npy`: scikit-learn's probabilities for the first 16,384 rows, so the
  bench reports both graphs' parity on the host it runs on;
- where `treelite` is installed (it is not a project dependency), `model.treelite` (the
  classifier as a Treelite checkpoint) and `encoded.npy` (the first 262,144 rows after the
  pipeline's preprocessing), for nvForest.

Run: .venv/bin/python -m bench.gpu_prepare OUT_DIR [--rows N] [--estimator NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.config import load_config
from models.data import load_dataset, split_data
from models.onnx_export import export_onnx, write_model_dir
from models.train import prepare_features, train_model

REPO = Path(__file__).resolve().parents[1]
PARITY_ROWS = 16_384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=1_048_576)
    parser.add_argument("--estimator", default="gradient_boosting")
    args = parser.parse_args()

    cfg = load_config(REPO / "mlgate.yaml")
    train_cfg = cfg.train
    if args.estimator != train_cfg.estimator:
        train_cfg = train_cfg.model_copy(update={"estimator": args.estimator, "params": {}})
    df = load_dataset(cfg.dataset, REPO / "data" / "churn.parquet")
    parts = split_data(df, cfg.dataset, train_cfg)
    model = train_model(parts.train, cfg.dataset, train_cfg)
    onnx_model = export_onnx(model.pipeline, cfg.dataset)
    if onnx_model.gpu_content is None:
        raise SystemExit(f"{args.estimator} has no GPU graph: choose a tree ensemble")
    write_model_dir(onnx_model, cfg.dataset, args.out_dir)

    rng = np.random.default_rng(0)
    rows = df[list(cfg.dataset.features)].iloc[rng.integers(0, len(df), args.rows)]
    rows = rows.reset_index(drop=True)
    rows.to_parquet(args.out_dir / "rows.parquet", index=False)
    head = prepare_features(rows.head(PARITY_ROWS), cfg.dataset)
    np.save(args.out_dir / "sklearn_scores.npy", model.pipeline.predict_proba(head)[:, 1])
    _write_treelite(model.pipeline, rows, cfg.dataset, args.out_dir)
    print(
        f"wrote {args.out_dir}: {args.estimator}, CPU graph {onnx_model.size_bytes:,} bytes, "
        f"GPU graph {len(onnx_model.gpu_content):,} bytes, {len(rows):,} rows"
    )


def _write_treelite(pipeline: Any, rows: pd.DataFrame, dataset: Any, out_dir: Path) -> None:
    try:
        import treelite
    except ImportError:
        print("treelite not installed: no model.treelite for nvForest")
        return
    clf = pipeline.named_steps["clf"]
    treelite.sklearn.import_model(clf).serialize(str(out_dir / "model.treelite"))
    encoded = pipeline.named_steps["prep"].transform(prepare_features(rows.head(262_144), dataset))
    np.save(out_dir / "encoded.npy", np.asarray(encoded, dtype=np.float32))


if __name__ == "__main__":
    main()
