"""The `score` command of `mlgate`: batch scoring of a CSV or Parquet input into Parquet with
a registered version (`flows/score.py`), mounted at the top level by `flows/cli.py`.

Exit status: 0 scored (refused rows and the gates' verdicts are reported, not failures),
1 an error (no such version, an artifact whose sha256 does not match, a failed run), 2 bad
usage, config or input (no such file, a feature column missing, an output that is not
Parquet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import EXIT_USAGE, ConfigOpt, JsonOpt, console, wait_for_prefect_or_exit
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load


def score(
    input_path: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help="CSV or Parquet file, or a folder of Parquet parts, to score."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Parquet file to write (row id, score, label, model version); refused rows "
            "go to <name>.rejects.jsonl beside it.",
        ),
    ],
    version: Annotated[
        str | None, typer.Option("--version", help="Score with this version.")
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(
            "--alias", help="Score with this alias's version (default: what `serve` serves)."
        ),
    ] = None,
    config: ConfigOpt = Path("mlgate.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Score a CSV/Parquet input in batches with a registered version, into Parquet."""
    from flows.gate_tables import gate_tables
    from flows.runtime import use_configured_servers
    from models.config import ConfigError
    from models.data import DataError
    from models.model_ref import ModelRef
    from services.model_store import ModelStoreError

    cfg = _load(config)
    if version is not None or alias is not None:
        try:
            ModelRef(cfg.registry.model_name, alias=alias, version=version)
        except ValueError as err:  # both, or a malformed one: said before any flow starts
            raise _fail(str(err), EXIT_USAGE) from None
    prefect_server = use_configured_servers(cfg)
    from flows.score import score_flow

    wait_for_prefect_or_exit(prefect_server)

    try:
        outcome = score_flow(
            input_path=str(input_path),
            output_path=str(output),
            config_path=str(config),
            version=version,
            alias=alias,
            progress=sys.stdout.isatty() and not as_json,
        )
    except (ConfigError, DataError) as err:
        raise _fail(str(err), EXIT_USAGE) from None
    except ModelStoreError as err:
        raise _fail(str(err)) from None
    except Exception as err:
        raise _fail(f"scoring flow failed: {type(err).__name__}: {err}") from None
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
        return
    console.print(gate_tables(outcome.gates))
    console.print(
        f"scored {outcome.scored:,} of {outcome.rows:,} rows with {outcome.model_name} "
        f"v{outcome.model_version} in {outcome.seconds:.1f} s ({outcome.rows_per_s:,.0f} "
        f"rows/s, {outcome.partitions} partition(s)): {outcome.output}"
    )
    if outcome.rejected:
        console.print(
            f"[bold red]{outcome.rejected:,} row(s) refused[/] (not scored), with the reason "
            f"for each: {outcome.rejects}"
        )
    console.print(f"recorded as run {outcome.run_id} of the monitoring experiment")
