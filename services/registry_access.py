"""Reaching the MLflow registry: bounded retries while it is locked or unreachable, then
one line that says so, and never a SQLite registry created by a reader.

`services.model_store` fetches models through it and `flows.registry.connect` makes its
clients through it. Light on purpose (MLflow, SQLAlchemy and the HTTP clients are imported
where they are used): every command that touches the registry imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import tenacity

from services import breakers

T = TypeVar("T")
_HEALTH_TIMEOUT_S = 5.0
# RegistryConfig's defaults (models/config.py), for callers that pass none.
DEFAULT_HTTP_TIMEOUT_S = 30
DEFAULT_HTTP_MAX_RETRIES = 2
_BUSY = ("database is locked", "database table is locked")


class RegistryUnavailableError(RuntimeError):
    """The registry cannot be reached now: locked, down, unreachable, or its database is
    gone. The message is one line naming the registry and why."""


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (`sqlite:////abs/mlflow.db`); None for
    any other registry."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def registry_label(tracking_uri: str) -> str:
    """The registry as messages and last-known-good records name it: a SQLite file's path,
    or the tracking server's URI without credentials."""
    database = sqlite_database(tracking_uri)
    if database is not None:
        return str(database)
    parts = urlsplit(tracking_uri)
    if parts.username is None and parts.password is None:
        return tracking_uri
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def is_registry_unavailable(err: BaseException) -> bool:
    """Whether `err`, or what caused it, says the registry could not be reached: SQLite
    busy, a database that cannot be opened, a refused or timed-out connection. An answer
    from the registry (no such model, a bad artifact) is not."""
    import requests
    from sqlalchemy.exc import OperationalError

    unreachable = (
        RegistryUnavailableError,
        OperationalError,
        requests.ConnectionError,
        requests.Timeout,
    )
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, unreachable) or _is_busy(current):
            return True
        if current.__cause__ is not None or current.__suppress_context__:
            current = current.__cause__
        else:
            current = current.__context__
    return False


def _is_busy(err: BaseException) -> bool:
    return any(text in str(err) for text in _BUSY)


def retry_unavailable(fn: Callable[[], T], tracking_uri: str, retry_s: float) -> T:
    """`fn()`, called again while the registry is unavailable, for at most `retry_s`
    seconds (0: once); then `RegistryUnavailableError` in one line instead of the driver's
    traceback. A locked SQLite statement is rolled back, so calling again is safe.

    The whole retried call is one call of the registry's circuit breaker
    (services/breakers.py): after three such failures in a row, calls fail fast with
    `RegistryUnavailableError` saying the breaker is open and until when. Only for
    idempotent calls (reads, opening a client): a write is not retried here."""
    try:
        return breakers.call(
            "registry",
            lambda: _retrying(fn, retry_s),
            is_failure=is_registry_unavailable,
            target=registry_label(tracking_uri),
        )
    except breakers.CircuitOpenError as err:
        raise RegistryUnavailableError(str(err)) from None
    except Exception as err:
        if not is_registry_unavailable(err):
            raise
        if isinstance(err, RegistryUnavailableError):
            reason = str(err)
        else:
            reason = f"registry {registry_label(tracking_uri)} {_unavailable_reason(err)}"
        tried = f" (tried for {retry_s:g} s)" if retry_s > 0 else ""
        raise RegistryUnavailableError(f"{reason}{tried}") from None


def _retrying(fn: Callable[[], T], retry_s: float) -> T:
    # Exponential backoff with full jitter (a random wait between 0 and 0.2 * 2^n s, at
    # most 2 s), so that hosts waiting on the same registry do not retry in step.
    for attempt in tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_registry_unavailable),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=2.0),
        stop=tenacity.stop_after_delay(retry_s),
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable: tenacity reraises")


def _unavailable_reason(err: BaseException) -> str:
    if _is_busy(err):
        return "is locked by another process (SQLite: database is locked)"
    lines = str(err).strip().splitlines()
    return f"cannot be reached: {lines[0][:200] if lines else type(err).__name__}"


def open_registry_client(
    tracking_uri: str,
    http_timeout_s: int = DEFAULT_HTTP_TIMEOUT_S,
    http_max_retries: int = DEFAULT_HTTP_MAX_RETRIES,
) -> Any:
    """An MlflowClient of the registry, once it answers: MLflow opens a SQLite database
    (creating its tables when new) as the client is made, and a tracking server must
    answer its `/health`. One try; `retry_unavailable` bounds the retries.

    MLflow's HTTP client reads its timeout and retry count from its own environment
    variables only (120 s and 7 retries by default: minutes against a server that hangs);
    they are set here, in one place, from `registry.http_timeout_s` and
    `registry.http_max_retries`."""
    import os

    from mlflow import MlflowClient

    if tracking_uri.startswith(("http://", "https://")):
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(http_timeout_s))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(http_max_retries))
        _check_server_health(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _check_server_health(tracking_uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    # MLflow's client retries a refused connection for minutes; this one try fails in
    # seconds. MLflow's own request helper, so its TLS and credential settings apply.
    status = http_request(
        get_default_host_creds(tracking_uri),
        "/health",
        "GET",
        max_retries=0,
        timeout=_HEALTH_TIMEOUT_S,
        raise_on_status=False,
    ).status_code
    if status != 200:
        raise RegistryUnavailableError(
            f"registry {registry_label(tracking_uri)} is not healthy: /health answered {status}"
        )
