"""Team mode's alias lock: a PostgreSQL advisory lock per model and alias, shared by all hosts.

A file lock serialises alias moves on one host only; movers on other hosts would each hold
their own. Every host's movers instead take the same advisory lock on the PostgreSQL of
`registry.lock_dsn`, on a connection of their own, for the whole compare-and-set (re-read,
write, record). The server drops the lock when that connection ends, so a crashed mover
never leaves it held; a connection lost while the move runs is reported, since another host
may have moved the alias meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flows.registry import RegistryError
from services import pg_lock

# Advisory locks are keyed by two int4s here: the namespace keeps them apart from any
# single-key lock another application takes on the same server.
LOCK_NAMESPACE = "mlgate.alias"


class AliasLockError(RegistryError):
    """The alias lock could not be taken in time, its server could not be reached, or the
    lock was lost while the move ran."""


def lock_key(name: str, alias: str) -> str:
    return f"{name}@{alias}"


@contextlib.contextmanager
def advisory_lock(dsn: str, name: str, alias: str, *, timeout_s: float) -> Iterator[None]:
    """Hold the advisory lock on `name@alias` for the body; waiting longer than `timeout_s`
    for another holder raises AliasLockError instead of blocking forever."""
    key = lock_key(name, alias)
    where = server_address(dsn)
    try:
        with pg_lock.advisory_lock(
            dsn,
            LOCK_NAMESPACE,
            key,
            timeout_s=timeout_s,
            application_name=f"mlgate alias lock {key}",
        ):
            yield
    except pg_lock.PgLockTimeout:
        raise AliasLockError(
            f"another mover has held the lock on {key} for over {timeout_s:g} s "
            f"(PostgreSQL advisory lock at {where}); try again, or find the holder in "
            "pg_stat_activity (application_name 'mlgate alias lock ...')"
        ) from None
    except pg_lock.PgLockLost:
        raise AliasLockError(
            f"the lock on {key} at {where} was lost while the move ran: another host may have "
            f"moved @{alias} at the same time; check `mlgate history {name} --alias {alias}`"
        ) from None
    except pg_lock.PgLockUnreachable as err:
        raise AliasLockError(f"{err} (registry.lock_dsn)") from None
    except pg_lock.PgLockError as err:
        raise AliasLockError(str(err)) from None


def server_address(dsn: str) -> str:
    """host:port/database of a DSN, never its password."""
    return pg_lock.server_address(dsn)
