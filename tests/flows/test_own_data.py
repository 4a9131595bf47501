"""The README's promise for a user's own table: `mlgate init` then `mlgate train`, nothing
edited in between, gives a first model that is the champion. Real MLflow on SQLite in a
temp dir, Prefect's test harness, on a table with nulls in numeric and categorical
columns, rare categories and a target named like a spreadsheet column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import EXIT_OK, app
from models.config import load_config

pytestmark = pytest.mark.integration

TARGET = "Defaulted?"


def _credit_table(path: Path, n: int = 3000, seed: int = 0) -> Path:
    """Loans whose default depends on income, age and job. As in the credit table of issue
    15.2, the first categorical columns have categories too rare for a holdout slice:
    `Marital` three of them, `Home` one (and nulls); the numbers have nulls too, and the
    labels are text."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(7.5, 0.5, n)
    age = rng.integers(18, 75, n).astype(float)
    job = rng.choice(["fixed", "freelance", "partime"], n, p=[0.5, 0.3, 0.2])
    marital = rng.choice(
        ["married", "single", "divorced", "separated", "widow"],
        n,
        p=[0.55, 0.39, 0.03, 0.02, 0.01],
    )
    home = rng.choice(["owner", "rent", "parents", "other"], n, p=[0.4, 0.35, 0.2, 0.05])
    logit = (
        -1.2 * (np.log(income) - 7.5) / 0.5
        - 0.04 * (age - 45)
        + np.select([job == "freelance", job == "partime"], [0.8, 1.5], 0.0)
        - 1.0
    )
    defaulted = rng.random(n) < 1 / (1 + np.exp(-logit))
    df = pd.DataFrame(
        {
            "loan_id": np.arange(1, n + 1),
            "Income": income.round(2),
            "Age": age,
            "Marital": marital,
            "Home": home,
            "Job": job,
            TARGET: np.where(defaulted, "yes", "no"),
        }
    )
    for col, share in (("Income", 0.03), ("Age", 0.02), ("Home", 0.04)):
        df.loc[rng.random(n) < share, col] = None
    df.to_csv(path, index=False)
    return path


def test_init_then_train_on_your_own_table_gives_a_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `train` points Prefect's home into the config's store: keep that to this test.
    monkeypatch.setenv("PREFECT_HOME", os.environ.get("PREFECT_HOME", str(tmp_path / "prefect")))
    data = _credit_table(tmp_path / "credit book.csv")
    config = tmp_path / "mlgate.yaml"
    runner = CliRunner()

    init = runner.invoke(
        app,
        ["init", "--data", str(data), "--target", TARGET, "--positive", "yes", "-o", str(config)],
    )
    assert init.exit_code == EXIT_OK, init.output
    ds = load_config(config).dataset
    assert ds.target == TARGET and ds.id_column == "loan_id"
    assert {"Marital", "Home", "Job"} <= set(ds.categorical_features)
    assert ds.slice_columns == ("Job",)  # Marital's rare categories cannot fill a slice

    train = runner.invoke(app, ["train", "--config", str(config)])
    assert train.exit_code == EXIT_OK, train.output
    assert "challenger ACCEPTED: first model, floor passed" in train.output
    assert "@champion is now 1" in train.output

    listed = runner.invoke(app, ["models", "list", "--config", str(config), "--json"])
    assert listed.exit_code == EXIT_OK, listed.output
    versions = json.loads(listed.output)
    assert [v["version"] for v in versions] == ["1"]
    assert "champion" in versions[0]["aliases"]
