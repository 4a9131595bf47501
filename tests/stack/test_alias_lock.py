"""The cross-host alias lock on the stack's PostgreSQL: one holder per model and alias, a
clear error after the timeout or when the server cannot be reached, and `_lock` choosing it
only in team mode."""

from __future__ import annotations

import time

import pytest
from filelock import FileLock

from flows import alias_moves, registry
from flows.alias_lock import AliasLockError, advisory_lock, server_address
from tests.stack.conftest import Team

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1500)]


def _dsn(team: Team) -> str:
    return str(team.raw["registry"]["lock_dsn"])


def test_a_held_alias_lock_times_out_with_a_clear_error(team: Team):
    dsn = _dsn(team)
    with advisory_lock(dsn, "churn", "champion", timeout_s=5):
        started = time.monotonic()
        with (
            pytest.raises(AliasLockError, match=r"held the lock on churn@champion for over 1 s"),
            advisory_lock(dsn, "churn", "champion", timeout_s=1),
        ):
            pass
        assert 0.9 < time.monotonic() - started < 5
        # Another alias, or another model, is another lock.
        with advisory_lock(dsn, "churn", "challenger", timeout_s=1):
            pass
        with advisory_lock(dsn, "churn2", "champion", timeout_s=1):
            pass
    with advisory_lock(dsn, "churn", "champion", timeout_s=1):
        pass


def test_a_refused_connection_is_a_registry_error_without_the_password(team: Team):
    port = team.cfg.stack.postgres.port
    dsn = f"postgresql://mlgate:s3cret-pw@127.0.0.1:{port}/mlgate"
    with (
        pytest.raises(registry.RegistryError, match="cannot connect") as err,
        advisory_lock(dsn, "churn", "champion", timeout_s=1),
    ):
        pass
    assert f"127.0.0.1:{port}/mlgate" in str(err.value)
    assert "s3cret-pw" not in str(err.value)
    assert server_address(dsn) == f"127.0.0.1:{port}/mlgate"


def test_lock_is_the_advisory_lock_in_team_mode_and_the_file_lock_otherwise(team: Team, tmp_path):
    team_cfg = team.host_config(tmp_path / "team")
    assert not isinstance(alias_moves._lock(team_cfg.registry, "churn", "champion"), FileLock)
    embedded = team.host_config(tmp_path / "embedded", lock_dsn=None)
    assert isinstance(alias_moves._lock(embedded.registry, "churn", "champion"), FileLock)
