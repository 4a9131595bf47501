"""The names of the scheduled Prefect deployments, for the code that serves them
(`flows/schedule.py`) and the code that starts them (`flows/monitoring.py`)."""

from __future__ import annotations

TRAINING_NAME = "mlgate-training"
MONITORING_NAME = "mlgate-monitoring"
# How `run_deployment` names a deployment: `<flow name>/<deployment name>`.
TRAINING_DEPLOYMENT = f"training_flow/{TRAINING_NAME}"
MONITORING_DEPLOYMENT = f"monitoring_flow/{MONITORING_NAME}"
