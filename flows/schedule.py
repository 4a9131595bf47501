"""The scheduled deployments served here: monitoring every hour, training weekly (crons from
the config).

`mlgate schedule` serves them from this process with Prefect's runner, so schedules work on
the embedded default without a server or a worker. They are `prefect.yaml`'s deployments
(`flows/deployments.py` reads it); team mode applies the same ones to a Prefect server's work
pool instead (`mlgate stack deploy`, `flows/deploy.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.deployments import MONITORING_NAME, TRAINING_NAME, deployment_specs
from flows.monitoring import monitoring_flow
from flows.training import training_flow
from models.config import MlgateConfig


def build_deployments(cfg: MlgateConfig, config_path: Path) -> list[Any]:
    params = {"config_path": str(config_path.resolve())}
    flows: dict[str, Any] = {TRAINING_NAME: training_flow, MONITORING_NAME: monitoring_flow}
    return [
        flows[spec.name].to_deployment(
            name=spec.name,
            cron=spec.cron,
            parameters=params,
            description=f"{spec.description} (mlgate)",
            tags=[*spec.tags, cfg.registry.model_name],
        )
        for spec in deployment_specs(cfg.monitor)
        if spec.name in flows
    ]


def serve_schedules(cfg: MlgateConfig, config_path: Path) -> None:
    from prefect import serve

    serve(*build_deployments(cfg, config_path), print_starting_message=True)
