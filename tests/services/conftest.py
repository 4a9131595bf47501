"""A real registry for the serving tests: a small logistic regression trained on the bundled
data, exported to ONNX and registered in a throw-away MLflow store exactly as the training
flow does it (model/ artifacts, the sha256 tag, `@champion`; `models.registry_layout`).

The config turns authentication on: API keys in the config (one active, one revoked, one
with a tiny rate limit) and one more in `MLGATE_API_KEYS` (the `server` fixtures pass it).
Clients send `Authorization: Bearer <token>`; only the sha256 digests are configured."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from models.config import MlgateConfig, TrainConfig, load_config
from models.data import load_dataset, split_data
from models.onnx_export import export_onnx, sha256_file, write_model_dir
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG
from models.train import train_model
from services.auth import hash_api_key

REPO_ROOT = Path(__file__).resolve().parents[2]

CLIENT_TOKEN = "client-token-3f9d"
REVOKED_TOKEN = "retired-token-77aa"
LIMITED_TOKEN = "tiny-token-0c1e"
ENV_TOKEN = "env-token-52b0"
ENV_KEYS = f"ci:{hash_api_key(ENV_TOKEN)}"
AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}


@dataclass(frozen=True)
class Registry:
    config_path: Path
    cfg: MlgateConfig
    tracking_uri: str
    model_name: str
    champion_version: str
    model_dir: Path
    run_id: str
    artifact_uri: str
    holdout: pd.DataFrame


def copy_registry(
    registry: Registry,
    root: Path,
    registry_keys: dict[str, Any] | None = None,
    serving_keys: dict[str, Any] | None = None,
) -> Path:
    """The config of a registry of the test's own under `root`: a copy of the serving
    registry's MLflow database (the same champion; artifacts read from the original store),
    its own inference log, and the given `registry:` / `serving:` keys. Its path."""
    store = root / "store"
    store.mkdir()
    with (
        closing(sqlite3.connect(registry.cfg.registry.store_dir / "mlflow.db")) as src,
        closing(sqlite3.connect(store / "mlflow.db")) as dst,
    ):
        src.backup(dst)
    raw = yaml.safe_load(registry.config_path.read_text())
    raw["registry"]["store_dir"] = str(store)
    raw["registry"].update(registry_keys or {})
    raw["serving"]["inference_log_dir"] = str(root / "inference_log")
    raw["serving"].update(serving_keys or {})
    config_path = root / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_path


@contextmanager
def serving_with(registry: Registry, work: Path, serving_keys: dict[str, Any]) -> Iterator[Any]:
    """A `bentoml serve` of the serving registry's @champion with these `serving:` keys (its
    config and BentoML home under `work`), ready; stopped on exit."""
    from models.model_ref import ModelRef
    from services.launcher import start_service

    raw = yaml.safe_load(registry.config_path.read_text())
    raw["serving"].update(serving_keys)
    config_path = work / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with start_service(
        config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        env={"BENTOML_HOME": str(work / "home"), "MLGATE_API_KEYS": ENV_KEYS},
    ) as proc:
        proc.wait_ready(timeout=300.0)
        yield proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("serving")
    raw = yaml.safe_load((REPO_ROOT / "mlgate.yaml").read_text())
    raw["dataset"]["path"] = str(REPO_ROOT / "data" / "churn.parquet")
    raw["registry"]["store_dir"] = str(root / "store")
    raw["serving"]["port"] = free_port()
    raw["serving"].update(
        {
            "api_keys": [
                {"name": "client", "sha256": hash_api_key(CLIENT_TOKEN)},
                {"name": "retired", "sha256": hash_api_key(REVOKED_TOKEN), "revoked": True},
                {
                    "name": "tiny",
                    "sha256": hash_api_key(LIMITED_TOKEN),
                    "rate_limit_per_s": 0.2,
                    "rate_limit_burst": 2,
                },
            ],
            # High enough that the load test measures the service, not the limiter.
            "rate_limit_per_s": 100000.0,
            "rate_limit_burst": 100000,
            "inference_log_dir": str(root / "inference_log"),
            "inference_log_flush_s": 0.5,
        }
    )
    config_path = root / "mlgate.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(config_path)

    train_cfg = TrainConfig(estimator="logistic_regression")
    split = split_data(load_dataset(cfg.dataset), cfg.dataset, train_cfg)
    trained = train_model(split.train, cfg.dataset, train_cfg)
    model_dir = write_model_dir(
        export_onnx(trained.pipeline, cfg.dataset), cfg.dataset, root / "export" / "model"
    )

    tracking_uri = cfg.registry.resolved_tracking_uri()
    name = cfg.registry.model_name
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment(
        cfg.registry.experiment, artifact_location=cfg.registry.artifact_location()
    )
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT_DIR)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=run.info.run_id,
        tags={SHA_TAG: sha256_file(model_dir / "model.onnx")},
    )
    client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
    return Registry(
        config_path=config_path,
        cfg=cfg,
        tracking_uri=tracking_uri,
        model_name=name,
        champion_version=str(mv.version),
        model_dir=model_dir,
        run_id=run.info.run_id,
        artifact_uri=run.info.artifact_uri,
        holdout=split.holdout,
    )
