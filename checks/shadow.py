"""The shadow verdict: the champion and a shadow version judged on the same live rows.

The inference log holds, for every request the champion answered while a version shadowed
it, the champion's rows (its variant) and the shadow's (variant `shadow`), with the same
request id, in the same order. `pair_rows` joins them on (request id, row within the
request); `attach_labels` joins labels fed back for some of those rows (a table with
`request_id`, optionally `row`, and the target column). `judge_shadow` then reports what the
two did on identical inputs: agreement of decisions at the threshold, PSI between the two
score distributions, the latency of each; and, on the labelled pairs, the paired bootstrap
interval of the metric difference with the offline champion gate's own code
(`checks.champion.paired_bootstrap`, its metric, allowance and resamples): the champion gate,
on live traffic. Too few pairs or labels: INCONCLUSIVE, never a pass.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from checks.champion import paired_bootstrap
from checks.drift import psi
from checks.result import CheckRow, GateResult, GateStatus, fmt_number
from models.config import ChampionGateConfig, ShadowGateConfig
from models.registry_layout import SHADOW_VARIANT

NAME = "shadow"
PSI_BINS = 20
PAIR_COLUMNS = (
    "request_id",
    "row",
    "ts",
    "champion_score",
    "shadow_score",
    "champion_latency_ms",
    "shadow_latency_ms",
)


def pair_rows(log: pd.DataFrame, champion_version: str, shadow_version: str) -> pd.DataFrame:
    """The (champion, shadow) pairs of an inference-log window: one row per scored row that
    both scored, matched on the request id and the row's position in its request."""
    if not len(log):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PAIR_COLUMNS})
    version = log["model_version"].astype(str)
    shadow_rows = log["variant"].astype(str) == SHADOW_VARIANT
    champion = log[(version == str(champion_version)) & ~shadow_rows]
    shadow = log[(version == str(shadow_version)) & shadow_rows]

    def numbered(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[["ts", "request_id", "score", "latency_ms"]].copy()
        frame["row"] = frame.groupby("request_id").cumcount()
        return frame

    pairs = numbered(champion).merge(
        numbered(shadow), on=["request_id", "row"], suffixes=("_c", "_s"), how="inner"
    )
    return pd.DataFrame(
        {
            "request_id": pairs["request_id"],
            "row": pairs["row"],
            "ts": pairs["ts_c"],
            "champion_score": pairs["score_c"].astype(float),
            "shadow_score": pairs["score_s"].astype(float),
            "champion_latency_ms": pairs["latency_ms_c"].astype(float),
            "shadow_latency_ms": pairs["latency_ms_s"].astype(float),
        }
    ).reset_index(drop=True)


def attach_labels(pairs: pd.DataFrame, labels: pd.DataFrame, target: str) -> pd.DataFrame:
    """The pairs that a label was fed back for, with the label as `y` (0/1). ValueError
    naming what the labels lack."""
    missing = [c for c in ("request_id", target) if c not in labels.columns]
    if missing:
        raise ValueError(
            f"the labels lack column(s) {', '.join(missing)}: they need request_id (the "
            f"X-Request-Id of the prediction), optionally row (0 for a one-row request), and "
            f"{target!r}"
        )
    table = labels[["request_id", target, *(["row"] if "row" in labels.columns else [])]].copy()
    if "row" not in table.columns:
        table["row"] = 0
    table["request_id"] = table["request_id"].astype(str)
    table["row"] = table["row"].astype(int)
    joined = pairs.merge(table, on=["request_id", "row"], how="inner")
    return joined.rename(columns={target: "y"})


def judge_shadow(
    pairs: pd.DataFrame,
    labelled: pd.DataFrame | None,
    cfg: ShadowGateConfig,
    champion_cfg: ChampionGateConfig,
    *,
    champion_version: str,
    shadow_version: str,
) -> GateResult:
    """The verdict on the pairs (and the labelled ones, `y` in 0/1); see the module."""
    n = len(pairs)
    metrics: dict[str, float] = {"pairs": float(n)}
    evidence: dict[str, object] = {
        "champion_version": champion_version,
        "shadow_version": shadow_version,
    }
    rows: list[CheckRow] = []
    pair_row = CheckRow(
        "paired rows",
        GateStatus.PASS if n >= cfg.min_pairs else GateStatus.INCONCLUSIVE,
        f"{n:,}",
        f">= {cfg.min_pairs:,}",
        "" if n >= cfg.min_pairs else "too few to judge",
    )
    rows.append(pair_row)
    if n:
        c = pairs["champion_score"].to_numpy(dtype=float)
        s = pairs["shadow_score"].to_numpy(dtype=float)
        agreement = float(np.mean((c >= cfg.threshold) == (s >= cfg.threshold)))
        edges = np.linspace(0.0, 1.0, PSI_BINS + 1)
        ref = np.histogram(np.clip(c, 0, 1), bins=edges)[0].astype(float)
        cur = np.histogram(np.clip(s, 0, 1), bins=edges)[0].astype(float)
        score_psi = psi(ref / ref.sum(), cur, ref_count=ref.sum())
        c_p50, c_p99 = np.percentile(pairs["champion_latency_ms"], [50, 99])
        s_p50, s_p99 = np.percentile(pairs["shadow_latency_ms"], [50, 99])
        ratio = float(s_p99 / c_p99) if c_p99 > 0 else math.inf
        metrics.update(
            {
                "agreement": agreement,
                "score_psi": score_psi,
                "mean_abs_score_diff": float(np.mean(np.abs(s - c))),
                "champion_p50_ms": float(c_p50),
                "champion_p99_ms": float(c_p99),
                "shadow_p50_ms": float(s_p50),
                "shadow_p99_ms": float(s_p99),
                "p99_ratio": ratio,
            }
        )
        rows.append(
            CheckRow(
                f"decisions agree at {cfg.threshold:g}",
                GateStatus.PASS,
                f"{agreement:.1%}",
                "reported",
                "",
            )
        )
        rows.append(
            CheckRow(
                "score PSI, shadow vs champion",
                GateStatus.PASS,
                fmt_number(score_psi),
                "reported",
                "same inputs",
            )
        )
        latency_status = GateStatus.PASS
        if cfg.max_p99_ratio is not None and n >= cfg.min_pairs and ratio > cfg.max_p99_ratio:
            latency_status = GateStatus.FAIL
        rows.append(
            CheckRow(
                "p99 latency, shadow scoring / champion request",
                latency_status,
                fmt_number(ratio),
                "reported" if cfg.max_p99_ratio is None else f"<= {cfg.max_p99_ratio:g}",
                f"{s_p99:.2f} ms vs {c_p99:.2f} ms",
            )
        )
    labelled_n = 0 if labelled is None else len(labelled)
    metrics["labelled_pairs"] = float(labelled_n)
    metric = champion_cfg.primary_metric
    if labelled is None or labelled_n < cfg.min_labelled:
        rows.append(
            CheckRow(
                f"{metric} vs champion on live labels",
                GateStatus.INCONCLUSIVE,
                f"{labelled_n:,} labelled",
                f">= {cfg.min_labelled:,}",
                "waiting for labels",
            )
        )
    else:
        y = labelled["y"].to_numpy(dtype=int)
        ci = paired_bootstrap(
            y,
            labelled["shadow_score"].to_numpy(dtype=float),
            labelled["champion_score"].to_numpy(dtype=float),
            metric,
            champion_cfg.bootstrap_resamples,
            champion_cfg.confidence,
            champion_cfg.seed,
        )
        metrics.update({"delta": ci.delta, "ci_low": ci.low, "ci_high": ci.high})
        evidence["bootstrap"] = {
            "resamples": champion_cfg.bootstrap_resamples,
            "kept": ci.resamples_used,
            "confidence": champion_cfg.confidence,
        }
        bound = -champion_cfg.max_regression
        if not math.isfinite(ci.low):
            status, detail = GateStatus.INCONCLUSIVE, "bootstrap interval undefined"
        elif ci.low >= bound:
            status = GateStatus.PASS
            detail = "shadow better (interval above 0)" if ci.low > 0 else "no regression"
        else:
            status, detail = GateStatus.FAIL, "possible regression beyond the allowance"
        pct = round(champion_cfg.confidence * 100)
        rows.append(
            CheckRow(
                f"{metric} vs champion on live labels ({pct}% CI of difference)",
                status,
                f"{fmt_number(ci.delta)} [{fmt_number(ci.low)}, {fmt_number(ci.high)}]",
                f"low >= {fmt_number(bound)}",
                detail,
            )
        )
    statuses = [r.status for r in rows]
    if GateStatus.FAIL in statuses:
        status = GateStatus.FAIL
    elif GateStatus.INCONCLUSIVE in statuses:
        status = GateStatus.INCONCLUSIVE
    else:
        status = GateStatus.PASS
    failed = [
        f"{r.check}: {r.detail or r.value}"
        for r in rows
        if r.status is status and status is not GateStatus.PASS
    ]
    reason = {
        GateStatus.PASS: (
            f"v{shadow_version} held up against v{champion_version} on {n:,} live pairs, "
            f"{labelled_n:,} labelled"
        ),
        GateStatus.FAIL: f"v{shadow_version} failed on live traffic: {'; '.join(failed)}",
        GateStatus.INCONCLUSIVE: (
            f"not enough live evidence for v{shadow_version} yet: {'; '.join(failed)}"
        ),
    }[status]
    return GateResult(
        name=NAME,
        status=status,
        reason=reason,
        metrics=metrics,
        evidence=evidence,
        checks=tuple(rows),
    )
