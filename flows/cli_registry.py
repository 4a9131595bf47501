"""The registry commands of `mlgate`: gate tables, versions, and alias moves (promote,
rollback, history, delete), all through the compare-and-set of `flows/alias_moves.py`.

`registry_app`'s commands are mounted at the top level (`mlgate promote`), `gates_app` and
`models_app` as groups (`mlgate models list`), by `flows/cli.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli_common import ConfigOpt, JsonOpt, ReasonOpt, console
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load

registry_app = typer.Typer()
gates_app = typer.Typer(help="Gate results of registered versions.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models, versions and aliases.", no_args_is_help=True)


@gates_app.command("show")
def gates_show(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Print the gate table of a registered version."""
    from mlflow.exceptions import MlflowException

    from flows import registry
    from flows.gate_tables import gate_tables

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise _fail(f"no version {version} of model {name!r} in the registry") from None
    results = registry.version_gate_results(client, mv)
    if not results:
        raise _fail(f"{name}/{version} has no gate evidence (tags: {registry.gate_tags(mv)})")
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    console.print(gate_tables(results, max_passed_rows=None))


@models_app.command("list")
def models_list(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """Versions of the config's model with aliases, primary metric and gate statuses."""
    from flows import model_versions, registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    name = cfg.registry.model_name
    rows = model_versions.list_versions(client, name)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no versions of {name!r} yet: run `mlgate train`")
        return
    gate_names = sorted({g for r in rows for g in r["gates"]})
    table = Table(title=f"{name}: registered versions")
    for col in ["version", "aliases", "outcome", "metric", *gate_names, "data hash", "commit"]:
        table.add_column(col)
    table.add_column("created")
    for r in rows:
        table.add_row(
            r["version"],
            ", ".join("@" + a for a in r["aliases"]),
            r["outcome"],
            f"{r['primary_metric']}={r['primary_metric_value']}",
            *(r["gates"].get(g, "-") for g in gate_names),
            r["data_hash"][:12],
            r["git_commit"][:12],
            r["created"],
        )
    console.print(table)


def registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from flows.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as err:
        raise _fail(str(err)) from None


def _print_move(move: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(move.__dict__, indent=2))
        return
    forced = " [bold red](forced)[/]" if move.forced else ""
    console.print(
        f"@{move.alias} of {move.model_name}: {move.from_version} -> "
        f"[bold]{move.to_version}[/]{forced} by {move.actor}; recorded as audit run "
        f"{move.audit_run_id}"
    )


AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]


@registry_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to move the alias to.")],
    reason: ReasonOpt,
    alias: AliasOpt = "champion",
    force: Annotated[
        bool, typer.Option("--force", help="Move without passing evidence (recorded).")
    ] = False,
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Move an alias to a version that carries passing evidence for every required gate."""
    from flows import alias_moves, registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    move = registry_call(
        alias_moves.promote,
        client,
        cfg.registry,
        name,
        version,
        reason=reason,
        alias=alias,
        force=force,
    )
    _print_move(move, as_json)


# A swap needs a poll, a fetch, a session and a warm-up; this much on top of the polls.
_SERVED_MARGIN_S = 30.0


@registry_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: ReasonOpt,
    alias: AliasOpt = "champion",
    wait_served: Annotated[
        list[str] | None,
        typer.Option(
            "--wait-served",
            metavar="URL",
            help=(
                "A service on the alias (repeatable): wait until its /model answers with the "
                "version rolled back to; the seconds are printed and recorded in the history."
            ),
        ),
    ] = None,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            "--wait-timeout",
            min=0.0,
            help="Seconds to wait for --wait-served (default: 3 x serving.alias_poll_s + 30).",
        ),
    ] = None,
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Move an alias back to its previous holder, taken from the recorded history; with
    --wait-served, until the services answer with it."""
    import time

    from flows import alias_moves, registry
    from services.served_wait import ServedWaitError, check_service_url, wait_until_served

    cfg = _load(config)
    try:
        urls = [check_service_url(url) for url in wait_served or []]
    except ValueError as err:
        raise _fail(f"--wait-served: {err}", code=2) from None
    poll_s = cfg.serving.alias_poll_s
    if urls and poll_s == 0:
        console.print(
            "[yellow]serving.alias_poll_s is 0 in this config: services started with it do "
            "not follow their alias, and answer with the old version until restarted[/]"
        )
    client = registry.connect(cfg.registry)
    started = time.monotonic()
    move = registry_call(
        alias_moves.rollback, client, cfg.registry, name, reason=reason, alias=alias
    )
    if not urls:
        _print_move(move, as_json)
        return
    timeout_s = wait_timeout if wait_timeout is not None else 3 * poll_s + _SERVED_MARGIN_S
    failure = None
    try:
        served: dict[str, float | None] = dict(
            wait_until_served(urls, move.to_version, started=started, timeout_s=timeout_s)
        )
    except ServedWaitError as err:
        served, failure = err.served, err
    registry_call(alias_moves.record_served, client, move, served)
    if as_json:
        print(json.dumps({**move.__dict__, "served_s": served}, indent=2))
    else:
        _print_move(move, False)
        for url, seconds in served.items():
            if seconds is not None:
                console.print(f"served by {url} in {seconds:.2f} s (v{move.to_version})")
    if failure is not None:
        raise _fail(f"the rollback is done, but the services are {failure}")


