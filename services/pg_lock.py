"""PostgreSQL advisory locks on a connection of their own: the locks team mode's hosts share.

A file lock serialises one host's processes only. Every host that reaches the same
PostgreSQL instead takes the same advisory lock, keyed by two int4s (`hashtext` of a
namespace and of a key, so that mlgate's locks stay apart from any single-key lock another
application takes on that server). The lock lives as long as its connection: the server
drops it when the holder's process dies or its host vanishes (TCP keepalives bound how long
that takes), so a crashed holder never leaves it held.

Two ways to take one: `advisory_lock` queues for it (fair: PostgreSQL grants waiters in
order) with a timeout, for short critical sections such as an alias move; `wait_for_lock`
polls with `pg_try_advisory_lock` for a holder that may keep it for hours (a canary
controller), naming the holder and letting the caller stop waiting. psycopg does the
talking; the polling is written here because PostgreSQL has no "wait, but let me look
around every few seconds" form of the lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

_CONNECT_TIMEOUT_S = 10
_APP_NAME_MAX = 63  # PostgreSQL truncates application_name at NAMEDATALEN - 1

# The holder of a two-key advisory lock: pg_locks stores the keys as oids (classid, objid)
# with objsubid 2; an int4 key is its two's-complement bits as an unsigned 32-bit number.
_HOLDER_SQL = """
SELECT a.application_name, coalesce(host(a.client_addr), 'local socket'), a.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid::bigint = (hashtext(%s)::bigint & 4294967295)
  AND l.objid::bigint = (hashtext(%s)::bigint & 4294967295)
  AND l.pid <> pg_backend_pid()
"""


class PgLockError(RuntimeError):
    """The lock's server could not be reached, the lock was not granted in time, or it was
    lost while held; the message names the server (never the password) and the key."""


class PgLockTimeout(PgLockError):
    """Another holder kept the lock longer than the caller was willing to wait."""


class PgLockUnreachable(PgLockError):
    """The lock's server could not be reached."""


class PgLockLost(PgLockError):
    """A lock this process held is gone (its connection broke, or the server no longer knew
    it): another holder may have had it meanwhile."""


class HeldLock:
    """A lock this process holds; `check()` raises PgLockError once it is no longer held."""

    def __init__(self, conn: psycopg.Connection[Any], namespace: str, key: str, where: str):
        self.conn, self.namespace, self.key, self.where = conn, namespace, key, where

    def check(self) -> None:
        """The connection (and with it the lock) is still there: a cheap round trip."""
        import psycopg

        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error as err:
            raise PgLockLost(
                f"the lock on {self.namespace}/{self.key} at {self.where} was lost "
                f"({type(err).__name__}: {str(err).strip()}): another host may hold it now"
            ) from None

    def release(self) -> bool:
        """Give the lock back; False when the server no longer knew it as held (or could not
        be asked), which means another host may have held it meanwhile."""
        import psycopg

        try:
            row = self.conn.execute(
                "SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", (self.namespace, self.key)
            ).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])


def connect(dsn: str, application_name: str) -> psycopg.Connection[Any]:
    """An autocommit connection for one lock, named in pg_stat_activity, with keepalives so
    that a host that vanishes does not hold its locks for the kernel's TCP timeout."""
    import psycopg

    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT_S,
            application_name=application_name[:_APP_NAME_MAX],
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            # The same on the server's side: it is the server that must notice a vanished
            # holder and drop its locks, not after the kernel's default two hours.
            options="-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
            "-c tcp_keepalives_count=3",
        )
    except psycopg.Error as err:
        raise PgLockUnreachable(
            f"cannot connect to the lock's PostgreSQL at {server_address(dsn)}: {str(err).strip()}"
        ) from None


@contextlib.contextmanager
def advisory_lock(
    dsn: str, namespace: str, key: str, *, timeout_s: float, application_name: str
) -> Iterator[HeldLock]:
    """Queue for the lock and hold it for the body. Waiting longer than `timeout_s` raises
    PgLockTimeout; a lock lost while the body ran raises PgLockLost after it; an unreachable server
    PgLockUnreachable."""
    import psycopg

    where = server_address(dsn)
    with connect(dsn, application_name) as conn:
        try:
            conn.execute(
                "SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",)
            )
            conn.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", (namespace, key))
        except psycopg.errors.LockNotAvailable:
            raise PgLockTimeout(
                f"another holder has kept the lock on {namespace}/{key} at {where} for over "
                f"{timeout_s:g} s"
            ) from None
        except psycopg.Error as err:
            raise PgLockError(
                f"cannot take the lock on {namespace}/{key} at {where}: {err}"
            ) from None
        held = HeldLock(conn, namespace, key, where)
        try:
            yield held
        except BaseException:
            # The body failed on its own; releasing is best effort (closing drops it too).
            held.release()
            raise
        if not held.release():
            raise PgLockLost(f"the lock on {namespace}/{key} at {where} was lost while it was held")


@contextlib.contextmanager
def wait_for_lock(
    dsn: str,
    namespace: str,
    key: str,
    *,
    application_name: str,
    keep_waiting: Callable[[], bool],
    on_wait: Callable[[str], None],
    poll_s: float = 2.0,
) -> Iterator[HeldLock | None]:
    """Hold the lock for the body, waiting for it as long as `keep_waiting()` says so.
    `on_wait(holder)` is called once, when the lock is first found taken, with who holds
    it (their application_name, address and server pid). The body gets None when the
    caller stopped waiting. Releasing at the end is best effort: the connection's close
    drops the lock anyway."""
    import psycopg

    where = server_address(dsn)
    with connect(dsn, application_name) as conn:
        told = acquired = False
        try:
            while True:
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", (namespace, key)
                ).fetchone()
                if row and row[0]:
                    acquired = True
                    break
                if not told:
                    on_wait(lock_holder(conn, namespace, key))
                    told = True
                if not keep_waiting():
                    break
                time.sleep(poll_s)
        except psycopg.Error as err:
            raise PgLockError(
                f"cannot take the lock on {namespace}/{key} at {where}: {err}"
            ) from None
        if not acquired:
            yield None
            return
        held = HeldLock(conn, namespace, key, where)
        try:
            yield held
        finally:
            held.release()


def lock_holder(conn: psycopg.Connection[Any], namespace: str, key: str) -> str:
    """Who holds `namespace/key`, as pg_stat_activity shows them; 'unknown' when the holder
    let go in the meantime (or the role may not see other sessions)."""
    row = conn.execute(_HOLDER_SQL, (namespace, key)).fetchone()
    if not row:
        return "unknown (released meanwhile)"
    name, address, pid = row
    return f"{name or 'a session without a name'} from {address} (server pid {pid})"


def server_address(dsn: str) -> str:
    """host:port/database of a DSN, never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except Exception:
        return "(an unparsable DSN)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '?')}"
