"""What every group of `mlgate` commands shares: exit statuses, consoles, config loading.

Exit status: 0 done (for `train`: the challenger was accepted), 1 an error, 2 bad usage or
config, 3 the challenger was rejected by a gate (the run itself worked). `flows/cli.py`
holds training and serving and mounts the groups: `flows/cli_registry.py` (gates, models,
promote, rollback, history), `flows/cli_canary.py` (canary), `flows/cli_stack.py` (stack).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Config file.", show_default=True)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why: recorded in the history.")]


def exit_error(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print `message` as an error; returns the `typer.Exit` to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def load_config_or_exit(config: Path) -> Any:
    """The validated config, or exit 2 with the file and field named."""
    from models.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as err:
        raise exit_error(str(err), EXIT_USAGE) from None


def wait_for_prefect_or_exit(server: Any) -> None:
    """Wait for the temporary Prefect server `use_configured_servers` started (None: there
    is none to wait for), or exit 1 saying why it is not there."""
    if server is None:
        return
    from flows.prefect_server import PrefectServerError

    try:
        server.wait_ready()
    except PrefectServerError as err:
        raise exit_error(str(err)) from None
