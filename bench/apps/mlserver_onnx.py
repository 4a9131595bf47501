"""The MLServer peer's runtime: MLServer 1.7.1 has no ONNX runtime of its own, so this is a
custom `MLModel` holding an ONNX Runtime session, as MLServer's docs write custom runtimes
(the V2 inference protocol in, one input per feature; `probabilities` out). MLServer's
adaptive batching joins concurrent requests along the first axis before `predict`.
It runs in the throwaway MLServer venv bench/serving.py makes, not in the project's."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        model_dir = Path(await get_model_uri(self._settings))
        self.schema = json.loads((model_dir / "schema.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.numeric = set(self.schema["numeric"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for item in payload.inputs:
            if item.name in self.numeric:
                feeds[item.name] = NumpyCodec.decode_input(item).astype(np.float32).reshape(-1, 1)
            else:
                labels = StringCodec.decode_input(item)
                feeds[item.name] = np.array(labels, dtype=object).reshape(-1, 1)
        (probs,) = self.session.run(["probabilities"], feeds)
        scores = np.asarray(probs[:, 1], dtype=np.float64)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("score", scores)],
        )
