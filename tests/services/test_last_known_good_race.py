"""Last-known-good copies saved by several workers at once: every record names a whole copy."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from models.model_ref import ModelRef
from models.onnx_export import sha256_bytes
from services.model_store import LoadedModel, load_last_known_good, save_last_known_good

pytestmark = pytest.mark.fast

TRACKING_URI = "http://registry.example:5000"
SAVES = 150


def _model(version: str, scale: float) -> LoadedModel:
    """A tiny self-contained ONNX graph; `scale` makes each version's bytes its own."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        f"g{version}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])],
    )
    content = helper.make_model(graph).SerializeToString()
    return LoadedModel(
        name="churn",
        version=version,
        alias="champion",
        sha256=sha256_bytes(content),
        content=content,
        schema={"numeric": ["x"], "categorical": []},
    )


def test_workers_saving_different_versions_at_once_never_leave_a_record_without_its_copy(
    tmp_path: Path,
) -> None:
    """Two workers keep the copy of `@champion` while the alias moves between versions 1 and
    2 (each saves the version it fetched); a third reads the copy as an outage would. The
    reader always finds the copy its record names, and the last record names a whole copy."""
    models = [_model("1", 2.0), _model("2", 3.0)]
    errors: list[BaseException] = []
    done = threading.Event()

    def saver(model: LoadedModel) -> None:
        try:
            for _ in range(SAVES):
                save_last_known_good(model, tmp_path, TRACKING_URI)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def reader() -> None:
        ref = ModelRef("churn", alias="champion")
        while not done.is_set():
            try:
                kept = load_last_known_good(tmp_path, ref, TRACKING_URI, reason="test")
            except BaseException as err:
                if "does not exist" in str(err):  # before the first save
                    continue
                errors.append(err)
                return
            if sha256_bytes(kept.content) != kept.sha256:
                errors.append(AssertionError(f"v{kept.version}'s bytes do not match its sha256"))
                return

    savers = [threading.Thread(target=saver, args=(m,)) for m in models]
    read = threading.Thread(target=reader)
    read.start()
    for t in savers:
        t.start()
    for t in savers:
        t.join()
    done.set()
    read.join()
    assert not errors, errors[0]
    kept = load_last_known_good(
        tmp_path, ModelRef("churn", alias="champion"), TRACKING_URI, reason="t"
    )
    assert kept.version in ("1", "2")
    copies = [p.name for p in (tmp_path / "churn" / "alias-champion").iterdir() if p.is_dir()]
    assert copies == [kept.sha256]
