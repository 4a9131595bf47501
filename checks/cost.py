"""Cost per 1,000 predictions: the one formula the canary's cost guardrail uses and the
Prometheus recording rule (checks/slo_rules.py) mirrors.

The service counts the CPU seconds its workers spend (`mlgate_cpu_seconds_total`, all of
each worker's threads, idle time included) and the wall seconds of the GPUs it holds times
their number (`mlgate_gpu_seconds_total`); the rows it scored are its score histogram's
count (`mlgate_score_count`). Over one window:

    cost per 1,000 = (cpu_s * price_per_core_hour + gpu_s * price_per_gpu_hour) / 3600
                     / rows * 1000

Idle CPU and held GPUs are part of the bill, so an instance that scores few rows costs more
per row than the same instance under load: compare two variants over the same window, and
read a canary's small steps with that in mind.
"""

from __future__ import annotations

import math

from models.config import CostConfig

SECONDS_PER_HOUR = 3600.0
PER = 1000.0


def cost_per_1000(cpu_s: float, gpu_s: float, rows: float, cost: CostConfig) -> float:
    """The cost of `rows` predictions scaled to 1,000, in the unit of `cost`'s prices; NaN
    when no row was scored or a count is negative or not finite (nothing to divide by, or a
    counter that reset)."""
    values = (cpu_s, gpu_s, rows)
    if rows <= 0 or any(not math.isfinite(v) or v < 0 for v in values):
        return math.nan
    spent = cpu_s * cost.price_per_core_hour + gpu_s * cost.price_per_gpu_hour
    return spent / SECONDS_PER_HOUR / rows * PER


def cost_ratio(canary: float, stable: float) -> float:
    """The canary's cost per 1,000 over the stable's: NaN when either is undefined, +inf when
    only the stable's is free."""
    if math.isnan(canary) or math.isnan(stable):
        return math.nan
    if stable <= 0:
        return math.inf if canary > 0 else 1.0
    return canary / stable
