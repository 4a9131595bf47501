"""The `mlgate stack` commands: team mode's servers as local processes (up, status, down, env),
and mlgate's deployments on its Prefect server (deploy, reconcile).

What runs and how is in `services/stack.py`; this module calls it and renders each part:
where it is, its pid when it runs here, and whether it answers. `up` and `status` exit 1
when a part that should run is down, so scripts and health checks can rely on them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flows.cli_common import (
    EXIT_ERROR,
    ConfigOpt,
    JsonOpt,
    console,
    exit_error,
    load_config_or_exit,
)

if TYPE_CHECKING:
    from models.config import MlgateConfig
    from services.stack import PartStatus

stack_app = typer.Typer(
    help=(
        "Team mode's servers on this host: PostgreSQL, the MLflow tracking server, the Prefect "
        "server and its workers, Dask."
    ),
    no_args_is_help=True,
)


def _slices(cfg: MlgateConfig) -> tuple[Any, Any, Any, Any]:
    return cfg.stack, cfg.registry, cfg.orchestration, cfg.dask


def _render(parts: list[PartStatus], as_json: bool) -> None:
    if as_json:
        print(json.dumps([p.to_dict() for p in parts], indent=2))
        return
    table = Table(title="mlgate stack")
    for col in ("part", "address", "runs", "pid", "health", "detail"):
        table.add_column(col, overflow="fold")
    for p in parts:
        runs = "here" if p.managed else ("elsewhere" if p.expected else "off")
        health = "[green]up[/]" if p.healthy else ("[bold red]DOWN[/]" if p.expected else "-")
        table.add_row(p.name, p.address, runs, str(p.pid or "-"), health, p.detail)
    console.print(table)


def _exit_if_down(parts: list[PartStatus]) -> None:
    down = [p.name for p in parts if p.expected and not p.healthy]
    if down:
        raise exit_error(f"down: {', '.join(down)}", EXIT_ERROR)


@stack_app.command()
def up(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """Start every part that should run here and is not running yet; wait until each answers."""
    from services.stack import StackError, start_stack

    cfg = load_config_or_exit(config)
    try:
        parts = start_stack(*_slices(cfg))
    except StackError as err:
        raise exit_error(str(err)) from None
    _render(parts, as_json)
    _exit_if_down(parts)


@stack_app.command()
def status(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """Each part, its address, pid and health; exit 1 if a part that should run is down."""
    from services.stack import stack_status

    cfg = load_config_or_exit(config)
    parts = stack_status(*_slices(cfg))
    _render(parts, as_json)
    _exit_if_down(parts)


@stack_app.command()
def down(config: ConfigOpt = Path("mlgate.yaml")) -> None:
    """Stop every process the stack started (data and logs stay under the stack dir)."""
    from services.stack import stop_stack

    cfg = load_config_or_exit(config)
    stopped = stop_stack(cfg.stack, cfg.registry)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command()
def env(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """The MLGATE_ settings that point this host's clients at the stack's parts (the lock DSN
    holds a password): `eval "$(mlgate stack env)"`."""
    from services.stack import client_settings

    cfg = load_config_or_exit(config)
    settings = client_settings(*_slices(cfg))
    if as_json:
        print(json.dumps(settings, indent=2))
        return
    for key, value in settings.items():
        print(f"export {key}={shlex.quote(value)}")


@stack_app.command()
def deploy(
    config: ConfigOpt = Path("mlgate.yaml"),
    paused: Annotated[
        bool, typer.Option("--paused", help="Pause the schedules (runs still start on demand).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply prefect.yaml's deployments and mlgate-reconcile to the Prefect server's work pool,
    with heartbeats and the automations that handle a worker dying mid-run (flows/deploy.py)."""
    from flows.deploy import DeployError, deploy_team

    cfg = load_config_or_exit(config)
    try:
        deployed = deploy_team(cfg, config, schedules_active=not paused)
    except DeployError as err:
        raise exit_error(str(err)) from None
    if as_json:
        print(json.dumps(asdict(deployed), indent=2))
        return
    table = Table(title=f"deployed to work pool {cfg.orchestration.work_pool!r}")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("id")
    for name, id_ in deployed.deployments.items():
        table.add_row("deployment", name, id_)
    for name, id_ in deployed.automations.items():
        table.add_row("automation", name, id_)
    console.print(table)


@stack_app.command()
def reconcile(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """Resubmit crashed training runs now (what mlgate-reconcile does on the server)."""
    from flows.deploy import DeployError, team_prefect
    from flows.reconcile import reconcile_crashed_training

    cfg = load_config_or_exit(config)
    try:
        with team_prefect(cfg.orchestration):
            crashed = reconcile_crashed_training(cfg)
    except DeployError as err:
        raise exit_error(str(err)) from None
    if as_json:
        print(json.dumps([asdict(c) for c in crashed], indent=2))
        return
    for c in crashed:
        console.print(c.describe())
    if not crashed:
        console.print("no crashed training run to reconcile")
