"""Drift gate: PSI per feature and for the prediction score, against the reference
histograms stored with the model version.

This is also the only module that knows Evidently's result layout: `evidently_psi` runs
Evidently's PSI on our bins as a cross-check of our numbers, `evidently_drift_report_html`
writes the report a person looks at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from checks.result import CheckRow, GateResult, GateStatus, fmt_number, worst_status
from models.config import DriftGateConfig
from models.reference import (
    SCORE_COLUMN,
    FeatureHistogram,
    Kind,
    ReferenceHistograms,
    bin_counts,
    compute_feature_histogram,
)

NAME = "drift"

# Additive smoothing with the Jeffreys prior, Dirichlet(1/2): every bucket's count gets 1/2
# before normalising. A fixed fill for empty buckets (Evidently's 1e-4) makes an empty
# bucket's term p*ln(p/eps) a function of eps, not of the data, and the same in a 200-row
# window as in a 1M-row one, although an empty bucket in 1M rows says far more; the filled
# shares also stop summing to 1. With additive smoothing an empty bucket's share is
# alpha / (n + K*alpha), which shrinks as the sample grows; both sides stay probability
# distributions, so PSI (a symmetrised KL divergence) stays >= 0 and is 0 for identical
# samples. 1/2 is the non-informative choice (the Krichevsky-Trofimov estimator); Laplace's 1
# pulls small windows harder toward uniform.
JEFFREYS_ALPHA = 0.5
SMOOTHING = (
    f"additive (Jeffreys, alpha={JEFFREYS_ALPHA}) on both sides; buckets empty on both "
    "sides dropped"
)


class Traffic(StrEnum):
    """How much of a window the gate had to judge. `NONE` and `THIN` are never a verdict on
    drift: an empty window has no PSI at all and a thin one too noisy a PSI."""

    NONE = "no_traffic"
    THIN = "too_thin"
    ENOUGH = "enough"


def classify_traffic(rows: int, cfg: DriftGateConfig) -> Traffic:
    if rows <= 0:
        return Traffic.NONE
    return Traffic.THIN if rows < cfg.min_rows else Traffic.ENOUGH


def window_traffic(result: GateResult) -> Traffic:
    """The traffic a drift result was judged on; a result without it (not made by this
    gate) is taken at its word."""
    return Traffic(result.evidence.get("traffic", Traffic.ENOUGH))


def psi(
    ref_shares: Sequence[float] | np.ndarray,
    cur_counts: Sequence[float] | np.ndarray,
    *,
    ref_count: float,
    alpha: float = JEFFREYS_ALPHA,
) -> float:
    """PSI = sum((cur - ref) * ln(cur / ref)) over buckets, both sides smoothed with
    `alpha` pseudo-counts (`ref_count` turns the reference shares back into counts).
    NaN when either side is empty; inf when `alpha=0` and a bucket is empty on one side."""
    ref = np.asarray(ref_shares, dtype=np.float64) * float(ref_count)
    cur = np.asarray(cur_counts, dtype=np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"{ref.size} reference buckets but {cur.size} current counts")
    if not (np.isfinite(ref).all() and np.isfinite(cur).all()):
        return math.nan
    if (ref < 0).any() or (cur < 0).any() or ref.sum() <= 0 or cur.sum() <= 0:
        return math.nan
    # A bucket empty on both sides carries no evidence of change; smoothing it anyway would
    # add a term that depends only on the two sample sizes.
    keep = (ref > 0) | (cur > 0)
    ref, cur = ref[keep], cur[keep]
    k = ref.size
    r = (ref + alpha) / (ref.sum() + k * alpha)
    c = (cur + alpha) / (cur.sum() + k * alpha)
    if ((r == 0) | (c == 0)).any():
        return math.inf
    return max(0.0, float(np.sum((c - r) * np.log(c / r))))


def feature_psi(hist: FeatureHistogram, values: Any) -> float:
    return psi(hist.bucket_shares(), bin_counts(hist, values), ref_count=hist.count)


def _label(column: str) -> str:
    return "prediction score" if column == SCORE_COLUMN else column


def _psi_row(
    column: str, value: float, cfg: DriftGateConfig, traffic: Traffic, small_window: str | None
) -> CheckRow:
    check, bound = f"psi {_label(column)}", f"< {fmt_number(cfg.psi_alert)}"
    shown = f"{value:.4f}" if math.isfinite(value) else str(value)
    # Without rows PSI is undefined by construction; with rows, NaN means a broken reference.
    if math.isnan(value) and traffic is not Traffic.NONE:
        return CheckRow(check, GateStatus.FAIL, shown, bound, "PSI undefined on this window")
    if small_window is not None:
        return CheckRow(check, GateStatus.INCONCLUSIVE, shown, bound, small_window)
    if value >= cfg.psi_alert:
        return CheckRow(check, GateStatus.FAIL, shown, bound, "drifted")
    if value >= cfg.psi_warn:
        warning = f"warning: at or above {fmt_number(cfg.psi_warn)}"
        return CheckRow(check, GateStatus.PASS, shown, bound, warning)
    return CheckRow(check, GateStatus.PASS, shown, bound)


def _score_values(
    reference: ReferenceHistograms, scores: np.ndarray | None, rows: int
) -> tuple[np.ndarray | None, CheckRow | None]:
    """The scores to judge, or the row that says why the score check cannot be made."""
    check, bound = f"psi {_label(SCORE_COLUMN)}", "scores for every row"
    if reference.score is None and scores is None:
        return None, None
    if rows == 0:
        # An empty window has no scores to miss or to mismatch: the score is as unjudged as
        # every feature.
        return (None if reference.score is None else np.empty(0)), None
    if reference.score is None:
        detail = "scores given but the reference has no score histogram"
        return None, CheckRow(check, GateStatus.INCONCLUSIVE, "n/a", bound, detail)
    if scores is None:
        detail = "the reference has a score histogram but no scores were given"
        return None, CheckRow(check, GateStatus.INCONCLUSIVE, "n/a", bound, detail)
    scores = np.asarray(scores)
    if scores.shape != (rows,):
        # Scores that do not pair with the rows mean the window itself is mixed up.
        detail = f"{scores.size} scores for {rows} rows"
        return None, CheckRow(check, GateStatus.FAIL, "n/a", bound, detail)
    return scores, None


def check_drift(
    df: pd.DataFrame,
    reference: ReferenceHistograms,
    cfg: DriftGateConfig,
    *,
    scores: np.ndarray | None = None,
) -> GateResult:
    try:
        return _check(df, reference, cfg, scores)
    except Exception as err:  # a gate fails closed
        rows = len(df) if isinstance(df, pd.DataFrame) else None
        traffic = Traffic.ENOUGH if rows is None else classify_traffic(rows, cfg)
        return GateResult(
            name=NAME,
            status=GateStatus.FAIL,
            reason=f"drift gate error: {type(err).__name__}: {err}",
            metrics={"rows": math.nan if rows is None else float(rows)},
            evidence={"traffic": traffic.value},
        )


def _check(
    df: pd.DataFrame,
    reference: ReferenceHistograms,
    cfg: DriftGateConfig,
    scores: np.ndarray | None,
) -> GateResult:
    n = len(df)
    traffic = classify_traffic(n, cfg)
    small_window = {
        Traffic.NONE: "no traffic: the window has no rows",
        Traffic.THIN: f"window of {n:,} rows is below the minimum of {cfg.min_rows:,}",
        Traffic.ENOUGH: None,
    }[traffic]
    bound = f"< {fmt_number(cfg.psi_alert)}"
    rows: list[CheckRow] = []
    values: dict[str, float] = {}
    broken: list[str] = []

    score_values, score_problem = _score_values(reference, scores, n)
    for column, hist in reference.histograms.items():
        check = f"psi {_label(column)}"
        if column == SCORE_COLUMN:
            if score_values is None:
                continue
            data: Any = score_values
        elif column not in df.columns:
            rows.append(CheckRow(check, GateStatus.FAIL, "n/a", bound, "column missing"))
            broken.append(f"{column} (missing)")
            continue
        else:
            data = df[column]
        try:
            value = feature_psi(hist, data)
        except Exception as err:
            detail = f"cannot bin: {type(err).__name__}: {err}"
            rows.append(CheckRow(check, GateStatus.FAIL, "n/a", bound, detail))
            broken.append(f"{column} ({detail})")
            continue
        values[column] = value
        rows.append(_psi_row(column, value, cfg, traffic, small_window))
    if score_problem is not None:
        rows.append(score_problem)

    judged = [v for v in values.values() if not math.isnan(v)]
    max_psi = max(judged) if judged and len(judged) == len(values) else math.nan
    metrics = {"rows": float(n), "max_psi": max_psi}
    metrics.update({f"psi.{c}": v for c, v in values.items()})

    if traffic is not Traffic.NONE:
        broken += [f"{c} (PSI undefined)" for c, v in values.items() if math.isnan(v)]
    ranked = sorted(((c, v) for c, v in values.items() if not math.isnan(v)), key=lambda kv: -kv[1])
    drifted = [(c, v) for c, v in ranked if v >= cfg.psi_alert]
    warned = [(c, v) for c, v in ranked if cfg.psi_warn <= v < cfg.psi_alert]
    evidence: dict[str, Any] = {
        "rows": n,
        "reference_rows": max((h.count for h in reference.histograms.values()), default=0),
        "psi_warn": cfg.psi_warn,
        "psi_alert": cfg.psi_alert,
        "min_rows": cfg.min_rows,
        "traffic": traffic.value,
        "smoothing": SMOOTHING,
        "drifted": [c for c, _ in drifted],
        "warned": [c for c, _ in warned],
    }

    status = worst_status([r.status for r in rows])
    reason = _reason(
        n, cfg, small_window, broken, drifted, warned, score_problem, ranked, len(rows)
    )
    return GateResult(NAME, status, reason, metrics, evidence, tuple(rows))


def _fmt_psi(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{_label(c)} {v:.3f}" for c, v in items)


def _reason(
    n: int,
    cfg: DriftGateConfig,
    small_window: str | None,
    broken: list[str],
    drifted: list[tuple[str, float]],
    warned: list[tuple[str, float]],
    score_problem: CheckRow | None,
    ranked: list[tuple[str, float]],
    checks: int,
) -> str:
    parts = []
    if broken:
        parts.append(f"cannot judge column(s): {', '.join(broken)}")
    if small_window is not None:
        parts.append(f"{small_window}, so PSI is not judged")
    elif drifted:
        parts.append(
            f"{len(drifted)} of {len(ranked)} drifted (PSI >= {fmt_number(cfg.psi_alert)}): "
            f"{_fmt_psi(drifted)}"
        )
    if score_problem is not None:
        parts.append(f"prediction score not judged: {score_problem.detail}")
    if not parts:
        if not ranked:
            return "no histograms in the reference: nothing to judge"
        top, value = ranked[0]
        parts.append(
            f"no drift on {n:,} rows over {checks} checks: max PSI {value:.3f} "
            f"({_label(top)}) < {fmt_number(cfg.psi_alert)}"
        )
    if warned and small_window is None:
        parts.append(f"warning (PSI >= {fmt_number(cfg.psi_warn)}): {_fmt_psi(warned)}")
    return "; ".join(parts)


def _infer_kind(s: pd.Series) -> Kind:
    numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    return "numeric" if numeric else "categorical"


def _bucket_samples(
    hist: FeatureHistogram, ref_counts: np.ndarray, cur_counts: np.ndarray, smoothing: str
) -> tuple[np.ndarray, np.ndarray]:
    """Samples of bucket labels with the given counts: PSI looks only at counts per value,
    so a sample where bucket i appears c_i times is the binned data up to row order."""
    labels = np.asarray([f"b{i:03d}" for i in range(ref_counts.size)], dtype=object)
    if smoothing == "jeffreys":
        # Counts 2c + 1 have shares (c + 1/2) / (n + K/2): exactly our smoothed shares, and
        # no bucket is empty, so Evidently's own zero fill never applies. Buckets empty on
        # both sides are left out, as psi() does.
        keep = (ref_counts > 0) | (cur_counts > 0)
        return (
            np.repeat(labels[keep], 2 * ref_counts[keep] + 1),
            np.repeat(labels[keep], 2 * cur_counts[keep] + 1),
        )
    return np.repeat(labels, ref_counts), np.repeat(labels, cur_counts)


def evidently_psi(
    reference_df: pd.DataFrame,
    current_df: pd.DataFrame,
    columns: Sequence[str],
    *,
    bins: int = 10,
    smoothing: Literal["jeffreys", "evidently"] = "jeffreys",
) -> dict[str, float]:
    """Evidently's PSI for each column, on our buckets.

    Evidently's PSI takes no bins: for a numeric column with more than 20 distinct values it
    cuts the pooled reference and current data into Sturges bins, otherwise (and for every
    categorical column) it counts the distinct values. So each column is bucketed here with
    the histogram `check_drift` would use (built from `reference_df`; nulls are a bucket)
    and handed to Evidently as a categorical column of bucket labels, which its categorical
    path counts bucket by bucket. With `smoothing="jeffreys"` the label counts are our
    smoothed counts, so the result must equal `feature_psi`; with `"evidently"` they are the
    raw counts and Evidently fills empty buckets its own way (1e-4 or min share / 1e6).
    """
    # Imported here: `import evidently` takes 12-18 s on this machine, and the gate itself,
    # which monitoring runs every hour, does not need it.
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    ref_cols: dict[str, pd.Series] = {}
    cur_cols: dict[str, pd.Series] = {}
    for column in columns:
        hist = compute_feature_histogram(
            column, reference_df[column], _infer_kind(reference_df[column]), bins
        )
        ref_counts = bin_counts(hist, reference_df[column])
        cur_counts = bin_counts(hist, current_df[column])
        ref_labels, cur_labels = _bucket_samples(hist, ref_counts, cur_counts, smoothing)
        ref_cols[column] = pd.Series(ref_labels, dtype=object)
        cur_cols[column] = pd.Series(cur_labels, dtype=object)
    # Columns differ in length; the padding is NaN, which Evidently drops column by column.
    definition = DataDefinition(categorical_columns=list(columns))
    report = Report([ValueDrift(column=c, method="psi") for c in columns])
    snapshot = report.run(
        Dataset.from_pandas(pd.DataFrame(cur_cols), data_definition=definition),
        Dataset.from_pandas(pd.DataFrame(ref_cols), data_definition=definition),
    )
    return _value_drift_scores(snapshot.dict())


def _value_drift_scores(result: dict[str, Any]) -> dict[str, float]:
    scores = {}
    for metric in result["metrics"]:
        config = metric.get("config", {})
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            scores[config["column"]] = float(metric["value"])
    return scores


def evidently_drift_report_html(
    reference_df: pd.DataFrame,
    current_df: pd.DataFrame,
    columns: Sequence[str],
    path: Path | str,
) -> Path:
    """Evidently's drift report (PSI for every column) on the raw values, for a person to
    look at the distributions. Its numeric PSI uses Evidently's own bins (Sturges over both
    samples), so it can differ from the gate's; `evidently_psi` is the like-for-like check."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    kinds = {c: _infer_kind(reference_df[c]) for c in columns}
    definition = DataDefinition(
        numerical_columns=[c for c in columns if kinds[c] == "numeric"],
        categorical_columns=[c for c in columns if kinds[c] == "categorical"],
    )
    report = Report([DataDriftPreset(columns=list(columns), method="psi")])
    snapshot = report.run(
        Dataset.from_pandas(current_df[list(columns)], data_definition=definition),
        Dataset.from_pandas(reference_df[list(columns)], data_definition=definition),
    )
    path = Path(path)
    # Snapshot.save_html writes only when given a str; a Path is silently ignored.
    snapshot.save_html(str(path))
    if not path.is_file():
        raise RuntimeError(f"Evidently wrote no report to {path}")
    return path
