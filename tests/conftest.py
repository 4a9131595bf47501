from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from models.config import MlgateConfig, load_config

REPO = Path(__file__).resolve().parents[1]
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
