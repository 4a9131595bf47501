"""Champion-vs-challenger gate: evidence, not a point estimate.

Both models are scored on the same holdout. The challenger must clear a floor on the
primary metric, and the lower bound of a paired bootstrap confidence interval of
(challenger - champion) must clear minus the allowed regression. Slices and guard metrics
(calibration, latency, size) add their own checks; a slice too small (or too one-sided) to
judge is reported as inconclusive with its row count and does not block. With no champion
yet, the first model is judged on the floor alone (plus any absolute bound configured:
`slice_floor`, the guards), never on a slice nobody can judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from checks.result import CheckRow, GateResult, GateStatus, fmt_number, worst_status
from models.config import ChampionGateConfig
from models.metrics import metric_value

NAME = "champion"


@dataclass(frozen=True)
class ScoredModel:
    """A model's scores on the holdout plus the guard measurements taken on it."""

    scores: np.ndarray
    version: str | None = None
    latency_us_per_row: float = math.nan
    size_bytes: int = 0


@dataclass(frozen=True)
class BootstrapInterval:
    delta: float
    low: float
    high: float
    resamples_used: int


def paired_bootstrap(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    metric: str,
    resamples: int,
    confidence: float,
    seed: int,
) -> BootstrapInterval:
    """Percentile interval of metric(a) - metric(b), resampling rows jointly for both models
    so that the noise they share cancels. Resamples where the metric is undefined (a single
    class drawn) are dropped and counted.

    ROC AUC, the default primary metric, is computed for all resamples at once from the
    rows' draw counts (`_resampled_auc`); other metrics call `metric_value` per resample.
    Both draw the same rows from the same seeded generator."""
    rng = np.random.default_rng(seed)
    n = len(y)
    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    vectorised = metric == "roc_auc" and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    if vectorised and n:
        chunk = max(1, _BOOTSTRAP_CELLS // n)
        parts = []
        for start in range(0, resamples, chunk):
            idx = rng.integers(0, n, (min(chunk, resamples - start), n))
            counts = _draw_counts(idx, n)
            parts.append(_resampled_auc(y, a, counts) - _resampled_auc(y, b, counts))
        all_deltas = np.concatenate(parts) if parts else np.empty(0)
        deltas = list(all_deltas[np.isfinite(all_deltas)])
    else:
        deltas = []
        for _ in range(resamples):
            idx = rng.integers(0, n, n)
            d = metric_value(metric, y[idx], a[idx]) - metric_value(metric, y[idx], b[idx])
            if math.isfinite(d):
                deltas.append(d)
    delta = metric_value(metric, y, a) - metric_value(metric, y, b)
    if len(deltas) < resamples // 2:
        return BootstrapInterval(delta, math.nan, math.nan, len(deltas))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(deltas), [alpha, 1.0 - alpha])
    return BootstrapInterval(delta, float(low), float(high), len(deltas))


# Resamples x rows per chunk of the vectorised bootstrap (about 40 MB of int64 counts).
_BOOTSTRAP_CELLS = 5_000_000


def _draw_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of `n` rows was drawn in each resample (a row of `idx` each)."""
    r = idx.shape[0]
    flat = (idx + (np.arange(r) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n)


def _resampled_auc(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample given as draw counts per row: the Mann-Whitney statistic
    with ties counted half, as `roc_auc_score` computes it; NaN where a class is missing.

    Written by hand because scikit-learn scores one sample per call: 1,000 resamples meant
    2,000 calls (about 3.5 s of a 5,000-row training run). Rows sharing a score are pooled
    into one group; each positive draw counts the negative draws scored below it, plus half
    of those scored the same."""
    positive = np.asarray(y) == 1
    _, group = np.unique(p, return_inverse=True)
    groups = int(group.max()) + 1
    r = counts.shape[0]
    pos = np.zeros((r, groups))
    neg = np.zeros((r, groups))
    # Sum the draw counts of each group's positive and negative rows.
    np.add.at(pos.T, group[positive], counts[:, positive].T)
    np.add.at(neg.T, group[~positive], counts[:, ~positive].T)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _floor_check(value: float, cfg: ChampionGateConfig) -> CheckRow:
    status = GateStatus.PASS if math.isfinite(value) and value >= cfg.floor else GateStatus.FAIL
    detail = "" if math.isfinite(value) else "metric is NaN (undefined on this holdout)"
    return CheckRow(
        check=f"{cfg.primary_metric} floor",
        status=status,
        value=fmt_number(value),
        bound=f">= {fmt_number(cfg.floor)}",
        detail=detail,
    )


