"""The `mlgate` command line: the contract scripts, CI and data scientists rely on.

Exit status: 0 done (for `train`: the challenger was accepted), 1 an error, 2 bad usage or
config, 3 the challenger was rejected by a gate (the run itself worked).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_canary import canary_app
from flows.cli_common import EXIT_ERROR as EXIT_ERROR
from flows.cli_common import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    console,
    wait_for_prefect_or_exit,
)
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load
from flows.cli_deploy import deploy_app
from flows.cli_keys import keys_app, print_new_token, require_api_keys
from flows.cli_registry import gates_app, history, models_app, promote, registry_call, rollback
from flows.cli_score import score
from flows.cli_shadow import shadow_app
from flows.cli_slo import slo_app
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
app.add_typer(gates_app, name="gates")
app.add_typer(models_app, name="models")
app.add_typer(canary_app, name="canary")
app.add_typer(stack_app, name="stack")
app.add_typer(keys_app, name="keys")
app.add_typer(slo_app, name="slo")
app.add_typer(shadow_app, name="shadow")
app.add_typer(deploy_app, name="deploy")


# The key `mlgate init` creates for the first client.
INIT_KEY_NAME = "default"


@app.command()
def init(
    data: Annotated[Path, typer.Option("--data", help="CSV or Parquet file to model.")],
    target: Annotated[str, typer.Option("--target", help="Column to predict (binary).")],
    positive: Annotated[
        str | None, typer.Option("--positive", help="Positive class label (default: the rarer).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Registered model name (default: from the data file's name)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Config to write.")] = Path(
        "mlgate.yaml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Write a starter mlgate.yaml for any CSV/Parquet file, inferring the features, with
    an API key for the service (its token printed once, its sha256 in the file)."""
    import yaml

    from models.config import ConfigError, config_from_dict
    from models.data import DataError, read_table
    from models.starter import infer_dataset_config, infer_model_name
    from services.auth import hash_api_key, new_api_key_token

    if output.exists() and not force:
        raise _fail(f"{output} exists; pass --force to overwrite it", EXIT_USAGE)
    try:
        model_name = infer_model_name(data, name)
        df = read_table(data)
        rel = os.path.relpath(data.resolve(), output.resolve().parent)
        inferred = infer_dataset_config(df, target, rel, positive)
    except DataError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    skipped = inferred.pop("_skipped")
    inferred["registry"] = {"model_name": model_name}
    # The service must never be open by accident: a first key comes with the config.
    token = new_api_key_token()
    inferred["serving"] = {"api_keys": [{"name": INIT_KEY_NAME, "sha256": hash_api_key(token)}]}
    try:
        config_from_dict(
            {**inferred, "dataset": {**inferred["dataset"], "path": str(data)}}, output
        )
    except ConfigError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    header = (
        f"# mlgate starter config for {data.name} (written by `mlgate init`).\n"
        "# The model is registered as registry.model_name. Every other setting (train, gates,\n"
        "# registry, serving) has defaults: see the README. Review the feature lists, then\n"
        "# run `mlgate train`. serving.api_keys holds the sha256 of each client's API key,\n"
        "# never the key: `mlgate keys create NAME` adds one, `mlgate keys revoke NAME`\n"
        "# refuses one.\n"
    )
    output.write_text(header + yaml.safe_dump(inferred, sort_keys=False))
    ds = inferred["dataset"]
    console.print(
        f"wrote [bold]{output}[/]: model [bold]{model_name}[/]"
        f"{' (named after the data file; --name sets another)' if name is None else ''}, "
        f"target [bold]{target}[/] (positive {ds['positive_label']!r}), "
        f"{len(ds['numeric_features'])} numeric and {len(ds['categorical_features'])} "
        f"categorical features, id column {ds['id_column']!r}"
    )
    for col, why in skipped.items():
        console.print(f"  skipped {col}: {why}")
    print_new_token(INIT_KEY_NAME, token)


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
    from flows.runtime import use_configured_servers
    from models.config import ConfigError
    from models.data import DataError

    # The temporary Prefect server starts now and comes up while the flow is imported.
    prefect_server = use_configured_servers(_load(config))
    from flows.training import training_flow

    wait_for_prefect_or_exit(prefect_server)
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
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Start even without API keys: anyone who reaches the port may use the model.",
        ),
    ] = False,
) -> None:
    """Serve @champion (or a version) over HTTP with BentoML and ONNX Runtime. Refuses to
    start without an API key (`mlgate keys create`) unless --insecure-no-auth is given."""
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
    address = f"http://{cfg.serving.host}:{port}"
    keys = require_api_keys(cfg, config, address, insecure_no_auth)
    # SIGTERM (a supervisor, `kill`) stops the service as Ctrl-C does; a SIGKILL of this
    # process reaches the server through `die_with_parent`.
    signal.signal(signal.SIGTERM, _interrupt)
    # The service's own lines (model version, ONNX Runtime provider, authentication, errors)
    # go to stderr as it writes them.
    proc = start_service(
        config, ref, port=port, host=cfg.serving.host, echo=True, die_with_parent=True
    )
    try:
        proc.wait_ready(timeout=180)
        auth = "no API key needed" if not keys else "`Authorization: Bearer <API key>`"
        console.print(
            f"serving {ref.name} {ref.selector} on {address}  (POST /predict with {auth}; "
            "Ctrl-C stops)",
            highlight=False,
        )
        while proc.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
        return
    except Exception as err:
        # Its output was echoed as it came: the launcher's copy of the last lines would
        # only repeat it.
        raise _fail(f"service failed: {str(err).partition('; its last output:')[0]}") from None
    finally:
        proc.stop()
    raise _fail("service exited on its own (its output is above)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


_WINDOW = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_HOURS_PER_UNIT = {"s": 1 / 3600, "m": 1 / 60, "h": 1.0, "": 1.0, "d": 24.0}


def _window_hours(text: str) -> float:
    """`90s`, `30m`, `1h`, `2d`, or a bare number of hours (as `monitor.window_hours`)."""
    match = _WINDOW.fullmatch(text.strip().lower())
    hours = float(match[1]) * _HOURS_PER_UNIT[match[2]] if match else 0.0
    if not hours > 0:
        raise _fail(
            f"--window {text!r}: a length above 0 such as 90s, 30m, 1h or 2d "
            "(a bare number is hours)",
            EXIT_USAGE,
        )
    return hours


def _window_end(text: str) -> datetime:
    """An ISO 8601 time (naive: UTC) that is not in the future."""
    try:
        end = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _fail(
            f"--until {text!r} is not an ISO 8601 time (2026-03-01T12:00:00Z)", EXIT_USAGE
        ) from None
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    if end > datetime.now(UTC):
        # Rows not yet logged would make a future window look thin or empty.
        raise _fail(f"--until {text!r} is in the future: that window is not over", EXIT_USAGE)
    return end


@app.command()
def monitor(
    config: ConfigOpt = Path("mlgate.yaml"),
    no_retrain: Annotated[
        bool, typer.Option("--no-retrain", help="Evaluate and record, but never retrain.")
    ] = False,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            metavar="TIME",
            help="End of the window, ISO 8601; naive is UTC (default: now).",
        ),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            metavar="DURATION",
            help="Length of the window: 90s, 30m, 1h, 2d, or hours "
            "(default: monitor.window_hours).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one monitoring window: live data gate, PSI drift, retraining trigger."""
    from flows.gate_tables import gate_tables
    from flows.runtime import use_configured_servers

    end = _window_end(until) if until is not None else None
    hours = _window_hours(window) if window is not None else None
    prefect_server = use_configured_servers(_load(config))
    from flows.monitoring import monitoring_flow

    wait_for_prefect_or_exit(prefect_server)
    try:
        outcome = monitoring_flow(
            config_path=str(config), retrain=not no_retrain, now=end, window_hours=hours
        )
    except Exception as err:
        raise _fail(f"monitoring flow failed: {type(err).__name__}: {err}") from None
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
        return
    console.print(
        f"window {outcome.window_start:%Y-%m-%d %H:%M} – {outcome.window_end:%Y-%m-%d %H:%M} "
        f"UTC: {outcome.rows} rows scored by champion v{outcome.champion_version}"
    )
    if outcome.gates:
        console.print(gate_tables(outcome.gates))
    for alert in outcome.alerts:
        console.print(f"[bold red]alert ({alert['kind']}):[/] {alert['message']}")
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
    from flows.runtime import use_configured_servers

    cfg = _load(config)
    # Prefect's runner starts and keeps its own temporary server while it serves.
    use_configured_servers(cfg, start_now=False)
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
    run_id = run or registry_call(registry.latest_training_run, client, cfg.registry)
    try:
        info = client.get_run(run_id)
    except Exception:
        raise _fail(
            f"no training run {run_id!r} in {cfg.registry.resolved_tracking_uri()}"
        ) from None
    gates = registry.report_gate_results(client, cfg.registry.model_name, run_id)
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


for command in (promote, rollback, history, score):
    app.command()(command)


def main() -> None:
    """`mlgate`: the app, with a registry that cannot be reached (locked, missing, down)
    said in one line, whichever command met it, instead of a traceback."""
    try:
        app(prog_name="mlgate")
    except Exception as err:
        from flows.registry import RegistryError

        if not isinstance(err, RegistryError):
            raise
        _fail(str(err))
        raise SystemExit(EXIT_ERROR) from None


if __name__ == "__main__":
    main()
