"""Polling the registry from a serving worker: a thread that reads one thing from the
registry every `poll_s` seconds and hands it to the watch that acts on it
(`services.shadow.ShadowWatch`: which version shadows; `services.alias_watch.AliasWatch`:
which version the served alias names).

A registry that cannot be read is logged once (until it can be read again) and the watch
keeps what it has. The reads go through `services.registry_access`, and a SQLite registry
that went missing is never re-created by asking it (MLflow would make a new empty database
as its client opens it).

Written by hand: a thread, an event and a loop of a few lines; a scheduler library would
add a dependency and a second thread for the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from services.registry_access import open_registry_client, sqlite_database

if TYPE_CHECKING:
    from models.config import RegistryConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryPoll(Generic[T]):
    """Every `poll_s` seconds on a thread of its own: `act(read())`; a failing `read` is
    logged once, as `what`, and nothing is acted on."""

    def __init__(
        self,
        name: str,
        read: Callable[[], T],
        act: Callable[[T], None],
        poll_s: float,
        what: str,
    ) -> None:
        self._read = read
        self._act = act
        self._poll_s = poll_s
        self._what = what
        self._stop = threading.Event()
        self._unreachable_logged = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """One look at the registry (the thread's step)."""
        try:
            value = self._read()
        except Exception as err:
            if not self._unreachable_logged:
                logger.warning(
                    "%s: the registry could not be read (%s); keeping as is", self._what, err
                )
                self._unreachable_logged = True
            return
        self._unreachable_logged = False
        self._act(value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self._poll_s)


def registered_model_reader(
    tracking_uri: str, model_name: str, registry: RegistryConfig | None = None
) -> Callable[[], Any]:
    """A function that returns `model_name`'s registered model (its tags and aliases) as
    the registry holds it now; its client is made once, and again after a failed read, with
    `registry`'s HTTP timeout and retries (`registry_access`'s defaults without it)."""
    clients: list[Any] = []

    def read() -> Any:
        database = sqlite_database(tracking_uri)
        if database is not None and not database.exists():
            raise FileNotFoundError(f"the registry database {database} is missing")
        if not clients:
            clients.append(
                open_registry_client(tracking_uri)
                if registry is None
                else open_registry_client(
                    tracking_uri, registry.http_timeout_s, registry.http_max_retries
                )
            )
        try:
            return clients[0].get_registered_model(model_name)
        except Exception:
            clients.clear()
            raise

    return read
