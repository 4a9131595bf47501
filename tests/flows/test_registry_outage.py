"""`registry.connect` when the registry cannot be used, and the registration check.

A locked SQLite registry or a tracking server that does not answer is retried for
`registry.unavailable_retry_s` and then named in one line (`RegistryUnavailableError`),
never a driver's traceback. A SQLite registry that existed and went missing is never
replaced by a new, empty one: its marker (or, for an older store, its artifact folder) tells
it from first use. A model whose graph refers to external data is refused at registration,
naming the tensor."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from flows import registry
from models.config import RegistryConfig, load_config
from models.onnx_export import OnnxModel, sha256_bytes
from services.registry_access import RegistryUnavailableError as AccessUnavailableError
from tests.conftest import REPO, write_config
from tests.services.conftest import free_port

pytestmark = pytest.mark.integration

CONNECT_AND_SAY = """
import sys
from pathlib import Path
from flows import registry
from models.config import RegistryConfig
try:
    registry.connect(RegistryConfig(store_dir=Path(sys.argv[1]), unavailable_retry_s=1.0))
    print("connected")
except registry.RegistryUnavailableError as err:
    print(f"unavailable: {err}")
"""


def _store(tmp_path: Path) -> RegistryConfig:
    return load_config(write_config(tmp_path)).registry


def test_first_use_creates_the_registry_and_its_marker(tmp_path: Path) -> None:
    cfg = _store(tmp_path)
    database = cfg.store_dir / "mlflow.db"
    assert not database.exists()
    client = registry.connect(cfg)
    client.search_experiments()
    assert database.is_file()
    assert registry.registry_marker(database).is_file()


def test_a_missing_registry_is_named_and_not_created_again(tmp_path: Path) -> None:
    cfg = _store(tmp_path)
    registry.connect(cfg).search_experiments()
    database = cfg.store_dir / "mlflow.db"
    database.rename(tmp_path / "moved-away.db")

    with pytest.raises(registry.RegistryUnavailableError) as info:
        registry.connect(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert f"registry database {database} is missing" in message
    assert "restore it" in message
    assert not database.exists()
    # Both layers' handlers catch it: the CLI's `except RegistryError`, the service's own.
    assert isinstance(info.value, registry.RegistryError)
    assert isinstance(info.value, AccessUnavailableError)

    # Deleting the marker is how a person says "start a new, empty registry". (This process
    # keeps MLflow's store of that path open, so only the check itself is asked here.)
    registry.registry_marker(database).unlink()
    registry.check_registry_present(cfg, database)


def test_a_store_from_before_the_marker_is_told_by_its_artifacts(tmp_path: Path) -> None:
    cfg = _store(tmp_path)
    run_artifacts = cfg.store_dir / "artifacts" / "1" / "abc" / "artifacts"
    run_artifacts.mkdir(parents=True)
    (run_artifacts / "evidence.json").write_text("{}")
    database = cfg.store_dir / "mlflow.db"

    with pytest.raises(registry.RegistryUnavailableError, match="holds the artifacts"):
        registry.connect(cfg)
    assert not database.exists()


def test_a_locked_registry_is_one_line_after_a_bounded_retry(tmp_path: Path) -> None:
    cfg = _store(tmp_path)
    registry.connect(cfg).search_experiments()
    database = cfg.store_dir / "mlflow.db"
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        # A new process: this one keeps MLflow's store open, so connecting again here would
        # not open the database.
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", CONNECT_AND_SAY, str(cfg.store_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [
        f"unavailable: registry {database} is locked by another process "
        "(SQLite: database is locked) (tried for 1 s)"
    ], out.stdout
    assert "Traceback" not in out.stderr
    # One try waits out SQLite's 5 s busy timeout; the retry stops after 1 s more.
    assert elapsed < 60


def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = RegistryConfig(store_dir=tmp_path / "store", tracking_uri=uri, unavailable_retry_s=1.0)
    started = time.monotonic()
    with pytest.raises(registry.RegistryUnavailableError) as info:
        registry.connect(cfg)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"registry {uri} cannot be reached: ")
    assert message.endswith("(tried for 1 s)")


def _external_data_model() -> OnnxModel:
    weights = numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "coefficients")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    entry = weights.external_data.add()
    entry.key, entry.value = "location", "coefficients.bin"
    graph = helper.make_graph(
        [helper.make_node("Add", ["tenure", "coefficients"], ["probabilities"])],
        "outside",
        [helper.make_tensor_value_info("tenure", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1])],
        initializer=[weights],
    )
    content = helper.make_model(graph).SerializeToString()
    return OnnxModel(content=content, sha256=sha256_bytes(content))


def test_registration_refuses_external_data_naming_the_tensor(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    client = registry.connect(cfg.registry)
    with pytest.raises(registry.RegistryError) as info:
        registry.register_onnx_model(
            client,
            cfg.registry,
            cfg.dataset,
            _external_data_model(),
            run_name="hand-made",
            tags={},
        )
    message = str(info.value)
    assert "hand-made cannot be registered" in message
    assert "tensor 'coefficients'" in message
    assert "'coefficients.bin'" in message
    assert client.search_model_versions(f"name='{cfg.registry.model_name}'") == []
    assert client.get_experiment_by_name(cfg.registry.experiment) is None


def test_a_cli_command_on_a_missing_registry_says_it_in_one_line(tmp_path: Path) -> None:
    """`mlgate` (its entry point, `flows.cli:main`) turns the registry's error into one line
    and exit status 1, whichever command met it."""
    path = write_config(tmp_path)
    cfg = load_config(path).registry
    registry.connect(cfg).search_experiments()
    (cfg.store_dir / "mlflow.db").rename(tmp_path / "moved-away.db")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "history", cfg.model_name, "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "2000"},  # rich would wrap the line at 80
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: registry database"), lines
    assert "is missing" in lines[0]
    assert not (cfg.store_dir / "mlflow.db").exists()
