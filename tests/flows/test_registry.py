"""The registry layer against a real MLflow on SQLite in a temp dir: evidence-checked
promotion, history-based rollback, refusal to delete an alias holder, and compare-and-set
under races from threads and processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import alias_moves, registry
from flows.cli import app
from models.config import MlgateConfig, RegistryConfig, load_config
from models.registry_layout import GATE_TAG_PREFIX, KIND_TAG
from tests.conftest import write_config

pytestmark = pytest.mark.integration

NAME = "churn"
PASSING = {f"{GATE_TAG_PREFIX}{g}": "pass" for g in ("data", "parity", "champion")}


def _setup(tmp: Path) -> tuple[MlgateConfig, Path]:
    path = write_config(tmp)
    return load_config(path), path


def _version(client, reg: RegistryConfig, tags: dict[str, str]) -> str:
    """A registered version with the given evidence tags; the registry layer does not look
    inside the artifact, so an empty run stands in for a trained model here."""
    exp = registry.ensure_experiment(client, reg, reg.experiment)
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id)
    return str(registry.register_version(client, NAME, run.info.run_id, "0" * 64, tags).version)


@pytest.fixture()
def reg(tmp_path):
    cfg, path = _setup(tmp_path)
    return cfg.registry, registry.connect(cfg.registry), path


def test_promote_needs_passing_evidence(reg):
    cfg, client, _ = reg
    bare = _version(client, cfg, {})
    failing = _version(client, cfg, {**PASSING, f"{GATE_TAG_PREFIX}champion": "fail"})
    good = _version(client, cfg, PASSING)
    with pytest.raises(alias_moves.EvidenceError) as err:
        alias_moves.promote(client, cfg, NAME, bare, reason="try")
    assert err.value.missing == {"data": "missing", "parity": "missing", "champion": "missing"}
    with pytest.raises(alias_moves.EvidenceError, match="champion: fail"):
        alias_moves.promote(client, cfg, NAME, failing, reason="try")
    assert registry.get_alias_version(client, NAME, "champion") is None

    move = alias_moves.promote(client, cfg, NAME, good, reason="passed every gate")
    assert (move.from_version, move.to_version, move.forced) == (None, good, False)

    forced = alias_moves.promote(
        client, cfg, NAME, failing, reason="hotfix, accepted risk", force=True
    )
    assert forced.forced and forced.from_version == good
    newest = alias_moves.alias_history(client, NAME, "champion")[0]
    assert newest["forced"] == "true" and newest["reason"] == "hotfix, accepted risk"
    assert newest["to_version"] == failing
    with pytest.raises(registry.RegistryError, match="reason"):
        alias_moves.promote(client, cfg, NAME, bare, reason=" ", force=True)


def test_rollback_follows_history_not_version_numbers(reg):
    cfg, client, _ = reg
    v1, v2, v3 = (_version(client, cfg, PASSING) for _ in range(3))
    alias_moves.promote(client, cfg, NAME, v3, reason="first")
    alias_moves.promote(client, cfg, NAME, v1, reason="second")
    alias_moves.promote(client, cfg, NAME, v2, reason="third")
    assert alias_moves.rollback(client, cfg, NAME, reason="bad canary").to_version == v1
    assert alias_moves.rollback(client, cfg, NAME, reason="still bad").to_version == v3
    with pytest.raises(registry.RegistryError, match="no earlier holder"):
        alias_moves.rollback(client, cfg, NAME, reason="again")
    assert str(registry.get_alias_version(client, NAME, "champion").version) == v3


def test_history_survives_deletion_and_holder_is_protected(reg):
    cfg, client, _ = reg
    v1, v2 = (_version(client, cfg, PASSING) for _ in range(2))
    alias_moves.promote(client, cfg, NAME, v1, reason="one")
    alias_moves.promote(client, cfg, NAME, v2, reason="two")
    with pytest.raises(registry.RegistryError, match="holds @champion"):
        alias_moves.delete_version(client, cfg, NAME, v2, reason="cleanup")
    alias_moves.delete_version(client, cfg, NAME, v1, reason="cleanup")
    hist = alias_moves.alias_history(client, NAME)
    kinds = [(h[KIND_TAG], h["from_version"], h["to_version"]) for h in hist]
    assert kinds == [("delete", v1, "None"), ("promote", v1, v2), ("promote", "None", v1)]
    with pytest.raises(registry.RegistryError, match="was deleted"):
        alias_moves.rollback(client, cfg, NAME, reason="v1 is gone")
    alias_moves.delete_version(client, cfg, NAME, v2, reason="retire", force=True)
    assert alias_moves.alias_history(client, NAME)[0]["forced"] == "true"


def test_threads_racing_on_one_alias_have_exactly_one_winner(reg):
    cfg, client, _ = reg
    base = _version(client, cfg, PASSING)
    alias_moves.promote(client, cfg, NAME, base, reason="base")
    contenders = [_version(client, cfg, PASSING) for _ in range(6)]
    for round_no in range(2):
        holder = holder_now(client)
        others = [v for v in contenders if v != holder]
        start = threading.Barrier(len(others))

        def contend(v: str, holder: str = holder, start: threading.Barrier = start) -> str:
            own = registry.connect(cfg)
            start.wait()
            try:
                alias_moves.promote(own, cfg, NAME, v, reason="race", expected_from=holder)
                return "won"
            except alias_moves.AliasConflictError as err:
                assert "last moved to" in str(err)
                return "lost"

        with ThreadPoolExecutor(len(others)) as pool:
            results = list(pool.map(contend, others))
        assert results.count("won") == 1, (round_no, results)
    with pytest.raises(registry.RegistryError, match="already holds"):
        alias_moves.promote(client, cfg, NAME, holder_now(client), reason="no-op")
    assert len(alias_moves.alias_history(client, NAME, "champion")) == 3  # base + 1 per round


def holder_now(client) -> str:
    return str(registry.get_alias_version(client, NAME, "champion").version)


def _contend_in_process(args: tuple[str, str, str]) -> str:
    config_path, version, holder = args
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    try:
        alias_moves.promote(
            client, cfg.registry, NAME, version, reason="race", expected_from=holder
        )
        return "won"
    except alias_moves.AliasConflictError:
        return "lost"


def test_processes_racing_have_exactly_one_winner_and_no_lost_history(reg):
    cfg, client, path = reg
    base = _version(client, cfg, PASSING)
    alias_moves.promote(client, cfg, NAME, base, reason="base")
    contenders = [_version(client, cfg, PASSING) for _ in range(4)]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        for _ in range(2):
            holder = str(registry.get_alias_version(client, NAME, "champion").version)
            jobs = [(str(path), v, holder) for v in contenders if v != holder]
            results = list(pool.map(_contend_in_process, jobs))
            assert results.count("won") == 1, results
    hist = alias_moves.alias_history(client, NAME, "champion")
    assert len(hist) == 3
    stack = alias_moves.holder_stack(hist)
    assert stack[-1] == str(registry.get_alias_version(client, NAME, "champion").version)


def test_cli_promote_rollback_history(reg):
    cfg, client, path = reg
    v1, v2 = (_version(client, cfg, PASSING) for _ in range(2))
    bare = _version(client, cfg, {})
    runner = CliRunner()
    c = ["--config", str(path)]
    assert runner.invoke(app, ["promote", NAME, v1, "--reason", "first", *c]).exit_code == 0
    assert runner.invoke(app, ["promote", NAME, v2, "--reason", "second", *c]).exit_code == 0
    refused = runner.invoke(app, ["promote", NAME, bare, "--reason", "no evidence", *c])
    assert refused.exit_code == 1 and "lacks passing evidence" in refused.output
    back = runner.invoke(app, ["rollback", NAME, "--reason", "regression seen", *c])
    assert back.exit_code == 0, back.output
    assert str(registry.get_alias_version(client, NAME, "champion").version) == v1
    hist = json.loads(
        runner.invoke(app, ["history", NAME, "--alias", "champion", "--json", *c]).output
    )
    assert (hist[0][KIND_TAG], hist[0]["reason"], hist[0]["to_version"]) == (
        "rollback",
        "regression seen",
        v1,
    )
    table = runner.invoke(app, ["history", NAME, *c])
    assert table.exit_code == 0 and "rollback" in table.output
    shown = runner.invoke(app, ["models", "show", f"{NAME}@champion", *c])
    assert shown.exit_code == 0 and "lineage" in shown.output
    deleted = runner.invoke(app, ["models", "delete", NAME, v1, "--reason", "x", *c])
    assert deleted.exit_code == 1 and "holds @champion" in deleted.output


def test_promotion_notifies_through_apprise(tmp_path):
    """Apprise's json:// notifier posting to a real HTTP server on loopback."""
    import http.server

    received: list[dict] = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = write_config(
            tmp_path, registry={"notify_urls": [f"json://127.0.0.1:{server.server_port}/"]}
        )
        cfg = load_config(path).registry
        client = registry.connect(cfg)
        v = _version(client, cfg, PASSING)
        alias_moves.promote(client, cfg, NAME, v, reason="notify me")
    finally:
        server.shutdown()
    assert len(received) == 1
    assert "notify me" in received[0]["message"] and "champion" in received[0]["title"]
