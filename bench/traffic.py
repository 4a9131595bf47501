"""Replayed client traffic: paced single-row `/predict` requests from a few keep-alive
connections, bounded in time, every answer counted by status and by the variant that gave
it (HAProxy's `X-Mlgate-Variant` header), transport failures apart.

A load generator, not production code: the demo replays the holdout through the canary
target with it, and the canary tests use it as the clients whose requests must never fail
outside the canary's share.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from services.haproxy import VARIANT_HEADER

_MAX_FAILURES_KEPT = 50


class Replayer:
    """`rate` requests per second over `threads` connections to 127.0.0.1:`port`, cycling
    through `bodies` (JSON request bodies), until `stop()` or `max_s` seconds.

    With `wait_for_target`, refused connections before the first answer are not failures:
    the target is still coming up (the demo starts its clients before the canary's
    HAProxy listens); they are counted in `refused_before_target`. `headers` go with every
    request (an `Authorization: Bearer` API key)."""

    def __init__(
        self,
        port: int,
        bodies: list[bytes],
        *,
        rate: float = 150.0,
        max_s: float = 480.0,
        threads: int = 3,
        wait_for_target: bool = False,
        path: str = "/predict",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not bodies:
            raise ValueError("a replayer needs at least one request body")
        if rate <= 0 or threads < 1:
            raise ValueError(f"rate {rate} and threads {threads} must be positive")
        self.port, self.bodies, self.rate, self.max_s = port, bodies, rate, max_s
        self.threads, self.path = threads, path
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.counts: Counter[tuple[str, int]] = Counter()
        self.transport_errors: Counter[str] = Counter()
        self.failures: list[tuple[float, str, int | str]] = []
        self.refused_before_target = 0
        self._answered = threading.Event()
        if not wait_for_target:
            self._answered.set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [
            threading.Thread(target=self._run, args=(k,), daemon=True, name=f"replay-{k}")
            for k in range(threads)
        ]

    def start(self) -> Replayer:
        if not self._workers[0].is_alive() and not self._stop.is_set():
            for t in self._workers:
                t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            if t.is_alive():
                t.join(timeout=40)

    def __enter__(self) -> Replayer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record_failure(self, what: str, status: int | str) -> None:
        if len(self.failures) < _MAX_FAILURES_KEPT:
            self.failures.append((time.time(), what, status))

    def _run(self, k: int) -> None:
        period = self.threads / self.rate
        deadline = time.monotonic() + self.max_s
        conn: http.client.HTTPConnection | None = None
        i, next_at = k, time.monotonic() + k * period / self.threads
        while not self._stop.is_set() and time.monotonic() < deadline:
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            next_at = max(next_at + period, time.monotonic() - period)
            body = self.bodies[i % len(self.bodies)]
            i += self.threads
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=35)
                conn.request("POST", self.path, body=body, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                key = (resp.getheader(VARIANT_HEADER) or "?", resp.status)
                if (resp.getheader("Connection") or "").lower() == "close":
                    conn.close()
                    conn = None
                self._answered.set()
                with self._lock:
                    self.counts[key] += 1
                    if resp.status >= 400:
                        self._record_failure(key[0], resp.status)
            except (OSError, http.client.HTTPException) as err:
                if conn is not None:
                    conn.close()
                conn = None
                if not self._answered.is_set() and isinstance(err, ConnectionRefusedError):
                    with self._lock:
                        self.refused_before_target += 1
                    time.sleep(0.2)
                    continue
                with self._lock:
                    self.transport_errors[type(err).__name__] += 1
                    self._record_failure("?", type(err).__name__)
        if conn is not None:
            conn.close()

    def answered(self, variant: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (v, s), n in self.counts.items()
                if (variant is None or v == variant) and (status is None or s == status)
            )

    def failed(self, variant: str | None = None) -> int:
        """Answers with a 4xx or 5xx status, from `variant` or from anyone."""
        with self._lock:
            return sum(
                n
                for (v, status), n in self.counts.items()
                if status >= 400 and (variant is None or v == variant)
            )

    def outside_canary_failures(self) -> int:
        """Failed answers from anything but the canary, plus failures nobody answered."""
        with self._lock:
            answered = sum(
                n for (v, status), n in self.counts.items() if status >= 400 and v != "canary"
            )
            return answered + sum(self.transport_errors.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "answers": {f"{v} {s}": n for (v, s), n in sorted(self.counts.items())},
                "transport_errors": dict(self.transport_errors),
                "refused_before_target": self.refused_before_target,
                "first_failures": [
                    (time.strftime("%H:%M:%S", time.gmtime(t)) + f"{t % 1:.3f}"[1:], v, s)
                    for t, v, s in self.failures[:10]
                ],
            }
