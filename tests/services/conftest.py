"""A real registry for the serving tests: a small logistic regression trained on the bundled
data, exported to ONNX and registered in a throw-away MLflow store exactly as the training
flow does it (model/ artifacts, `onnx_sha256` tag, `@champion`)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from models.config import MlgateConfig, TrainConfig, load_config
from models.data import load_dataset, split_data
from models.onnx_export import export_onnx, sha256_file, write_model_dir
from models.train import train_model

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"onnx_sha256": sha256_file(model_dir / "model.onnx")},
    )
    client.set_registered_model_alias(name, "champion", mv.version)
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
