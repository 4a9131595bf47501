"""Process settings of MLflow's and Prefect's clients: the embedded default, or team mode's
servers and credentials from the config, applied before Prefect is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import MlgateConfig, OrchestrationConfig, RegistryConfig


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


def use_team_servers(
    registry: RegistryConfig, orchestration: OrchestrationConfig | None = None
) -> None:
    """The one place the config reaches MLflow's and Prefect's clients, which read their
    server and credentials from the environment: the tracking server's basic-auth user
    (`registry.username`, `registry.password`) and, given `orchestration` with an `api_url`,
    the Prefect server and its auth string. Nothing is set in the embedded default. The
    config wins over the environment: its own MLGATE_ overrides are where a host says which
    servers it uses. Call it before Prefect is imported (`registry.connect` calls it for
    MLflow)."""
    if registry.password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = registry.username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = registry.password.get_secret_value()
    if orchestration is not None:
        os.environ.update(prefect_client_settings(orchestration))


def prefect_client_settings(orchestration: OrchestrationConfig) -> dict[str, str]:
    """The config's Prefect server and auth string as Prefect's client settings, by name:
    set in the environment by `use_team_servers`, or for one block by
    `flows.deploy.team_prefect`. Empty in the embedded default."""
    if not orchestration.api_url:
        return {}
    settings = {"PREFECT_API_URL": orchestration.api_url}
    if orchestration.auth_string is not None:
        settings["PREFECT_API_AUTH_STRING"] = orchestration.auth_string.get_secret_value()
    return settings


def use_configured_servers(cfg: MlgateConfig) -> None:
    """Team mode's servers where the config names them, else the embedded default: what a
    command that runs a flow calls before it imports Prefect."""
    use_team_servers(cfg.registry, cfg.orchestration)
    use_embedded_prefect(cfg.registry.store_dir)
