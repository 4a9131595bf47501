"""The scheduled deployments: monitoring every hour, training weekly (cron from the config).

`mlgate schedule` serves them from this process with Prefect's runner, so schedules work on
the embedded default without a separate worker; `prefect.yaml` declares the same two
deployments for a Prefect server with a work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.deployments import MONITORING_NAME, TRAINING_NAME
from flows.monitoring import monitoring_flow
from flows.training import training_flow
from models.config import MlgateConfig


def build_deployments(cfg: MlgateConfig, config_path: Path) -> list[Any]:
    params = {"config_path": str(config_path.resolve())}
    return [
        training_flow.to_deployment(
            name=TRAINING_NAME,
            cron=cfg.monitor.training_cron,
            parameters=params,
            description="Train a challenger and let the gates decide (mlgate).",
            tags=["mlgate", cfg.registry.model_name],
        ),
        monitoring_flow.to_deployment(
            name=MONITORING_NAME,
            cron=cfg.monitor.monitor_cron,
            parameters=params,
            description="One monitoring window: data gate, PSI drift, retraining trigger.",
            tags=["mlgate", cfg.registry.model_name],
        ),
    ]


def serve_schedules(cfg: MlgateConfig, config_path: Path) -> None:
    from prefect import serve

    serve(*build_deployments(cfg, config_path), print_starting_message=True)
