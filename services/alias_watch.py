"""Following the served alias: a worker started on `NAME@ALIAS` swaps to the version the
alias names once it moved (a promotion, `mlgate rollback`), so an alias move reaches
clients without a restart.

Every `serving.alias_poll_s` the worker asks the registry which version the alias names
(`services.registry_watch.RegistryPoll`, the shadow watch's polling). When it is not the
version served, or the served model is the last-known-good copy and the registry answers
again, `prepare` fetches the version through the same path as start-up (sha256 checks,
`services.model_store`), opens its ONNX Runtime session and runs the same warm-up, all on
this thread while the old model keeps serving; `install` then swaps it in on the worker's
event loop (services/service.py: new requests go to the new model, requests in flight finish
on the old one). A fetch, check or warm-up that fails keeps the old model serving: one log
line per version and error, a count in `mlgate_model_swaps_total{outcome="failed"}`, and
another try at the next poll. An alias that was removed leaves the served model as it is.

Each worker process follows on its own; for a moment after a move, workers of one service
may answer with different versions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from services.registry_watch import RegistryPoll

logger = logging.getLogger(__name__)

P = TypeVar("P")


class AliasWatch(Generic[P]):
    """Keeps the worker serving the version `read_version()` names (see the module).

    `served()` is (version, whether served from the last-known-good copy); `prepare(version)`
    returns the loaded, verified and warmed-up model (`P`) or raises; `install(P)` swaps it
    in; `counted(done)` counts a swap done or failed."""

    def __init__(
        self,
        alias: str,
        read_version: Callable[[], str | None],
        served: Callable[[], tuple[str, bool]],
        prepare: Callable[[str], P],
        install: Callable[[P], None],
        counted: Callable[[bool], None],
        poll_s: float,
    ) -> None:
        self.alias = alias
        self._served = served
        self._prepare = prepare
        self._install = install
        self._counted = counted
        self._logged: tuple[str | None, str] | None = None
        self._poll = RegistryPoll(
            f"alias-watch-{alias}", read_version, self._follow, poll_s, f"@{alias}"
        )

    def start(self) -> None:
        self._poll.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._poll.stop(timeout)

    def check(self) -> None:
        """One look at the registry, and the swap when the alias moved (the thread's step)."""
        self._poll.check()

    def _follow(self, wanted: str | None) -> None:
        version, from_copy = self._served()
        if wanted is None:
            self._log_once(
                None, f"@{self.alias} is not set in the registry; v{version} keeps serving"
            )
            return
        if wanted == version and not from_copy:
            self._logged = None
            return
        started = time.perf_counter()
        try:
            prepared = self._prepare(wanted)
        except Exception as err:
            self._counted(False)
            self._log_once(
                wanted,
                f"@{self.alias} names v{wanted}, which could not be served ({err}); "
                f"v{version} keeps serving, retried every poll",
            )
            return
        if self._poll.stopping:
            return
        try:
            self._install(prepared)
        except Exception as err:
            self._counted(False)
            self._log_once(
                wanted, f"@{self.alias}: the swap to v{wanted} failed ({err}); v{version} serves"
            )
            return
        self._counted(True)
        self._logged = None
        logger.info(
            "@%s moved: now serving v%s (was v%s%s); fetched, verified and warmed up in %.2f s",
            self.alias,
            wanted,
            version,
            ", the last-known-good copy" if from_copy else "",
            time.perf_counter() - started,
        )

    def _log_once(self, wanted: str | None, message: str) -> None:
        if self._logged != (wanted, message):
            self._logged = (wanted, message)
            logger.error("%s", message)
