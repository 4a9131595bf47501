"""Circuit breakers around mlgate's outbound dependencies, and their state for `/metrics`.

One breaker per dependency, target and process (`registry` and its URI, `prometheus` and its
URL, `notifications`): failures of one registry never fail the calls to another. From
pybreaker, pinned at 1.4.1: maintained (released September 2025), synchronous like every call
it guards, thread-safe, and its listeners report each failure and state change, which gives
the counters below directly. aiobreaker's last release is from 2021 and purgatory is built
for asyncio; circuitbreaker 2.1.3 would also do, with no listener hooks. An exception the
caller says is an answer of the dependency (no such model) passes through as a success.
`call` runs a whole retried call (tenacity inside) as one
call of the breaker, so one failure for it; after `FAIL_MAX` consecutive failures the
breaker opens and calls fail fast, for `RESET_S`, with one line naming the dependency and
when it is tried again; then one trial call (half-open) closes or reopens it.

`/metrics` (services/metrics.py) exports `mlgate_circuit_breaker_state{dependency}` (0
closed, 1 half-open, 2 open: one gauge with a numeric state, as `up` is, so that an alert is
`== 2` and a graph shows the history; with several targets or workers the worst one is kept)
and
`mlgate_circuit_breaker_failures_total` / `mlgate_circuit_breaker_opens_total`.

The audit of every outbound call (its timeout, whether it is retried, whether it is
idempotent, its breaker) is docs/resilience.md.

Written on pybreaker, not by hand; the state-to-number map and the counters are ours because
pybreaker has no metric of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker

T = TypeVar("T")

FAIL_MAX = 3
RESET_S = 30.0
# Prometheus' value of each pybreaker state (`mlgate_circuit_breaker_state`).
STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}
DEPENDENCIES = ("registry", "prometheus", "notifications")


class CircuitOpenError(RuntimeError):
    """A dependency's breaker is open: the call was not made. One line naming the
    dependency and when it is tried again."""

    def __init__(self, message: str, dependency: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class _Counts(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.failures = 0
        self.opens = 0

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.failures += 1

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        if new_state is not None and new_state.name == pybreaker.STATE_OPEN:
            self.opens += 1


_lock = threading.Lock()
_breakers: dict[tuple[str, str], tuple[pybreaker.CircuitBreaker, _Counts]] = {}


def breaker(dependency: str, target: str | None = None) -> pybreaker.CircuitBreaker:
    """This process's breaker of `dependency` at `target`, made on first use."""
    return _entry(dependency, target)[0]


def _entry(dependency: str, target: str | None) -> tuple[pybreaker.CircuitBreaker, _Counts]:
    key = (dependency, target or "")
    with _lock:
        entry = _breakers.get(key)
        if entry is None:
            counts = _Counts()
            cb = pybreaker.CircuitBreaker(
                fail_max=FAIL_MAX,
                reset_timeout=RESET_S,
                listeners=[counts],
                name=dependency,
                # The call that trips the breaker raises its own error (the caller's one
                # line), not pybreaker's; the calls after it get `CircuitOpenError`.
                throw_new_error_on_trip=False,
            )
            entry = _breakers[key] = (cb, counts)
        return entry


def call(
    dependency: str,
    fn: Callable[[], T],
    *,
    is_failure: Callable[[BaseException], bool] = lambda err: True,
    target: str | None = None,
) -> T:
    """`fn()` through the dependency's breaker. An exception for which `is_failure` is False
    (an answer, not an outage) passes through without counting. While open: `CircuitOpenError`,
    naming `target` (what is called, e.g. the registry's URI) when given."""
    cb = breaker(dependency, target)

    def guarded() -> tuple[bool, Any]:
        try:
            return True, fn()
        except Exception as err:
            if is_failure(err):
                raise
            return False, err  # the dependency answered: a success for the breaker

    try:
        ok, value = cb.call(guarded)
    except pybreaker.CircuitBreakerError:
        raise CircuitOpenError(open_message(dependency, target), dependency) from None
    if not ok:
        raise value
    return value


def open_message(dependency: str, target: str | None = None) -> str:
    cb = breaker(dependency, target)
    opened = cb._state_storage.opened_at or datetime.now(UTC)
    retry_at = opened + timedelta(seconds=cb.reset_timeout)
    left = max(0.0, (retry_at - datetime.now(UTC)).total_seconds())
    what = f"{dependency} {target}" if target else dependency
    return (
        f"{what}: circuit breaker open after {cb.fail_max} consecutive failures; not called "
        f"until {retry_at:%H:%M:%S} UTC (in {left:.0f} s)"
    )


def states() -> dict[str, tuple[int, int, int]]:
    """Every dependency's (state value, failures, opens) in this process, over its targets:
    the worst state and the summed counts; the ones not used yet closed at zero."""
    with _lock:
        entries = dict(_breakers)
    out = {name: (0, 0, 0) for name in DEPENDENCIES}
    for (name, _target), (cb, counts) in entries.items():
        state, failures, opens = out.get(name, (0, 0, 0))
        out[name] = (
            max(state, STATE_VALUES.get(cb.current_state, 2)),
            failures + counts.failures,
            opens + counts.opens,
        )
    return out


def reset(dependencies: Iterable[str] | None = None) -> None:
    """Forget the breakers (all, or the named ones): tests, and a process that starts over."""
    with _lock:
        names = set(dependencies) if dependencies is not None else None
        for key in list(_breakers):
            if names is None or key[0] in names:
                _breakers.pop(key, None)