def _regression_check(ci: BootstrapInterval, cfg: ChampionGateConfig) -> CheckRow:
    bound = -cfg.max_regression
    if not math.isfinite(ci.low):
        status, detail = GateStatus.INCONCLUSIVE, "bootstrap interval undefined"
    elif ci.low >= bound:
        status = GateStatus.PASS
        if ci.low > 0:
            detail = "challenger better (interval above 0)"
        else:
            detail = "no detectable difference" if ci.high >= 0 else "worse, within allowance"
    else:
        status, detail = GateStatus.FAIL, "possible regression beyond the allowance"
    pct = round(cfg.confidence * 100)
    return CheckRow(
        check=f"{cfg.primary_metric} vs champion ({pct}% CI of difference)",
        status=status,
        value=f"{ci.delta:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]",
        bound=f"lower >= {bound:+.4f}",
        detail=detail,
    )


@dataclass(frozen=True)
class SliceCheck:
    """One slice's row of the table, and whether it takes part in the verdict. A slice
    that cannot be judged (too few rows, or one class only: the metric is undefined) is
    reported as inconclusive with its row count, and never blocks: nobody can act on it,
    and the whole holdout, which holds its rows, is judged anyway."""

    row: CheckRow
    column: str
    value: str
    rows: int
    not_judged: str | None = None


def _slice_checks(
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    slices: pd.DataFrame,
    cfg: ChampionGateConfig,
) -> list[SliceCheck]:
    checks = []
    for col in slices.columns:
        values = slices[col].astype(str).to_numpy()
        for value in sorted(set(values)):
            mask = values == value
            n = int(mask.sum())
            name = f"slice {col}={value} (n={n})"
            chal = metric_value(cfg.primary_metric, y[mask], challenger[mask])
            if n < cfg.min_slice_rows:
                row = CheckRow(
                    name,
                    GateStatus.INCONCLUSIVE,
                    fmt_number(chal),
                    f"n >= {cfg.min_slice_rows}",
                    "slice too small to judge; reported, not blocking",
                )
                checks.append(SliceCheck(row, str(col), value, n, "too small"))
                continue
            if not math.isfinite(chal):
                row = CheckRow(
                    name,
                    GateStatus.INCONCLUSIVE,
                    "nan",
                    "defined",
                    "one class only; reported, not blocking",
                )
                checks.append(SliceCheck(row, str(col), value, n, "one class only"))
                continue
            checks.append(
                SliceCheck(
                    _judged_slice(y, challenger, champion, mask, name, chal, cfg),
                    str(col),
                    value,
                    n,
                )
            )
    return checks


def _judged_slice(
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    mask: np.ndarray,
    name: str,
    chal: float,
    cfg: ChampionGateConfig,
) -> CheckRow:
    # Within a slice the slice column itself no longer separates the classes, so a slice
    # is held to its own floor (if set) and to the champion on the same rows, never to the
    # overall floor.
    if cfg.slice_floor is not None and chal < cfg.slice_floor:
        return CheckRow(name, GateStatus.FAIL, fmt_number(chal), f">= {cfg.slice_floor}")
    if champion is None:
        bound = f">= {cfg.slice_floor}" if cfg.slice_floor is not None else "no floor"
        return CheckRow(name, GateStatus.PASS, fmt_number(chal), bound, "no champion")
    champ = metric_value(cfg.primary_metric, y[mask], champion[mask])
    delta = chal - champ
    status = GateStatus.PASS if delta >= -cfg.max_slice_regression else GateStatus.FAIL
    return CheckRow(
        name,
        status,
        f"{fmt_number(chal)} ({delta:+.4f} vs champion)",
        f"diff >= {-cfg.max_slice_regression:+.4f}",
    )


def _guard_checks(
    y: np.ndarray, challenger: ScoredModel, cfg: ChampionGateConfig
) -> tuple[list[CheckRow], dict[str, float]]:
    rows, metrics = [], {}
    guards = [
        ("brier", metric_value("neg_brier", y, challenger.scores) * -1, cfg.max_brier, ""),
        ("latency_us_per_row", challenger.latency_us_per_row, cfg.max_latency_us_per_row, "µs"),
        ("model_mb", challenger.size_bytes / 1e6, cfg.max_model_mb, "MB"),
    ]
    for name, value, bound, unit in guards:
        metrics[name] = value
        if bound is None:
            continue
        ok = math.isfinite(value) and value <= bound
        rows.append(
            CheckRow(
                f"guard {name}",
                GateStatus.PASS if ok else GateStatus.FAIL,
                f"{fmt_number(value)}{unit}",
                f"<= {fmt_number(bound)}{unit}",
            )
        )
    return rows, metrics