@registry_app.command()
def history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option("--alias", help="Only this alias.")] = None,
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Every alias move: when, who, from, to, why, forced or not."""
    from flows import alias_moves, registry

    cfg = _load(config)
    rows = alias_moves.alias_history(registry.connect(cfg.registry), name, alias)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{name}: alias history (newest first)")
    # A column for the seconds a move took to reach the services, once one was measured
    # (`mlgate rollback --wait-served`).
    measured = any(alias_moves.SERVED_S_TAG in h for h in rows)
    columns = ("at", "kind", "alias", "from", "to", "who", "forced")
    for col in (*columns, *(["served in"] if measured else []), "reason"):
        table.add_column(col, overflow="fold")
    for h in rows:
        served = h.get(alias_moves.SERVED_S_TAG, "")
        table.add_row(
            h.get("at", ""),
            h.get(registry.KIND_TAG, ""),
            h.get("alias", ""),
            h.get("from_version", ""),
            h.get("to_version", ""),
            h.get("actor", ""),
            h.get("forced", ""),
            *([f"{served} s" if served and served != "timeout" else served] if measured else []),
            h.get("reason", ""),
        )
    console.print(table if rows else f"no recorded moves for {name}")


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION.")],
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """One version with its evidence, links and lineage (data -> run -> version -> moves)."""
    from flows import model_versions, registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    info = registry_call(model_versions.describe_version, client, ref)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    table = Table(title=f"{info['name']} version {info['version']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in (
        "aliases",
        "outcome",
        "estimator",
        "primary_metric",
        "data_hash",
        "holdout_hash",
        "git_commit",
        "onnx_sha256",
        "created",
        "run_id",
        "source",
        "evidence",
        "report",
    ):
        value = info[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    for gate, status in sorted(info["gates"].items()):
        table.add_row(f"{registry.GATE_TAG_PREFIX}{gate}", status)
    console.print(table)
    lineage = Table(title="lineage: alias moves of this version")
    for col in ("at", "kind", "alias", "from", "to", "who", "reason"):
        lineage.add_column(col, overflow="fold")
    for h in info["moves"]:
        lineage.add_row(
            h.get("at", ""),
            h.get(registry.KIND_TAG, ""),
            h.get("alias", ""),
            h.get("from_version", ""),
            h.get("to_version", ""),
            h.get("actor", ""),
            h.get("reason", ""),
        )
    console.print(lineage)


@models_app.command("delete")
def models_delete(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to delete.")],
    reason: ReasonOpt,
    force: Annotated[
        bool, typer.Option("--force", help="Delete even when it holds an alias.")
    ] = False,
    config: ConfigOpt = Path("mlgate.yaml"),
) -> None:
    """Delete a version; refused for an alias holder unless forced. Recorded in the history."""
    from flows import alias_moves, registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    registry_call(
        alias_moves.delete_version, client, cfg.registry, name, version, reason=reason, force=force
    )
    console.print(f"deleted {name} version {version}")
