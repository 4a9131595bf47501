from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from models.config import MlgateConfig, load_config

REPO = Path(__file__).resolve().parents[1]

# Every test module names its tier in `pytestmark` (see pyproject's markers): `fast` pure
# functions, no server; `integration` real MLflow/Prefect/BentoML/HAProxy; `e2e` whole
# loops; `stack` team mode's servers. `make test-fast` runs `-m fast`, `make test` all.
TIERS = ("fast", "integration", "e2e", "stack")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    untiered = sorted({item.nodeid.split("::")[0] for item in items if not _tiers(item)})
    if untiered:
        raise pytest.UsageError(
            "test modules without a tier marker (pytestmark = pytest.mark.<tier>, one of "
            f"{', '.join(TIERS)}): {', '.join(untiered)}"
        )


def _tiers(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers() if mark.name in TIERS}


@pytest.fixture(autouse=True)
def _fresh_circuit_breakers() -> None:
    """Every test starts with closed breakers (services/breakers.py): they are per process,
    and one test's registry outage must not fail the next test's calls fast."""
    from services import breakers

    breakers.reset()


BUNDLED_CONFIG = REPO / "mlgate.yaml"
BUNDLED_DATA = REPO / "data" / "churn.parquet"


@pytest.fixture(scope="session")
def churn_df() -> pd.DataFrame:
    return pd.read_parquet(BUNDLED_DATA)


@pytest.fixture(scope="session")
def bundled_cfg() -> MlgateConfig:
    return load_config(BUNDLED_CONFIG)


def write_config(tmp: Path, **overrides: dict) -> Path:
    """The bundled config with its data path made absolute, the registry in `tmp`, and
    any section replaced or merged from `overrides`."""
    raw = yaml.safe_load(BUNDLED_CONFIG.read_text())
    raw["dataset"]["path"] = str(BUNDLED_DATA)
    raw["registry"]["store_dir"] = str(tmp / "store")
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp / "mlgate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
