"""Process settings for Prefect's embedded default, applied before Prefect is imported."""

from __future__ import annotations

import os
from pathlib import Path


def use_embedded_prefect(store_dir: Path) -> None:
    """Without PREFECT_API_URL, flows run in-process against a temporary local API server.

    Its default 20 s start-up timeout is too short on a busy 2-core machine (first start
    migrates a fresh database), and its telemetry would try the network. Settings already in
    the environment win, so a real Prefect server is used when one is configured.
    """
    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(store_dir).resolve() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    # MLflow's per-download progress bars would interleave with the gate tables.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
