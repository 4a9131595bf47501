from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from models.config import load_config
from tests.conftest import write_config


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    # A temporary Prefect API backed by a throwaway SQLite database, for the whole session.
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def prefect_api(request: pytest.FixtureRequest) -> None:
    """The harness for every test here but those of a module that runs no flow or task
    (`USES_PREFECT = False`): it takes a while to start."""
    if getattr(request.module, "USES_PREFECT", True):
        request.getfixturevalue("prefect_harness")


@dataclass(frozen=True)
class Seed:
    config_path: Path
    outcome: Any  # the TrainingOutcome of the first model, version 1


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Seed:
    """A registry whose champion, version 1, the training flow made from the bundled config:
    trained once per session. Tests read it; those that write take `copy_registry`."""
    from flows.training import training_flow

    path = write_config(tmp_path_factory.mktemp("seed"))
    outcome = training_flow(config_path=str(path))
    assert outcome.accepted and outcome.version == "1", outcome.reason
    return Seed(path, outcome)


def copy_registry(seed: Seed, tmp: Path, **overrides: dict[str, Any]) -> Path:
    """A config in `tmp` (with `overrides`, as `write_config` takes them) whose registry is
    a copy of the seed's MLflow database: the same champion, and its own store for
    everything a test changes (tags, aliases, versions, runs, locks, trigger state, incoming
    and log folders). MLflow records absolute artifact locations, so the copied runs read
    their artifacts from the seed's store, and new runs of the copied experiments write
    theirs beside them, each under its own run id."""
    path = write_config(tmp, **overrides)
    store = load_config(path).registry.store_dir
    store.mkdir(parents=True, exist_ok=True)
    source = load_config(seed.config_path).registry.store_dir / "mlflow.db"
    with (
        closing(sqlite3.connect(source)) as src,
        closing(sqlite3.connect(store / "mlflow.db")) as dst,
    ):
        src.backup(dst)
    return path
