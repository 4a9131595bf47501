"""Waiting until serving instances answer with a model version: how long an alias move
(`mlgate rollback --wait-served URL`) takes to reach clients.

Each instance is asked `GET /model` (which `serving.internal_endpoints` opens to this host's
processes by default) every `poll_s` until it names the version; the seconds are counted
from `started`, the moment the move began. A service with several workers answers from
whichever worker takes the request, and each worker follows the alias on its own
(services/alias_watch.py): the first answer naming the version is when the move reached that
instance's clients, not necessarily all of its workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

_POLL_S = 0.05
_REQUEST_TIMEOUT_S = 2.0


class ServedWaitError(RuntimeError):
    """Some instances did not answer with the version in time; `served` holds the seconds
    of those that did (None for the others), `last_seen` what each of the others said."""

    def __init__(
        self, message: str, served: dict[str, float | None], last_seen: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.served = served
        self.last_seen = last_seen


def check_service_url(url: str) -> str:
    """`url` without a trailing slash; a clear error unless it is an http(s) URL."""
    parts = httpx.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError(f"{url!r} is not a service URL (http://host:port)")
    return url.rstrip("/")


def wait_until_served(
    urls: Sequence[str],
    version: str,
    *,
    started: float,
    timeout_s: float,
    poll_s: float = _POLL_S,
) -> dict[str, float]:
    """Seconds from `started` (a `time.monotonic()` reading) until each of `urls` answered
    `/model` with `version`; `ServedWaitError` once `timeout_s` passed from `started` with
    some still on another version (or not answering)."""
    served: dict[str, float | None] = {url: None for url in urls}
    last_seen: dict[str, str] = {}
    deadline = started + timeout_s
    with httpx.Client(timeout=_REQUEST_TIMEOUT_S) as client:
        while True:
            for url in urls:
                if served[url] is not None:
                    continue
                seen = _served_version(client, url)
                now = time.monotonic()
                if seen == version:
                    served[url] = now - started
                else:
                    last_seen[url] = seen
            waiting = [url for url, s in served.items() if s is None]
            if not waiting:
                return {url: s for url, s in served.items() if s is not None}
            if time.monotonic() >= deadline:
                said = "; ".join(f"{url} said {last_seen.get(url)}" for url in waiting)
                raise ServedWaitError(
                    f"not answering with v{version} after {timeout_s:g} s: {said}",
                    served,
                    {url: last_seen.get(url, "") for url in waiting},
                )
            time.sleep(poll_s)


def _served_version(client: httpx.Client, url: str) -> str:
    """The version `/model` names, or what went wrong, in a few words."""
    try:
        response = client.get(f"{url}/model")
    except httpx.HTTPError as err:
        return f"unreachable ({type(err).__name__})"
    if response.status_code != 200:
        return f"/model answered {response.status_code}"
    try:
        return str(response.json()["version"])
    except (ValueError, KeyError, TypeError):
        return "/model named no version"
