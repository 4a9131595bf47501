"""The `mlgate shadow` commands: start, stop, status and the report of a shadow deployment
(flows/shadow.py does the work; services/shadow.py is the serving side). Mounted by
`flows/cli.py`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli_common import EXIT_USAGE, ConfigOpt, JsonOpt, console
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load
from flows.cli_registry import registry_call

shadow_app = typer.Typer(
    help=(
        "Shadow deployments: a version scores every request beside @champion, off the "
        "request path, and is judged on the same rows."
    ),
    no_args_is_help=True,
)

EXIT_REJECTED = 3


def _client(config: Path) -> tuple[Any, Any]:
    from flows import registry

    cfg = _load(config)
    return cfg, registry_call(registry.connect, cfg.registry)


@shadow_app.command("start")
def shadow_start(
    version: Annotated[str, typer.Argument(help="The version to shadow @champion.")],
    config: ConfigOpt = Path("mlgate.yaml"),
) -> None:
    """Make every service of the model that serves @champion also score VERSION."""
    from flows.shadow import start_shadow

    cfg, client = _client(config)
    state = registry_call(start_shadow, client, cfg.registry.model_name, version)
    console.print(
        f"v{state.version} shadows @champion v{state.champion_version} of "
        f"{cfg.registry.model_name} since {state.since:%Y-%m-%d %H:%M:%S} UTC; running "
        f"services pick it up within {cfg.serving.shadow_poll_s:g} s. "
        "`mlgate shadow report` judges it."
    )


@shadow_app.command("stop")
def shadow_stop(config: ConfigOpt = Path("mlgate.yaml")) -> None:
    """Stop the shadow: services write what they hold and score with @champion only."""
    from flows.shadow import stop_shadow

    cfg, client = _client(config)
    stopped = registry_call(stop_shadow, client, cfg.registry.model_name)
    console.print(f"v{stopped} no longer shadows" if stopped else "no version shadows")


@shadow_app.command("status")
def shadow_status(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """Which version shadows, since when, and how many pairs the inference log holds."""
    from checks.shadow import pair_rows
    from flows.shadow import shadow_state
    from services.inference_log import read_inference_log

    cfg, client = _client(config)
    state = registry_call(shadow_state, client, cfg.registry.model_name)
    pairs = 0
    if state.version and state.since and state.champion_version:
        log = read_inference_log(
            cfg.inference_log_location(), cfg.registry.model_name, state.since, datetime.now(UTC)
        )
        pairs = len(pair_rows(log, state.champion_version, state.version))
    shown = {
        "shadow_version": state.version,
        "champion_version": state.champion_version,
        "since": state.since.isoformat() if state.since else None,
        "pairs": pairs,
    }
    if as_json:
        print(json.dumps(shown))
        return
    if not state.version:
        console.print("no version shadows")
        return
    console.print(
        f"v{state.version} shadows @champion v{state.champion_version} since "
        f"{shown['since']}: {pairs:,} paired rows in the inference log"
    )


@shadow_app.command("report")
def shadow_report_cmd(
    config: ConfigOpt = Path("mlgate.yaml"),
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV/Parquet of labels fed back: request_id, optional row, the target.",
        ),
    ] = None,
    no_record: Annotated[
        bool, typer.Option("--no-record", help="Judge without recording gate.shadow.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Judge the shadow on its live pairs (and labels): exit 0 pass, 3 fail, 1 otherwise
    (inconclusive); recorded as `gate.shadow` on the version."""
    from checks.result import GateStatus
    from flows.gate_tables import gate_detail_table
    from flows.shadow import shadow_report

    cfg, client = _client(config)
    try:
        result = registry_call(shadow_report, cfg, client, labels_path=labels, record=not no_record)
    except ValueError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(gate_detail_table(result))
        console.print(f"shadow: {result.status.value}: {result.reason}")
    if result.status is GateStatus.PASS:
        return
    raise typer.Exit(EXIT_REJECTED if result.status is GateStatus.FAIL else 1)
