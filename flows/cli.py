"""The `mlgate` command line: the contract scripts, CI and data scientists rely on.

Exit status: 0 done (for `train`: the challenger was accepted), 1 an error, 2 bad usage or
config, 3 the challenger was rejected by a gate (the run itself worked).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli_canary import canary_app
from flows.cli_common import EXIT_ERROR as EXIT_ERROR
from flows.cli_common import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    ReasonOpt,
    console,
)
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load
from flows.cli_stack import stack_app

app = typer.Typer(
    name="mlgate",
    help=(
        "Continuous training that never lets a bad model reach users: data gate, "
        "champion-vs-challenger evidence, MLflow registry, ONNX serving.\n\n"
        "Exit status: 0 done (train: challenger accepted), 1 error, 2 bad usage or config, "
        "3 challenger rejected by a gate."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
gates_app = typer.Typer(help="Gate results of registered versions.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models, versions and aliases.", no_args_is_help=True)
app.add_typer(gates_app, name="gates")
app.add_typer(models_app, name="models")
app.add_typer(canary_app, name="canary")
app.add_typer(stack_app, name="stack")


@app.command()
def init(
    data: Annotated[Path, typer.Option("--data", help="CSV or Parquet file to model.")],
    target: Annotated[str, typer.Option("--target", help="Column to predict (binary).")],
    positive: Annotated[
        str | None, typer.Option("--positive", help="Positive class label (default: the rarer).")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Config to write.")] = Path(
        "mlgate.yaml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Write a starter mlgate.yaml for any CSV/Parquet file, inferring the features."""
    import yaml

    from models.config import ConfigError, config_from_dict
    from models.data import DataError, read_table
    from models.starter import infer_dataset_config

    if output.exists() and not force:
        raise _fail(f"{output} exists; pass --force to overwrite it", EXIT_USAGE)
    try:
        df = read_table(data)
        rel = os.path.relpath(data.resolve(), output.resolve().parent)
        inferred = infer_dataset_config(df, target, rel, positive)
    except DataError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    skipped = inferred.pop("_skipped")
    try:
        config_from_dict(
            {**inferred, "dataset": {**inferred["dataset"], "path": str(data)}}, output
        )
    except ConfigError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    header = (
        f"# mlgate starter config for {data.name} (written by `mlgate init`).\n"
        "# Every other section (train, gates, registry, serving) has defaults: see the\n"
        "# README. Review the feature lists, then run `mlgate train`.\n"
    )
    output.write_text(header + yaml.safe_dump(inferred, sort_keys=False))
    ds = inferred["dataset"]
    console.print(
        f"wrote [bold]{output}[/]: target [bold]{target}[/] (positive {ds['positive_label']!r}), "
        f"{len(ds['numeric_features'])} numeric and {len(ds['categorical_features'])} "
        f"categorical features, id column {ds['id_column']!r}"
    )
    for col, why in skipped.items():
        console.print(f"  skipped {col}: {why}")