def compare_to_champion(
    y: np.ndarray,
    challenger: ScoredModel,
    champion: ScoredModel | None,
    cfg: ChampionGateConfig,
    *,
    holdout_hash: str,
    slices: pd.DataFrame | None = None,
    champion_error: str | None = None,
) -> GateResult:
    """`champion=None` with no `champion_error` means there is no champion yet (floor only);
    with `champion_error` the champion exists but could not be scored, which is never a pass."""
    try:
        return _compare(y, challenger, champion, cfg, holdout_hash, slices, champion_error)
    except Exception as err:  # a gate fails closed
        return GateResult(
            name=NAME,
            status=GateStatus.FAIL,
            reason=f"champion gate error: {type(err).__name__}: {err}",
            evidence={"holdout_hash": holdout_hash},
        )


def _compare(
    y: np.ndarray,
    challenger: ScoredModel,
    champion: ScoredModel | None,
    cfg: ChampionGateConfig,
    holdout_hash: str,
    slices: pd.DataFrame | None,
    champion_error: str | None,
) -> GateResult:
    y = np.asarray(y)
    evidence: dict[str, object] = {
        "holdout_hash": holdout_hash,
        "holdout_rows": len(y),
        "primary_metric": cfg.primary_metric,
        "champion_version": champion.version if champion else None,
    }
    if len(y) == 0:
        return GateResult(NAME, GateStatus.FAIL, "empty holdout: nothing to judge", {}, evidence)

    value = metric_value(cfg.primary_metric, y, challenger.scores)
    metrics: dict[str, float] = {f"challenger_{cfg.primary_metric}": value}
    rows = [_floor_check(value, cfg)]

    if champion_error is not None:
        rows.append(
            CheckRow(
                f"{cfg.primary_metric} vs champion",
                GateStatus.FAIL,
                "n/a",
                "champion scored on the same holdout",
                champion_error,
            )
        )
    elif champion is not None:
        champ_value = metric_value(cfg.primary_metric, y, champion.scores)
        metrics[f"champion_{cfg.primary_metric}"] = champ_value
        ci = paired_bootstrap(
            y,
            challenger.scores,
            champion.scores,
            cfg.primary_metric,
            cfg.bootstrap_resamples,
            cfg.confidence,
            cfg.seed,
        )
        metrics.update({"delta": ci.delta, "delta_ci_low": ci.low, "delta_ci_high": ci.high})
        evidence["bootstrap"] = {
            "resamples": cfg.bootstrap_resamples,
            "resamples_used": ci.resamples_used,
            "confidence": cfg.confidence,
            "seed": cfg.seed,
        }
        rows.append(_regression_check(ci, cfg))

    slice_checks = (
        _slice_checks(y, challenger.scores, champion.scores if champion else None, slices, cfg)
        if slices is not None and len(slices.columns)
        else []
    )
    not_judged = [s for s in slice_checks if s.not_judged is not None]
    if not_judged:
        evidence["slices_not_judged"] = [
            {"column": s.column, "value": s.value, "rows": s.rows, "why": s.not_judged}
            for s in not_judged
        ]
    guard_rows, guard_metrics = _guard_checks(y, challenger, cfg)
    metrics.update(guard_metrics)

    judged = rows + [s.row for s in slice_checks if s.not_judged is None] + guard_rows
    table = rows + [s.row for s in slice_checks] + guard_rows
    status = worst_status([r.status for r in judged])
    failed = [r for r in judged if r.status is not GateStatus.PASS]
    if champion_error is not None:
        head = f"champion exists but could not be scored ({champion_error})"
    elif champion is None:
        head = "first model: no champion yet, judged on the floor alone"
    else:
        head = f"compared with champion v{champion.version} on the same holdout"
    if failed:
        detail = "; ".join(f"{r.check}: {r.value} (needs {r.bound})" for r in failed)
        reason = f"{head}; {len(failed)} check(s) not passed: {detail}"
    else:
        reason = f"{head}; all {len(judged)} checks passed"
    if not_judged:
        listed = ", ".join(
            f"{s.row.check.removeprefix('slice ')} {s.not_judged}" for s in not_judged
        )
        reason += f"; {len(not_judged)} slice(s) reported, not judged: {listed}"
    return GateResult(NAME, status, reason, metrics, evidence, tuple(table))
