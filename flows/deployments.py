"""The Prefect deployments of mlgate: their names, for the code that starts them
(`flows/monitoring.py`, `flows/reconcile.py`), and their definitions, read from
`prefect.yaml` for the code that serves them here (`flows/schedule.py`) or applies them to a
Prefect server (`flows/deploy.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from models.config import MonitorConfig

TRAINING_NAME = "mlgate-training"
MONITORING_NAME = "mlgate-monitoring"
# Team mode only: what the server runs when a training run crashed (flows/reconcile.py).
RECONCILE_NAME = "mlgate-reconcile"
# How `run_deployment` names a deployment: `<flow name>/<deployment name>`.
TRAINING_DEPLOYMENT = f"training_flow/{TRAINING_NAME}"
MONITORING_DEPLOYMENT = f"monitoring_flow/{MONITORING_NAME}"
RECONCILE_DEPLOYMENT = f"reconcile_flow/{RECONCILE_NAME}"

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as `prefect.yaml` declares it, its cron taken from the config."""

    name: str
    entrypoint: str  # `path/from/repo.py:flow_function`
    description: str
    tags: tuple[str, ...]
    cron: str | None


def deployment_specs(monitor: MonitorConfig) -> list[DeploymentSpec]:
    """The deployments of `prefect.yaml`. The config's crons win over the file's (the
    file's are the config's defaults): the schedule is the config's to change."""
    crons = {TRAINING_NAME: monitor.training_cron, MONITORING_NAME: monitor.monitor_cron}
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    specs = []
    for d in raw["deployments"]:
        declared = [s["cron"] for s in d.get("schedules") or [] if "cron" in s]
        specs.append(
            DeploymentSpec(
                name=d["name"],
                entrypoint=d["entrypoint"],
                description=d.get("description", ""),
                tags=tuple(d.get("tags") or ()),
                cron=crons.get(d["name"], declared[0] if declared else None),
            )
        )
    return specs
