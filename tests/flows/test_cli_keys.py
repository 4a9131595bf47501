"""`mlgate keys create|list|revoke` on a config file, without a server: the token is printed
once, only its sha256 reaches the file, comments survive, and the service would see the
change (`load_config` plus `MLGATE_API_KEYS`, as it merges them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import EXIT_ERROR, EXIT_USAGE, app
from models.config import load_config
from services.auth import API_KEYS_ENV, hash_api_key
from tests.conftest import write_config

pytestmark = pytest.mark.fast

USES_PREFECT = False  # no flow runs: the commands only read and write the config file

TOKEN = re.compile(r"\bmlg_[A-Za-z0-9_-]{43}\b")


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    path = write_config(tmp_path)
    path.write_text("# keep this comment\n" + path.read_text())
    return path


def keys(config: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["keys", *args, "--config", str(config)])


def test_create_prints_the_token_once_and_stores_only_its_hash(config):
    result = keys(config, "create", "ci")
    assert result.exit_code == 0, result.output
    (token,) = set(TOKEN.findall(result.output))
    assert result.output.count(token) == 1
    assert "Authorization: Bearer" in result.output
    text = config.read_text()
    assert token not in text and "# keep this comment" in text
    (key,) = load_config(config).serving.api_keys
    assert (key.name, key.sha256, key.revoked) == ("ci", hash_api_key(token), False)


def test_create_with_a_rate_limit_and_as_json(config):
    result = keys(config, "create", "batch", "--rate-limit", "5", "--burst", "10", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["written"] is True and out["sha256"] == hash_api_key(out["token"])
    (key,) = load_config(config).serving.api_keys
    assert (key.rate_limit_per_s, key.rate_limit_burst) == (5.0, 10)


def test_create_no_write_leaves_the_file_and_says_what_to_add(config):
    before = config.read_text()
    result = keys(config, "create", "ci", "--no-write")
    assert result.exit_code == 0, result.output
    assert config.read_text() == before
    (token,) = set(TOKEN.findall(result.output))
    flat = " ".join(result.output.split())
    assert f"sha256: {hash_api_key(token)}" in flat
    assert f"{API_KEYS_ENV}=ci:{hash_api_key(token)}" in flat


def test_create_refuses_a_taken_or_malformed_name(config, monkeypatch):
    assert keys(config, "create", "ci").exit_code == 0
    again = keys(config, "create", "ci")
    assert again.exit_code == EXIT_USAGE and "exists" in again.output
    bad = keys(config, "create", "my key")
    assert bad.exit_code == EXIT_USAGE and "name" in bad.output
    monkeypatch.setenv(API_KEYS_ENV, f"deploy:{hash_api_key('x')}")
    taken_in_env = keys(config, "create", "deploy")
    assert taken_in_env.exit_code == EXIT_USAGE and API_KEYS_ENV in taken_in_env.output


def test_create_in_a_layout_it_cannot_edit_writes_nothing_and_says_what_to_add(config):
    config.write_text(config.read_text() + "serving: {port: 3001}\n")
    before = config.read_text()
    result = keys(config, "create", "ci")
    assert result.exit_code == EXIT_ERROR
    assert config.read_text() == before
    (token,) = set(TOKEN.findall(result.output))
    assert hash_api_key(token) in result.output


def test_list_shows_names_and_states_never_tokens_or_digests(config, monkeypatch):
    created = json.loads(keys(config, "create", "ci", "--json").output)
    assert keys(config, "create", "old").exit_code == 0
    assert keys(config, "revoke", "old").exit_code == 0
    monkeypatch.setenv(API_KEYS_ENV, f"deploy:{hash_api_key('x')}")
    listed = keys(config, "list")
    assert listed.exit_code == 0, listed.output
    for name in ("ci", "old", "deploy", "revoked", "active", API_KEYS_ENV):
        assert name in listed.output
    assert created["token"] not in listed.output and created["sha256"] not in listed.output
    rows = json.loads(keys(config, "list", "--json").output)
    assert {(r["name"], r["revoked"], r["source"]) for r in rows} == {
        ("ci", False, "config"),
        ("old", True, "config"),
        ("deploy", False, API_KEYS_ENV),
    }
    assert all(len(r["sha256_prefix"]) == 8 for r in rows)


def test_list_without_keys_says_serve_refuses(config):
    listed = keys(config, "list")
    assert listed.exit_code == 0
    assert "mlgate keys create" in " ".join(listed.output.split())


def test_revoke_marks_the_key_revoked_in_the_config(config):
    token = json.loads(keys(config, "create", "ci", "--json").output)["token"]
    assert keys(config, "create", "other").exit_code == 0
    result = keys(config, "revoke", "ci")
    assert result.exit_code == 0, result.output
    assert "restart" in result.output
    by_name = {k.name: k for k in load_config(config).serving.api_keys}
    assert by_name["ci"].revoked and by_name["ci"].sha256 == hash_api_key(token)
    assert not by_name["other"].revoked
    assert "# keep this comment" in config.read_text()
    again = keys(config, "revoke", "ci")
    assert again.exit_code == 0 and "already revoked" in again.output


def test_revoke_a_key_from_the_environment_revokes_its_digest_in_the_config(config, monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, f"deploy:{hash_api_key('x')}")
    result = keys(config, "revoke", "deploy")
    assert result.exit_code == 0, result.output
    assert API_KEYS_ENV in result.output
    (key,) = load_config(config).serving.api_keys
    assert (key.name, key.sha256, key.revoked) == ("deploy", hash_api_key("x"), True)


def test_revoke_an_unknown_name_is_usage(config):
    result = keys(config, "revoke", "nobody")
    assert result.exit_code == EXIT_USAGE and "nobody" in result.output
