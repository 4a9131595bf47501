"""Process settings of MLflow's and Prefect's clients: the embedded default, or team mode's
servers and credentials from the config, applied before Prefect is imported."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.prefect_server import PrefectServer
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


def ephemeral_server_dies_with_this_process() -> None:
    """Prefect's temporary API server (a uvicorn child that Prefect starts on first use, and
    stops only at a normal exit) gets SIGTERM when this process dies, SIGKILL included.

    Prefect has no hook for that child's start: its server module's `subprocess` is given a
    `Popen` that adds `services.processes.die_with_parent_preexec` (PR_SET_PDEATHSIG). Only
    from the main thread: the signal follows the thread that started the child, and a
    helper thread's end must not stop a server the whole process uses."""
    import subprocess
    import threading
    import types

    import prefect.server.api.server as server_module

    from services.processes import die_with_parent_preexec

    if getattr(server_module.subprocess, "mlgate_dies_with_parent", False):
        return

    class Popen(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if threading.current_thread() is threading.main_thread():
                kwargs.setdefault("preexec_fn", die_with_parent_preexec())
            super().__init__(*args, **kwargs)

    patched = types.SimpleNamespace(**vars(subprocess))
    patched.Popen = Popen
    patched.mlgate_dies_with_parent = True
    server_module.subprocess = patched  # type: ignore[assignment]


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


def use_configured_servers(cfg: MlgateConfig, *, start_now: bool = True) -> PrefectServer | None:
    """Team mode's servers where the config names them, else the embedded default: what a
    command that runs a flow calls before it imports Prefect.

    In the embedded default with `start_now`, the temporary Prefect server starts here, so
    it starts while the command imports its flow; the command calls its `wait_ready`
    before the flow. Without `start_now`, or once Prefect is imported, or off the main
    thread, Prefect starts it itself on first use (dying with this process all the same)."""
    use_team_servers(cfg.registry, cfg.orchestration)
    use_embedded_prefect(cfg.registry.store_dir)
    if cfg.orchestration.api_url or os.environ.get("PREFECT_API_URL"):
        return None
    # Early only where it can be: a process that has imported Prefect already (a test
    # harness, a caller embedding the CLI) or a helper thread gets Prefect's own lazy start.
    early = start_now and "prefect" not in sys.modules
    if early and threading.current_thread() is threading.main_thread():
        from flows.prefect_server import start_prefect_server

        return start_prefect_server()
    ephemeral_server_dies_with_this_process()
    return None
