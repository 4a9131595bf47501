"""The BentoML peer as BentoML's docs write it: an `@bentoml.service` that loads the ONNX
export into an ONNX Runtime session and a batchable `@bentoml.api` taking a list of rows,
with BentoML's adaptive batching (`bentoml serve bench.apps.bento_batchable:BentoOnnx`;
the model directory in `BENCH_MODEL_DIR`). The rows become the model's feeds through the
same encoder as ours, so only the serving path differs.

Checked against BentoML 1.4's adaptive batching guide: one batchable parameter, a list, with
`batch_dim=(0, 0)`, `max_batch_size` and `max_latency_ms` on `@bentoml.api`. BentoML counts
`max_batch_size` in rows and cuts a larger request into pieces, so it is the bench's largest
request (1,000 rows), not the guide's 32; `max_latency_ms` is the guide's 1,000 (a request
that cannot be answered within it gets a 503, which the bench counts)."""

import json
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort

from models.onnx_export import onnx_inputs_from_rows, score_onnx


@bentoml.service(workers=1)
class BentoOnnx:
    def __init__(self) -> None:
        model_dir = Path(os.environ["BENCH_MODEL_DIR"])
        self.schema = json.loads((model_dir / "schema.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.order = [*self.schema["numeric"], *self.schema["categorical"]]

    @bentoml.api(batchable=True, batch_dim=(0, 0), max_batch_size=1000, max_latency_ms=1000)
    def predict(self, rows: list[dict[str, Any]]) -> list[float]:
        order = self.order
        feeds = onnx_inputs_from_rows([tuple(r[c] for c in order) for r in rows], self.schema)
        scores: np.ndarray = score_onnx(self.session, feeds)
        return scores.tolist()