@app.command()
def train(
    config: ConfigOpt = Path("mlgate.yaml"),
    data: Annotated[
        Path | None, typer.Option("--data", help="Train on this file instead of the config's.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the training flow: data gate, train, ONNX parity, champion gate, register."""
    from flows.gate_tables import gate_tables
    from flows.runtime import use_embedded_prefect
    from models.config import ConfigError
    from models.data import DataError

    use_embedded_prefect(_load(config).registry.store_dir)
    from flows.training import training_flow

    try:
        outcome = training_flow(config_path=str(config), data_path=str(data) if data else None)
    except (ConfigError, DataError) as err:
        raise _fail(str(err), EXIT_USAGE) from None
    except Exception as err:
        raise _fail(f"training flow failed: {type(err).__name__}: {err}") from None
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        console.print(gate_tables(outcome.gates))
        verdict = "[green]ACCEPTED[/]" if outcome.accepted else "[bold red]REJECTED[/]"
        where = f" at the {outcome.stopped_at} gate" if outcome.stopped_at else ""
        console.print(f"challenger {verdict}{where}: {outcome.reason}")
        if outcome.version:
            console.print(
                f"registered version {outcome.version}; @champion is now "
                f"{outcome.champion_after or outcome.champion_before or 'unset'}"
            )
    raise typer.Exit(EXIT_OK if outcome.accepted else EXIT_REJECTED)


@app.command()
def serve(
    config: ConfigOpt = Path("mlgate.yaml"),
    version: Annotated[
        str | None, typer.Option("--version", help="Serve this version instead of the alias.")
    ] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="Alias to serve.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default from config).")] = None,
) -> None:
    """Serve @champion (or a version) over HTTP with BentoML and ONNX Runtime."""
    from models.model_ref import ModelRef
    from services.launcher import start_service

    cfg = _load(config)
    try:
        if version:
            ref = ModelRef(cfg.registry.model_name, version=version)
        elif alias:
            ref = ModelRef(cfg.registry.model_name, alias=alias)
        else:
            ref = cfg.served_model()
    except ValueError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    port = port or cfg.serving.port
    proc = start_service(config, ref, port=port, host=cfg.serving.host)
    try:
        proc.wait_ready(timeout=180)
        console.print(
            f"serving {ref.name} {ref.selector} on "
            f"http://{cfg.serving.host}:{port}  (POST /predict; Ctrl-C stops)"
        )
        while proc.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
        return
    except Exception as err:
        raise _fail(f"service failed: {err}") from None
    finally:
        proc.stop()
    raise _fail(f"service exited on its own:\n{proc.output_tail()}")


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
    from flows import registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    name = cfg.registry.model_name
    rows = registry.list_versions(client, name)
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


@app.command()
def monitor(
    config: ConfigOpt = Path("mlgate.yaml"),
    no_retrain: Annotated[
        bool, typer.Option("--no-retrain", help="Evaluate and record, but never retrain.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one monitoring window: live data gate, PSI drift, retraining trigger."""
    from flows.gate_tables import gate_tables
    from flows.runtime import use_embedded_prefect

    use_embedded_prefect(_load(config).registry.store_dir)
    from flows.monitoring import monitoring_flow

    try:
        outcome = monitoring_flow(config_path=str(config), retrain=not no_retrain)
    except Exception as err:
        raise _fail(f"monitoring flow failed: {type(err).__name__}: {err}") from None
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
        return
    console.print(
        f"window {outcome.window_start:%Y-%m-%d %H:%M} – {outcome.window_end:%H:%M} UTC: "
        f"{outcome.rows} rows scored by champion v{outcome.champion_version}"
    )
    if outcome.gates:
        console.print(gate_tables(outcome.gates))
    for k, v in outcome.live_metrics.items():
        console.print(f"{k}: {v:.4f}")
    for name in outcome.quarantined:
        console.print(f"quarantined (failed its data gate, never trained on): {name}")
    console.print(f"decision: {outcome.decision}")
    if outcome.training:
        console.print(f"training: {outcome.training}")


@app.command()
def schedule(config: ConfigOpt = Path("mlgate.yaml")) -> None:
    """Serve the scheduled deployments (monitoring hourly, training weekly) until Ctrl-C."""
    from flows.runtime import use_embedded_prefect

    cfg = _load(config)
    use_embedded_prefect(cfg.registry.store_dir)
    from flows.schedule import serve_schedules

    console.print(
        f"serving deployments: monitoring '{cfg.monitor.monitor_cron}', training "
        f"'{cfg.monitor.training_cron}' (Ctrl-C stops)"
    )
    serve_schedules(cfg, config)


@app.command()
def report(
    run: Annotated[
        str | None, typer.Argument(help="Training run id (default: the latest).")
    ] = None,
    config: ConfigOpt = Path("mlgate.yaml"),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Append to this file (CI summary).")
    ] = None,
) -> None:
    """The markdown gate report of a training run, as CI writes it to the job summary."""
    from flows import registry
    from flows.gate_tables import training_report_markdown

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    run_id = run or _registry_call(registry.latest_training_run, client, cfg.registry)
    try:
        info = client.get_run(run_id)
    except Exception:
        raise _fail(
            f"no training run {run_id!r} in {cfg.registry.resolved_tracking_uri()}"
        ) from None
    gates = registry.run_gate_results(client, run_id)
    text = training_report_markdown(
        model_name=cfg.registry.model_name,
        run_id=run_id,
        tags=dict(info.data.tags),
        metrics=dict(info.data.metrics),
        gates=gates,
    )
    if output:
        with output.open("a") as f:
            f.write(text)
    print(text)


def _registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
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


@app.command()
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
    from flows import registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    move = _registry_call(
        registry.promote,
        client,
        cfg.registry,
        name,
        version,
        reason=reason,
        alias=alias,
        force=force,
    )
    _print_move(move, as_json)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: ReasonOpt,
    alias: AliasOpt = "champion",
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Move an alias back to its previous holder, taken from the recorded history."""
    from flows import registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    move = _registry_call(registry.rollback, client, cfg.registry, name, reason=reason, alias=alias)
    _print_move(move, as_json)


@app.command()
def history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option("--alias", help="Only this alias.")] = None,
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Every alias move: when, who, from, to, why, forced or not."""
    from flows import registry

    cfg = _load(config)
    rows = registry.alias_history(registry.connect(cfg.registry), name, alias)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{name}: alias history (newest first)")
    for col in ("at", "kind", "alias", "from", "to", "who", "forced", "reason"):
        table.add_column(col, overflow="fold")
    for h in rows:
        table.add_row(
            h.get("at", ""),
            h.get(registry.KIND_TAG, ""),
            h.get("alias", ""),
            h.get("from_version", ""),
            h.get("to_version", ""),
            h.get("actor", ""),
            h.get("forced", ""),
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
    from flows import registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    info = _registry_call(registry.describe_version, client, ref)
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
    from flows import registry

    cfg = _load(config)
    client = registry.connect(cfg.registry)
    _registry_call(
        registry.delete_version, client, cfg.registry, name, version, reason=reason, force=force
    )
    console.print(f"deleted {name} version {version}")


def main() -> None:
    app(prog_name="mlgate")


if __name__ == "__main__":
    main()
