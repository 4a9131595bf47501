"""The cost per 1,000 predictions: the formula on known numbers, and what it refuses."""

from __future__ import annotations

import math

import pytest

from checks.cost import cost_per_1000, cost_ratio
from models.config import ConfigError, CostConfig, config_from_dict

pytestmark = pytest.mark.fast


def test_cost_per_1000_prices_cpu_and_gpu_seconds_per_row() -> None:
    cost = CostConfig(price_per_core_hour=0.036, price_per_gpu_hour=3.6)
    # 100 CPU seconds at 0.036 an hour = 0.001; 10 GPU seconds at 3.6 = 0.01; over 2,000 rows.
    assert cost_per_1000(100.0, 10.0, 2000, cost) == pytest.approx(0.011 / 2)
    assert cost_per_1000(100.0, 0.0, 1000, cost) == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("cpu", "gpu", "rows"),
    [(1.0, 0.0, 0), (-1.0, 0.0, 10), (1.0, math.nan, 10), (math.inf, 0.0, 10)],
)
def test_cost_is_undefined_without_rows_or_with_broken_counts(
    cpu: float, gpu: float, rows: float
) -> None:
    assert math.isnan(cost_per_1000(cpu, gpu, rows, CostConfig()))


def test_cost_ratio() -> None:
    assert cost_ratio(2.0, 1.0) == 2.0
    assert math.isnan(cost_ratio(math.nan, 1.0))
    assert cost_ratio(1.0, 0.0) == math.inf
    assert cost_ratio(0.0, 0.0) == 1.0


@pytest.mark.parametrize(
    ("section", "fields", "named"),
    [
        ("cost", {"price_per_core_hour": -1.0}, "cost.price_per_core_hour"),
        ("cost", {"price_per_gpu_hour": -0.5}, "cost.price_per_gpu_hour"),
        ("cost", {"budget_per_1000": 0.0}, "cost.budget_per_1000"),
        ("canary", {"max_cost_ratio": 0.0}, "canary.max_cost_ratio"),
    ],
)
def test_config_names_the_bad_field(section: str, fields: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(
            {
                "dataset": {"path": "x.csv", "target": "y", "numeric_features": ["a"]},
                section: fields,
            }
        )


def test_defaults_judge_nothing() -> None:
    cfg = config_from_dict({"dataset": {"path": "x.csv", "target": "y", "numeric_features": ["a"]}})
    assert cfg.cost.budget_per_1000 is None and cfg.canary.max_cost_ratio is None
    assert cfg.cost.price_per_core_hour >= 0 and cfg.cost.price_per_gpu_hour >= 0
