"""A service on `@champion` follows the alias, on real components: a real MLflow registry on
SQLite (a copy of the serving tests' own, so that moving its alias disturbs no other test),
a real `bentoml serve` process, `mlgate rollback --wait-served` through the CLI, and light
concurrent traffic that must not see one failed request during the swap. Then a version whose
ONNX file does not match its sha256 tag takes the alias: the old model keeps serving."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from flows import alias_moves
from flows import registry as registry_layer
from flows.cli import app
from models.config import MlgateConfig, load_config
from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS, MODEL_ARTIFACT_DIR, SHA_TAG
from services.launcher import ServiceProcess, start_service
from services.metrics import SWAPS_METRIC
from tests.services.conftest import AUTH, Registry, copy_registry, free_port

pytestmark = pytest.mark.integration

POLL_S = 0.5
# A swap is a poll, a fetch from the registry, an ONNX Runtime session and a warm-up; on the
# 2-core test host under load the last three took up to a few seconds.
SWAP_ALLOWANCE_S = 10.0
SERVED_BOUND_S = 2 * POLL_S + SWAP_ALLOWANCE_S
CLIENTS = 4


@dataclasses.dataclass(frozen=True)
class Own:
    config_path: Path
    cfg: MlgateConfig
    client: MlflowClient
    name: str
    workers: int


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def own(
    request: pytest.FixtureRequest, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Own:
    """A copy of the serving registry where v1 and then v2 were promoted to @champion (both
    recorded, so that `mlgate rollback` finds v1 below v2), polled every POLL_S, served by
    one worker or two (each follows on its own)."""
    workers: int = request.param
    root = tmp_path_factory.mktemp("alias_follow")
    config_path = copy_registry(
        registry, root, serving_keys={"alias_poll_s": POLL_S, "workers": workers}
    )
    cfg = load_config(config_path)
    uri = cfg.registry.resolved_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = registry.model_name
    v1 = registry.champion_version
    source = f"{registry.artifact_uri}/{MODEL_ARTIFACT_DIR}"
    sha = client.get_model_version(name, v1).tags[SHA_TAG]
    v2 = client.create_model_version(
        name, source=source, run_id=registry.run_id, tags={SHA_TAG: sha}
    )
    client.delete_registered_model_alias(name, CHAMPION_ALIAS)
    for version in (v1, str(v2.version)):
        alias_moves.promote(
            client, cfg.registry, name, version, reason="alias follow test", force=True
        )
    return Own(config_path, cfg, client, name, workers)


@pytest.fixture(scope="module")
def home(own: Own, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alias_follow_home")


@pytest.fixture(scope="module")
def server(own: Own, home: Path) -> Iterator[ServiceProcess]:
    with start_service(
        own.config_path,
        ModelRef(own.name, alias=CHAMPION_ALIAS),
        port=free_port(),
        log_path=home / "service.log",
        env={"BENTOML_HOME": str(home / "bentoml")},
    ) as proc:
        proc.wait_ready(timeout=300.0)
        yield proc


class Traffic:
    """CLIENTS threads posting one row each, as fast as they are answered; every answer's
    status and version, in order of arrival."""

    def __init__(self, url: str, row: dict[str, Any]) -> None:
        self.url = url
        self.row = row
        self.answers: list[tuple[float, int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0, headers=AUTH) as client:
            while not self._stop.is_set():
                try:
                    resp = client.post("/predict", json={"rows": [self.row]})
                    status = resp.status_code
                    version = resp.json().get("model_version") if status == 200 else resp.text
                except httpx.HTTPError as err:
                    status, version = 0, repr(err)
                with self._lock:
                    self.answers.append((time.monotonic(), status, version))
                time.sleep(0.01)


def one_row(registry: Registry) -> dict[str, Any]:
    frame = registry.holdout[list(registry.cfg.dataset.features)].iloc[:1]
    row: dict[str, Any] = json.loads(frame.to_json(orient="records"))[0]
    return row


def served_version(server: ServiceProcess) -> str:
    return str(httpx.get(f"{server.url}/model", timeout=10.0).json()["version"])


def samples(server: ServiceProcess, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_rollback_reaches_the_service_without_a_failed_request(
    own: Own, registry: Registry, server: ServiceProcess
) -> None:
    assert served_version(server) == "2"
    url = server.url
    with Traffic(url, one_row(registry)) as traffic:
        time.sleep(1.0)
        result = CliRunner().invoke(
            app,
            [
                "rollback",
                own.name,
                "--reason",
                "v2 misbehaves",
                "--config",
                str(own.config_path),
                "--wait-served",
                url,
            ],
        )
        assert result.exit_code == 0, result.output
        # The first answer naming v1 ends the wait; other workers follow within their polls.
        time.sleep(1.0 + 2 * POLL_S * (own.workers - 1))
        tail_from = time.monotonic()
        time.sleep(0.5)
    match = re.search(rf"served by {re.escape(url)} in ([0-9.]+) s \(v1\)", result.output)
    assert match, result.output
    seconds = float(match.group(1))
    assert 0 < seconds <= SERVED_BOUND_S

    statuses = {status for _, status, _ in traffic.answers}
    assert statuses == {200}, [a for a in traffic.answers if a[1] != 200][:5]
    versions = [v for _, _, v in traffic.answers]
    assert versions[0] == "2", versions
    assert {v for at, _, v in traffic.answers if at >= tail_from} == {"1"}
    if own.workers == 1:
        # Once the worker answered v1, it never answers v2 again.
        first_v1 = versions.index("1")
        assert set(versions[first_v1:]) == {"1"}
    assert len(traffic.answers) > 50

    latest = alias_moves.alias_history(own.client, own.name, CHAMPION_ALIAS)[0]
    assert latest[registry_layer.KIND_TAG] == "rollback"
    assert latest["to_version"] == "1"
    assert float(latest[alias_moves.SERVED_S_TAG]) == pytest.approx(seconds, abs=0.006)
    assert json.loads(latest[alias_moves.SERVED_BY_TAG]) == {url: pytest.approx(seconds, abs=0.006)}
    history = CliRunner().invoke(app, ["history", own.name, "--config", str(own.config_path)])
    assert history.exit_code == 0, history.output
    assert f"{float(latest[alias_moves.SERVED_S_TAG]):.3f} s" in history.output

    model = httpx.get(f"{url}/model", timeout=10.0).json()
    assert (model["version"], model["alias"], model["source"]) == ("1", CHAMPION_ALIAS, "registry")
    info = {
        labels["model_version"]: value for labels, value in samples(server, "mlgate_model_info")
    }
    assert info == {"1": 1.0, "2": 0.0}
    requests_by_version: dict[str, float] = {}
    for labels, value in samples(server, "mlgate_requests_total"):
        if labels["status"] == "200":
            requests_by_version[labels["model_version"]] = (
                requests_by_version.get(labels["model_version"], 0.0) + value
            )
    assert requests_by_version["1"] > 0 and requests_by_version["2"] > 0
    swaps = {labels["outcome"]: value for labels, value in samples(server, f"{SWAPS_METRIC}_total")}
    assert swaps == {"done": float(own.workers), "failed": 0.0}
    # The copy kept for a registry outage follows the swap.
    record = json.loads(
        (
            own.cfg.registry.last_known_good_dir()
            / own.name
            / f"alias-{CHAMPION_ALIAS}"
            / "current.json"
        ).read_text()
    )
    assert record["version"] == "1"


def test_a_version_that_fails_its_sha256_check_leaves_the_old_model_serving(
    own: Own, registry: Registry, server: ServiceProcess, home: Path
) -> None:
    assert served_version(server) == "1"
    bad = own.client.create_model_version(
        own.name,
        source=f"{registry.artifact_uri}/{MODEL_ARTIFACT_DIR}",
        run_id=registry.run_id,
        tags={SHA_TAG: "0" * 64},
    )
    alias_moves.promote(
        own.client, own.cfg.registry, own.name, str(bad.version), reason="broken", force=True
    )
    with Traffic(server.url, one_row(registry)) as traffic:
        deadline = time.monotonic() + SERVED_BOUND_S
        failed = 0.0
        while time.monotonic() < deadline and failed < 2:
            time.sleep(POLL_S)
            failed = dict(
                (labels["outcome"], value)
                for labels, value in samples(server, f"{SWAPS_METRIC}_total")
            )["failed"]
    # Tried at every poll, and the old model served every request meanwhile.
    assert failed >= 2
    assert {status for _, status, _ in traffic.answers} == {200}
    assert {version for _, _, version in traffic.answers} == {"1"}
    assert served_version(server) == "1"
    log = (home / "service.log").read_text()
    lines = [line for line in log.splitlines() if f"names v{bad.version}, which could not" in line]
    # One line per worker, however many polls tried it.
    assert len(lines) == own.workers, log
    assert "sha256" in lines[0]


def test_a_service_that_never_answers_with_the_version_is_recorded_as_a_timeout(
    own: Own, server: ServiceProcess
) -> None:
    # @champion is v3 (broken) while the service kept v1: rolling back moves it to v1, which
    # the service already answers with; the other URL has no service behind it.
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        app,
        [
            "rollback",
            own.name,
            "--reason",
            "v3 never served",
            "--config",
            str(own.config_path),
            "--wait-served",
            server.url,
            "--wait-served",
            dead,
            "--wait-timeout",
            "1.5",
        ],
    )
    assert result.exit_code == 1, result.output
    assert f"served by {server.url} in" in result.output
    assert f"{dead} said unreachable" in result.output
    latest = alias_moves.alias_history(own.client, own.name, CHAMPION_ALIAS)[0]
    assert (latest[registry_layer.KIND_TAG], latest["to_version"]) == ("rollback", "1")
    assert latest[alias_moves.SERVED_S_TAG] == "timeout"
    served_by = json.loads(latest[alias_moves.SERVED_BY_TAG])
    assert served_by[dead] is None and 0 < served_by[server.url] < 1.5
