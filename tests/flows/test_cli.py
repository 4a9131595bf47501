"""`mlgate init`, `serve` and `monitor` options, without a flow run or a server: the model
name and the API key `init` writes for a user's own table, `serve`'s refusal to start an
open endpoint, and the window `monitor` hands the monitoring flow."""

from __future__ import annotations

import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import flows.monitoring
import flows.runtime
import services.launcher
from flows.cli import EXIT_USAGE, app
from flows.monitoring import MonitoringOutcome
from models.config import load_config
from services.auth import API_KEYS_ENV, hash_api_key
from tests.conftest import write_config

pytestmark = pytest.mark.fast

USES_PREFECT = False  # the monitoring flow is replaced: no Prefect API to start


def _loans(path: Path) -> Path:
    n = 300
    pd.DataFrame(
        {
            "loan_id": range(n),
            "amount": [1000.0 + 37 * (i % 50) for i in range(n)],
            "term": ["36m", "60m"] * (n // 2),
            "defaulted": ["no", "no", "yes"] * (n // 3),
        }
    ).to_csv(path, index=False)
    return path


def _init(tmp_path: Path, data: Path, *extra: str) -> Any:
    out = tmp_path / "mlgate.yaml"
    args = ["init", "--data", str(data), "--target", "defaulted", "--output", str(out)]
    return CliRunner().invoke(app, [*args, *extra, "--force"]), out


def test_init_names_the_model_after_the_data_file(tmp_path):
    result, out = _init(tmp_path, _loans(tmp_path / "loan book.csv"))
    assert result.exit_code == 0, result.output
    assert load_config(out).registry.model_name == "loan_book"
    assert "model loan_book" in " ".join(result.output.split())


def test_init_name_option_wins_and_a_bad_one_is_usage(tmp_path):
    data = _loans(tmp_path / "loans.csv")
    result, out = _init(tmp_path, data, "--name", "credit-risk")
    assert result.exit_code == 0, result.output
    assert load_config(out).registry.model_name == "credit-risk"
    assert "model credit-risk" in " ".join(result.output.split())
    bad, _ = _init(tmp_path, data, "--name", "credit risk")
    assert bad.exit_code == EXIT_USAGE and "--name" in bad.output


@pytest.fixture()
def monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`mlgate monitor` with the flow replaced by one that records its arguments."""
    calls: list[dict[str, Any]] = []

    def fake_flow(**kwargs: Any) -> MonitoringOutcome:
        calls.append(kwargs)
        end = kwargs["now"] or datetime.now(UTC)
        hours = kwargs["window_hours"] or 1.0
        return MonitoringOutcome(end - timedelta(hours=hours), end, 0, "1", decision="idle")

    monkeypatch.setattr(flows.monitoring, "monitoring_flow", fake_flow)
    monkeypatch.setattr(flows.runtime, "use_configured_servers", lambda cfg: None)
    config = write_config(tmp_path)

    def invoke(*args: str) -> tuple[Any, list[dict[str, Any]]]:
        calls.clear()
        result = CliRunner().invoke(app, ["monitor", "--config", str(config), *args])
        return result, list(calls)

    return invoke


def test_monitor_defaults_to_the_configured_window_ending_now(monitor):
    result, calls = monitor("--no-retrain")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["retrain"] is False and call["now"] is None and call["window_hours"] is None


@pytest.mark.parametrize(
    ("until", "window", "end", "hours"),
    [
        ("2026-03-01T12:00:00", "30m", datetime(2026, 3, 1, 12, tzinfo=UTC), 0.5),
        ("2026-03-01T13:00:00+01:00", "2h", datetime(2026, 3, 1, 12, tzinfo=UTC), 2.0),
        ("2026-03-01T12:00:00Z", "90s", datetime(2026, 3, 1, 12, tzinfo=UTC), 0.025),
        ("2026-03-01", "1d", datetime(2026, 3, 1, tzinfo=UTC), 24.0),
        ("2026-03-01T12:00", "1.5", datetime(2026, 3, 1, 12, tzinfo=UTC), 1.5),
    ],
)
def test_monitor_judges_the_window_it_is_given(monitor, until, window, end, hours):
    result, calls = monitor("--until", until, "--window", window, "--json")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["now"] == end and call["now"].tzinfo is not None
    assert call["window_hours"] == pytest.approx(hours)


@pytest.mark.parametrize(
    "args",
    [
        ("--window", "0"),
        ("--window", "-1h"),
        ("--window", "an hour"),
        ("--window", "5w"),
        ("--until", "yesterday"),
        ("--until", (datetime.now(UTC) + timedelta(days=1)).isoformat()),
    ],
)
def test_monitor_refuses_a_window_it_cannot_judge(monitor, args):
    result, calls = monitor(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert args[0] in result.output and not calls


def test_init_creates_an_api_key_printed_once_and_stores_only_its_hash(tmp_path):
    result, out = _init(tmp_path, _loans(tmp_path / "loans.csv"))
    assert result.exit_code == 0, result.output
    tokens = set(re.findall(r"\bmlg_[A-Za-z0-9_-]{43}\b", result.output))
    assert len(tokens) == 1, result.output
    (token,) = tokens
    assert result.output.count(token) == 1 and "Authorization: Bearer" in result.output
    assert token not in out.read_text()
    (key,) = load_config(out).serving.api_keys
    assert key.sha256 == hash_api_key(token) and not key.revoked


class FakeService:
    """What `mlgate serve` drives: ready at once, then gone (so `serve` returns)."""

    def wait_ready(self, timeout: float) -> None:
        pass

    def is_running(self) -> bool:
        return False

    def stop(self) -> None:
        pass

    def output_tail(self) -> str:
        return "the service's last lines"


@pytest.fixture()
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`mlgate serve` with the launcher replaced by one that records its arguments."""
    calls: list[dict[str, Any]] = []

    def fake_start(config: Path, ref: Any, **kwargs: Any) -> FakeService:
        calls.append({"config": config, "ref": ref, **kwargs})
        return FakeService()

    monkeypatch.setattr(services.launcher, "start_service", fake_start)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.delenv(API_KEYS_ENV, raising=False)

    def invoke(*args: str, **serving: Any) -> tuple[Any, list[dict[str, Any]]]:
        config = write_config(tmp_path, serving=serving)
        calls.clear()
        result = CliRunner().invoke(app, ["serve", "--config", str(config), *args])
        return result, list(calls)

    return invoke


def test_serve_refuses_to_start_without_api_keys(serve):
    result, calls = serve()
    assert result.exit_code == EXIT_USAGE and not calls
    flat = " ".join(result.output.split())
    assert "mlgate keys create" in flat and "--insecure-no-auth" in flat


def test_serve_insecure_no_auth_starts_open_and_says_so_loudly(serve):
    result, calls = serve("--insecure-no-auth")
    assert len(calls) == 1, result.output
    assert "authentication is OFF" in " ".join(result.output.split())


def test_serve_with_keys_starts_and_shows_the_service_output(serve, monkeypatch):
    result, calls = serve(api_keys=[{"name": "ci", "sha256": hash_api_key("t")}])
    assert [c["echo"] for c in calls] == [True], result.output
    # Echoed as it came, the service's output is not repeated in the error.
    assert result.exit_code == 1 and "the service's last lines" not in result.output
    monkeypatch.setenv(API_KEYS_ENV, f"ci:{hash_api_key('t')}")
    result, calls = serve()
    assert len(calls) == 1, result.output


def test_serve_with_every_key_revoked_starts_and_warns(serve):
    result, calls = serve(api_keys=[{"name": "ci", "sha256": hash_api_key("t"), "revoked": True}])
    assert len(calls) == 1, result.output
    assert "revoked" in result.output


def test_serve_refuses_a_malformed_api_keys_variable(serve, monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, "a-plain-token")
    result, calls = serve()
    assert result.exit_code == EXIT_USAGE and not calls and API_KEYS_ENV in result.output
