"""The `mlgate keys` commands: the prediction service's API keys, created, listed, revoked.

A key is a random token that clients send as `Authorization: Bearer <token>`; the config
keeps only its sha256 (`serving.api_keys`), so the token is printed once, when it is made.
`create` and `revoke` change the config file in place (`models/config_file.py`: comments
kept, the result checked before it is written) or, where its layout is not one they can
change safely, write nothing and print what to add. A running service reads its keys when
it starts: restart it for a change to take effect. Mounted by `flows/cli.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flows.cli_common import EXIT_ERROR, EXIT_USAGE, ConfigOpt, JsonOpt, console, err_console
from flows.cli_common import exit_error as _fail
from flows.cli_common import load_config_or_exit as _load

if TYPE_CHECKING:
    from models.config import MlgateConfig
    from services.auth import ApiKey

keys_app = typer.Typer(
    help=(
        "API keys of the prediction service: clients send `Authorization: Bearer <token>`; "
        "the config keeps only each token's sha256."
    ),
    no_args_is_help=True,
)

RESTART_NOTE = "a running `mlgate serve` reads its keys when it starts: restart it"


def require_api_keys(
    cfg: MlgateConfig, config: Path, address: str, insecure_no_auth: bool
) -> dict[str, ApiKey]:
    """The keys a service started now would hold. None at all: exit 2 naming the command that
    makes one, unless the user passed --insecure-no-auth (then a red warning). Every key
    revoked: a warning. Shared by `mlgate serve` and `mlgate canary start`, the two commands
    that open a port to clients."""
    from services.auth import API_KEYS_ENV, configured_api_keys

    try:
        keys = configured_api_keys(cfg.serving, os.environ.get(API_KEYS_ENV))
    except ValueError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    if not keys and not insecure_no_auth:
        raise _fail(
            f"no API keys: {config} has none in serving.api_keys and {API_KEYS_ENV} is not "
            f"set, so anyone who reaches {address} could use the model. Create one with "
            f"`mlgate keys create NAME --config {config}` (it prints the token once and adds "
            "its sha256 to the config), or pass --insecure-no-auth to serve without "
            "authentication on a network you trust.",
            EXIT_USAGE,
        )
    if not keys:
        err_console.print(
            f"[bold red]WARNING: --insecure-no-auth: authentication is OFF; every client that "
            f"reaches {address} is served without an API key or a rate limit[/]",
            highlight=False,
        )
    elif all(key.revoked for key in keys.values()):
        err_console.print(
            "[bold yellow]warning:[/] every API key is revoked: each request will be refused "
            "(403); `mlgate keys create NAME` makes a new one",
            highlight=False,
        )
    return keys


def print_new_token(name: str, token: str) -> None:
    """The one time a token is shown, on a line of its own (never wrapped)."""
    console.print(
        f"API key [bold]{name}[/]: its token, shown only this once (store it as a secret; "
        "only its sha256 is kept):"
    )
    console.print(token, markup=False, highlight=False, soft_wrap=True)
    console.print(
        "Clients send it as the header `Authorization: Bearer <token>`.",
        markup=False,
        highlight=False,
    )


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who the key is for (letters, digits, _.@-).")],
    config: ConfigOpt = Path("mlgate.yaml"),
    rate_limit: Annotated[
        float | None,
        typer.Option(
            "--rate-limit", min=0.001, help="Requests/s for this key (default: the service's)."
        ),
    ] = None,
    burst: Annotated[
        int | None,
        typer.Option("--burst", min=1, help="Burst for this key (default: the service's)."),
    ] = None,
    no_write: Annotated[
        bool,
        typer.Option(
            "--no-write", help="Print the entry to add instead of adding it to the config."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a new API key: print its token once and add its sha256 to serving.api_keys."""
    from models.config_file import ConfigEditError, add_api_key_entry
    from services.auth import (
        API_KEYS_ENV,
        check_api_key_name,
        hash_api_key,
        new_api_key_token,
    )

    try:
        check_api_key_name(name)
    except ValueError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    known = _known_keys(_load(config))
    if name in {row["name"] for row in known}:
        where = next(row["source"] for row in known if row["name"] == name)
        raise _fail(
            f"an API key named {name!r} exists (in {where}); choose another name (to rotate "
            f"it, create a new key, move its clients over, then `mlgate keys revoke {name}`)",
            EXIT_USAGE,
        )
    token = new_api_key_token()
    digest = hash_api_key(token)
    entry: dict[str, Any] = {"name": name, "sha256": digest}
    if rate_limit is not None:
        entry["rate_limit_per_s"] = rate_limit
    if burst is not None:
        entry["rate_limit_burst"] = burst

    written, why_not = False, "--no-write"
    if not no_write:
        text = config.read_text()
        try:
            edited = add_api_key_entry(text, entry)
        except ConfigEditError as err:
            why_not = str(err)
        else:
            _write_unchanged_since(config, text, edited)
            written = True
    if as_json:
        out = {"name": name, "token": token, "sha256": digest, "written": written}
        print(json.dumps({**out, "config": str(config)}, indent=2))
    else:
        print_new_token(name, token)
        if written:
            console.print(
                f"added to serving.api_keys in {config} (its sha256 only); {RESTART_NOTE}.",
                highlight=False,
            )
        else:
            _print_entry_to_add(config, entry, f"{API_KEYS_ENV}={name}:{digest}")
    if not written and not no_write:
        raise _fail(
            f"{config} was left unchanged: {why_not}. Add the entry above by hand.", EXIT_ERROR
        )


