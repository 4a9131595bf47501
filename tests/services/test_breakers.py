"""Circuit breakers (services/breakers.py) around real failing calls: a SQLite registry that
cannot be opened, a Prometheus port nobody listens on. A whole retried call is one failure;
three open the breaker, and then calls fail fast with one line naming the dependency and
when it is tried again, without calling it; an answer of the dependency is not a failure;
after the reset time one trial call closes it. The service's `/metrics` shows the state."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pybreaker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services import breakers
from services.metrics import BREAKER_STATE_METRIC, ServiceMetrics
from services.prometheus import PrometheusError, PrometheusProcess
from services.registry_access import (
    RegistryUnavailableError,
    open_registry_client,
    retry_unavailable,
)
from tests.services.conftest import free_port

pytestmark = pytest.mark.fast


def _missing_registry(tmp_path: Path) -> str:
    # A tracking server's address where nothing listens: a real refused connection from
    # MLflow's own request helper, in milliseconds.
    return f"http://127.0.0.1:{free_port()}"


def _counted(uri: str, calls: list[str]) -> Callable[[], object]:
    """A registry client opener that records each call in `calls`."""

    def open_client() -> object:
        calls.append(uri)
        return open_registry_client(uri)

    return open_client


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_registry_breaker_opens_after_three_failed_calls_and_then_fails_fast(
    tmp_path: Path,
) -> None:
    uri = _missing_registry(tmp_path)
    calls: list[str] = []
    open_client = _counted(uri, calls)

    for _ in range(breakers.FAIL_MAX):
        with pytest.raises(RegistryUnavailableError, match="cannot be reached"):
            retry_unavailable(open_client, uri, 0.0)
    assert breakers.breaker("registry", uri).current_state == pybreaker.STATE_OPEN
    tried = len(calls)

    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as err:
        retry_unavailable(open_client, uri, 5.0)
    assert time.monotonic() - started < 0.5  # no 5 s of retries: failed fast
    assert len(calls) == tried  # not called at all
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"registry {uri}: circuit breaker open")
    assert "circuit breaker open after 3 consecutive failures" in message
    assert "not called until" in message and "UTC (in 30 s)" in message


def test_an_open_breaker_of_one_registry_does_not_fail_calls_to_another(tmp_path: Path) -> None:
    down = _missing_registry(tmp_path)
    for _ in range(breakers.FAIL_MAX):
        with pytest.raises(RegistryUnavailableError, match="cannot be reached"):
            retry_unavailable(lambda: open_registry_client(down), down, 0.0)
    with pytest.raises(RegistryUnavailableError, match="circuit breaker open"):
        retry_unavailable(lambda: open_registry_client(down), down, 0.0)

    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    assert retry_unavailable(lambda: "answered", other, 0.0) == "answered"
    assert breakers.breaker("registry", other).current_state == pybreaker.STATE_CLOSED
    # /metrics keeps the worst state of the dependency and the summed counts.
    assert breakers.states()["registry"] == (2, 3, 1)


def test_a_retried_call_is_one_failure_and_retries_use_full_jitter(tmp_path: Path) -> None:
    uri = _missing_registry(tmp_path)
    calls: list[str] = []
    open_client = _counted(uri, calls)

    with pytest.raises(RegistryUnavailableError, match=r"\(tried for 1 s\)"):
        retry_unavailable(open_client, uri, 1.0)
    assert len(calls) > 1  # retried inside the one breaker call
    state, failures, opens = breakers.states()["registry"]
    assert (state, failures, opens) == (0, 1, 0)


def test_an_answer_of_the_registry_is_not_a_failure() -> None:
    def no_such_model() -> None:
        raise LookupError("registered model 'nope' not found")

    for _ in range(breakers.FAIL_MAX + 2):
        with pytest.raises(LookupError, match="not found"):
            retry_unavailable(no_such_model, "http://127.0.0.1:1", 0.0)
    assert breakers.states()["registry"] == (0, 0, 0)


def test_half_open_trial_success_closes_the_breaker() -> None:
    cb = breakers.breaker("notifications")
    cb.reset_timeout = 0.2

    def down() -> None:
        raise ConnectionError("smtp refused")

    for _ in range(breakers.FAIL_MAX):
        with pytest.raises(ConnectionError):
            breakers.call("notifications", down)
    with pytest.raises(breakers.CircuitOpenError, match=r"^notifications: circuit breaker open"):
        breakers.call("notifications", down)
    time.sleep(0.3)
    assert breakers.call("notifications", lambda: "sent") == "sent"
    assert cb.current_state == pybreaker.STATE_CLOSED
    assert breakers.states()["notifications"] == (0, 3, 1)


def test_prometheus_query_retries_then_opens_its_breaker(tmp_path: Path) -> None:
    # No Prometheus process: only the HTTP client is exercised, against a port nobody
    # listens on (the query never touches the process).
    prom = PrometheusProcess(None, free_port(), tmp_path / "p.log")  # type: ignore[arg-type]
    for _ in range(breakers.FAIL_MAX):
        with pytest.raises(PrometheusError, match="did not answer"):
            prom.query("up")
    with pytest.raises(PrometheusError, match=r"^prometheus http://127\.0\.0\.1:\d+: circuit"):
        prom.query("up")


def test_service_metrics_export_breaker_state_failures_and_opens(tmp_path: Path) -> None:
    metrics = ServiceMetrics("churn", "1", "blue", "CPUExecutionProvider", "ab" * 32)
    text = metrics.render()[0].decode()
    for dependency in breakers.DEPENDENCIES:
        assert _sample(text, BREAKER_STATE_METRIC, dependency=dependency) == 0.0

    uri = _missing_registry(tmp_path)
    for _ in range(breakers.FAIL_MAX):
        with pytest.raises(RegistryUnavailableError):
            retry_unavailable(lambda: open_registry_client(uri), uri, 0.0)
    text = metrics.render()[0].decode()
    assert _sample(text, BREAKER_STATE_METRIC, dependency="registry") == 2.0
    assert _sample(text, "mlgate_circuit_breaker_failures_total", dependency="registry") == 3.0
    assert _sample(text, "mlgate_circuit_breaker_opens_total", dependency="registry") == 1.0
    assert _sample(text, BREAKER_STATE_METRIC, dependency="prometheus") == 0.0
