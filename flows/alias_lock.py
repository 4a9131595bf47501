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
from typing import Any

from flows.registry import RegistryError

# Advisory locks are keyed by two int4s here: the namespace keeps them apart from any
# single-key lock another application takes on the same server.
LOCK_NAMESPACE = "mlgate.alias"
_CONNECT_TIMEOUT_S = 10


class AliasLockError(RegistryError):
    """The alias lock could not be taken in time, its server could not be reached, or the
    lock was lost while the move ran."""


def lock_key(name: str, alias: str) -> str:
    return f"{name}@{alias}"


@contextlib.contextmanager
def advisory_lock(dsn: str, name: str, alias: str, *, timeout_s: float) -> Iterator[None]:
    """Hold the advisory lock on `name@alias` for the body; waiting longer than `timeout_s`
    for another holder raises AliasLockError instead of blocking forever."""
    import psycopg

    key = lock_key(name, alias)
    where = server_address(dsn)
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT_S,
            application_name=f"mlgate alias lock {key}"[:63],
            # A host that vanishes mid-move must not hold the lock for the TCP timeout.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    except psycopg.Error as err:
        raise AliasLockError(
            f"cannot connect to the alias lock's PostgreSQL at {where} (registry.lock_dsn): "
            f"{str(err).strip()}"
        ) from None
    args: tuple[Any, ...] = (LOCK_NAMESPACE, key)
    with conn:
        try:
            conn.execute(
                "SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",)
            )
            conn.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", args)
        except psycopg.errors.LockNotAvailable:
            raise AliasLockError(
                f"another mover has held the lock on {key} for over {timeout_s:g} s "
                f"(PostgreSQL advisory lock at {where}); try again, or find the holder in "
                "pg_stat_activity (application_name 'mlgate alias lock ...')"
            ) from None
        except psycopg.Error as err:
            raise AliasLockError(f"cannot take the lock on {key} at {where}: {err}") from None
        try:
            yield
        except BaseException:
            # The move failed on its own; releasing is best effort (closing drops it too).
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", args)
            raise
        try:
            row = conn.execute(
                "SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", args
            ).fetchone()
        except psycopg.Error as err:
            row = None
            lost = f"{type(err).__name__}: {err}"
        else:
            lost = "the server no longer knew it as held"
        if not row or not row[0]:
            raise AliasLockError(
                f"the lock on {key} at {where} was lost while the move ran ({lost}): another "
                f"host may have moved @{alias} at the same time; check `mlgate history {name} "
                f"--alias {alias}`"
            )


def server_address(dsn: str) -> str:
    """host:port/database of a DSN, never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except Exception:
        return "(an unparsable registry.lock_dsn)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '?')}"