@keys_app.command("list")
def list_keys(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """The keys `mlgate serve` would start with: name, where from, active or revoked."""
    cfg = _load(config)
    rows = _known_keys(cfg)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "sha256"} for r in rows], indent=2))
        return
    if not rows:
        console.print(
            f"no API keys in {config} or the environment: `mlgate serve` refuses to start. "
            f"Create one with `mlgate keys create NAME --config {config}`.",
            highlight=False,
        )
        return
    table = Table(title=f"API keys of {cfg.registry.model_name}'s service")
    for col in ("name", "source", "state", "rate limit", "sha256"):
        table.add_column(col)
    for row in rows:
        limit = row["rate_limit_per_s"] or cfg.serving.rate_limit_per_s
        burst = row["rate_limit_burst"] or cfg.serving.rate_limit_burst
        table.add_row(
            row["name"],
            row["source"],
            "[red]revoked[/]" if row["revoked"] else "[green]active[/]",
            f"{limit:g}/s, burst {burst}",
            row["sha256_prefix"] + "…",
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name (see `mlgate keys list`).")],
    config: ConfigOpt = Path("mlgate.yaml"),
) -> None:
    """Refuse a key from now on (403): mark it `revoked: true` in serving.api_keys."""
    from models.config_file import ConfigEditError, add_api_key_entry, revoke_api_key_entries
    from services.auth import API_KEYS_ENV

    rows = [row for row in _known_keys(_load(config)) if row["name"] == name]
    if not rows:
        raise _fail(
            f"no API key named {name!r} in {config} or {API_KEYS_ENV} (see `mlgate keys list`)",
            EXIT_USAGE,
        )
    if all(row["revoked"] for row in rows):
        console.print(f"API key {name!r} is already revoked", highlight=False)
        return
    text = edited = config.read_text()
    try:
        for row in rows:
            if row["source"] == "config":
                edited = revoke_api_key_entries(edited, row["sha256"])
            else:
                # A digest revoked in the config stays revoked whatever the environment says.
                entry = {"name": name, "sha256": row["sha256"], "revoked": True}
                edited = add_api_key_entry(edited, entry)
    except ConfigEditError as err:
        raise _fail(
            f"{config} was left unchanged: {err}. Set `revoked: true` on the entry {name!r} "
            f"of serving.api_keys by hand.",
            EXIT_ERROR,
        ) from None
    _write_unchanged_since(config, text, edited)
    console.print(
        f"revoked API key {name!r} in {config}: requests with it get 403; {RESTART_NOTE}.",
        highlight=False,
    )
    if any(row["source"] != "config" for row in rows):
        console.print(
            f"it also stays in {API_KEYS_ENV} where that is set: remove it there as well",
            highlight=False,
        )


def _known_keys(cfg: MlgateConfig) -> list[dict[str, Any]]:
    """Every configured key (the file with its `MLGATE_` overrides, then `MLGATE_API_KEYS`),
    with the state the service would give it: a digest revoked anywhere is revoked."""
    from services.auth import API_KEYS_ENV, configured_api_keys, parse_api_keys_env

    try:
        env_value = os.environ.get(API_KEYS_ENV)
        merged = configured_api_keys(cfg.serving, env_value)
        env_keys = parse_api_keys_env(env_value)
    except ValueError as err:
        raise _fail(str(err), EXIT_USAGE) from None
    sources = [(k, "config") for k in cfg.serving.api_keys] + [(k, API_KEYS_ENV) for k in env_keys]
    rows = []
    for key, source in sources:
        digest = key.sha256.lower()
        rows.append(
            {
                "name": key.name,
                "source": source,
                "revoked": merged[digest].revoked,
                "rate_limit_per_s": merged[digest].rate_per_s,
                "rate_limit_burst": merged[digest].burst,
                "sha256_prefix": digest[:8],
                "sha256": digest,
            }
        )
    return rows


def _write_unchanged_since(config: Path, read: str, edited: str) -> None:
    from models.config_file import write_config_text

    if config.read_text() != read:
        raise _fail(f"{config} changed while it was being edited; run the command again")
    write_config_text(config, edited)


def _print_entry_to_add(config: Path, entry: dict[str, Any], env_form: str) -> None:
    import yaml

    item = yaml.safe_dump([entry], sort_keys=False, width=4096)
    console.print(
        f"add it to serving.api_keys in {config}:\n"
        "serving:\n  api_keys:\n" + "\n".join(f"    {line}" for line in item.splitlines()),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"or give the service its digest in the environment (comma-separated with others):\n"
        f"{env_form}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
