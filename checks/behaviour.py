"""Behaviour gate: model tests on the holdout (invariance, directional expectations, slice gaps).

Every check perturbs or slices the holdout and scores it through `predict`, the function that
scores what will be served, so the gate judges the served model and not a stand-in:

- **invariance**: a column that must not matter is changed (each of its `values` set on every
  row, or shuffled across rows); no row's score may move by more than `epsilon`.
- **directional**: `delta` is added to a numeric column of every row; a score may move the
  other way than `direction` by at most `tolerance`.
- **slice gap**: the largest gap in recall or false-positive rate between the slices of a
  column (slices with at least `min_rows` rows of the metric's denominator) may widen against
  the champion's gap, measured on the champion's scores of the same holdout, by at most
  `max_widening`. With no champion yet the gap is held to `max_gap` alone when one is set, and
  otherwise reported and not judged, said in the check's detail. A champion that exists but
  could not be scored fails the check: a missing baseline is never a pass.

The gate fails closed: a missing column, a check that raises, or scores that are not finite
fail that check, with the reason. The rows that broke an expectation go to the evidence
(`failing_rows`, the first `max_failing_rows` of each check, with counts). No check declared:
the gate passes and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from checks.result import CheckRow, GateResult, GateStatus, fmt_number, worst_status
from models.config import BehaviourGateConfig

NAME = "behaviour"

Predict = Callable[[pd.DataFrame], np.ndarray]


@dataclass
class _Outcome:
    """What one check adds to the gate: its table row, numbers and broken rows."""

    row: CheckRow
    metrics: dict[str, float] = field(default_factory=dict)
    failing_rows: list[dict[str, Any]] = field(default_factory=list)
    failing_count: int = 0
    slices: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Context:
    predict: Predict
    holdout: pd.DataFrame
    y: np.ndarray
    base: np.ndarray
    ids: np.ndarray
    cfg: BehaviourGateConfig
    champion_scores: np.ndarray | None
    champion_version: str | None
    champion_error: str | None


def check_behaviour(
    predict: Predict,
    holdout: pd.DataFrame,
    y: np.ndarray,
    cfg: BehaviourGateConfig,
    *,
    champion_scores: np.ndarray | None = None,
    champion_version: str | None = None,
    champion_error: str | None = None,
    id_column: str | None = None,
) -> GateResult:
    """Run every declared check on `holdout` (labels `y`) scored by `predict`.

    `champion_scores` are the champion's scores of the same holdout rows, for the slice-gap
    comparison; None with no `champion_error` means there is no champion yet."""
    checks = len(cfg.invariance) + len(cfg.directional) + len(cfg.slice_gap)
    if checks == 0:
        row = CheckRow(
            "behavioural checks declared",
            GateStatus.PASS,
            "0",
            "gates.behaviour",
            "nothing to judge",
        )
        reason = "no behavioural checks declared (gates.behaviour is empty)"
        return GateResult(NAME, GateStatus.PASS, reason, {"checks": 0.0}, {}, (row,))
    try:
        return _check(
            predict,
            holdout,
            y,
            cfg,
            champion_scores,
            champion_version,
            champion_error,
            id_column,
        )
    except Exception as err:  # a gate fails closed
        return GateResult(
            NAME,
            GateStatus.FAIL,
            f"behaviour gate error: {type(err).__name__}: {err}",
            {"checks": float(checks)},
        )


def _check(
    predict: Predict,
    holdout: pd.DataFrame,
    y: np.ndarray,
    cfg: BehaviourGateConfig,
    champion_scores: np.ndarray | None,
    champion_version: str | None,
    champion_error: str | None,
    id_column: str | None,
) -> GateResult:
    n = len(holdout)
    evidence: dict[str, Any] = {
        "holdout_rows": n,
        "threshold": cfg.threshold,
        "champion_version": champion_version,
    }
    if n == 0:
        return GateResult(NAME, GateStatus.FAIL, "empty holdout: nothing to judge", {}, evidence)
    base = np.asarray(predict(holdout), dtype=np.float64)
    if base.shape != (n,) or not np.isfinite(base).all():
        reason = f"the model's holdout scores are unusable: shape {base.shape}, " + (
            f"{int((~np.isfinite(base)).sum())} not finite" if base.size else "empty"
        )
        return GateResult(NAME, GateStatus.FAIL, reason, {}, evidence)
    has_ids = id_column is not None and id_column in holdout.columns
    ids = holdout[id_column].to_numpy() if has_ids else np.arange(n)
    ctx = _Context(
        predict,
        holdout,
        np.asarray(y),
        base,
        ids,
        cfg,
        None if champion_scores is None else np.asarray(champion_scores, dtype=np.float64),
        champion_version,
        champion_error,
    )
    runs: list[tuple[str, str, Callable[[], _Outcome]]] = []
    for inv in cfg.invariance:
        runs.append(("invariance", inv.column, partial(_invariance, ctx, inv)))
    for d in cfg.directional:
        runs.append(("directional", d.column, partial(_directional, ctx, d)))
    for s in cfg.slice_gap:
        runs.append((f"slice_gap.{s.metric}", s.column, partial(_slice_gap, ctx, s)))

    rows: list[CheckRow] = []
    metrics: dict[str, float] = {"checks": float(len(runs))}
    checks_evidence: list[dict[str, Any]] = []
    failing_rows: list[dict[str, Any]] = []
    for kind, column, run in runs:
        outcome = _guarded(kind, column, run)
        rows.append(outcome.row)
        key = _unique_key(f"{kind}.{column}", metrics)
        metrics.update({f"{key}.{k}": v for k, v in outcome.metrics.items()})
        failing_rows += [{"check": outcome.row.check, **r} for r in outcome.failing_rows]
        checks_evidence.append(
            {
                "check": outcome.row.check,
                "kind": kind.split(".")[0],
                "column": column,
                "status": outcome.row.status.value,
                "failing_rows": outcome.failing_count,
                **({"slices": outcome.slices} if outcome.slices else {}),
            }
        )
    evidence.update(
        {
            "id_column": id_column if has_ids else None,
            "checks": checks_evidence,
            "failing_rows": failing_rows,
            "failing_rows_cap": cfg.max_failing_rows,
        }
    )
    status = worst_status([r.status for r in rows])
    broken = [r for r in rows if r.status is not GateStatus.PASS]
    if broken:
        detail = "; ".join(
            f"{r.check}: {r.value} (needs {r.bound})" + (f", {r.detail}" if r.detail else "")
            for r in broken
        )
        reason = f"{len(broken)} of {len(rows)} behavioural check(s) not passed: {detail}"
    else:
        reason = f"all {len(rows)} behavioural checks held on {n} holdout rows"
    return GateResult(NAME, status, reason, metrics, evidence, tuple(rows))


def _guarded(kind: str, column: str, run: Callable[[], _Outcome]) -> _Outcome:
    """One check that raises fails alone, with the error; the others still run."""
    try:
        return run()
    except Exception as err:
        name = f"{kind.replace('.', ' ')} {column}"
        return _Outcome(
            CheckRow(name, GateStatus.FAIL, "n/a", "check runs", f"{type(err).__name__}: {err}")
        )


def _unique_key(key: str, metrics: dict[str, float]) -> str:
    taken = {k.rsplit(".", 1)[0] for k in metrics}
    if key not in taken:
        return key
    n = 2
    while f"{key}.{n}" in taken:
        n += 1
    return f"{key}.{n}"


def _missing(name: str, column: str, bound: str) -> _Outcome:
    return _Outcome(
        CheckRow(name, GateStatus.FAIL, "n/a", bound, f"column {column!r} not in the holdout")
    )


def _json_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _broken_rows(
    ctx: _Context,
    bad: np.ndarray,
    column: str,
    before: np.ndarray,
    after: np.ndarray,
    scores: np.ndarray,
) -> list[dict[str, Any]]:
    """The first broken rows as the evidence shows them: which row, the change, the scores."""
    out = []
    for i in np.flatnonzero(bad)[: ctx.cfg.max_failing_rows]:
        out.append(
            {
                "row": _json_value(ctx.ids[i]),
                "column": column,
                "from": _json_value(before[i]),
                "to": _json_value(after[i]),
                "score": round(float(ctx.base[i]), 6),
                "perturbed_score": _json_value(round(float(scores[i]), 6)),
                "change": _json_value(round(float(scores[i] - ctx.base[i]), 6)),
            }
        )
    return out


def _invariance(ctx: _Context, inv: BehaviourGateConfig.Invariance) -> _Outcome:
    how = "shuffled" if inv.perturbation == "shuffle" else f"set to {list(inv.values)}"
    name = f"invariance {inv.column} ({how})"
    bound = f"max |Δscore| <= {fmt_number(inv.epsilon)}"
    if inv.column not in ctx.holdout.columns:
        return _missing(name, inv.column, bound)
    original = ctx.holdout[inv.column].to_numpy()
    if inv.perturbation == "shuffle":
        order = np.random.default_rng(ctx.cfg.seed).permutation(len(original))
        variants = [original[order]]
    else:
        variants = [np.full(len(original), v, dtype=object) for v in inv.values]
    worst, broken, tried = 0.0, 0, 0
    failing: list[dict[str, Any]] = []
    for changed in variants:
        scores = np.asarray(
            ctx.predict(ctx.holdout.assign(**{inv.column: changed})), dtype=np.float64
        )
        moved = np.abs(scores - ctx.base)
        bad = ~(moved <= inv.epsilon)  # NaN is broken
        worst = max(worst, float(np.nanmax(moved)) if np.isfinite(moved).any() else math.inf)
        if (~np.isfinite(moved)).any():
            worst = math.inf
        broken += int(bad.sum())
        tried += len(moved)
        room = ctx.cfg.max_failing_rows - len(failing)
        if room > 0:
            failing += _broken_rows(ctx, bad, inv.column, original, changed, scores)[:room]
    status = GateStatus.PASS if broken == 0 else GateStatus.FAIL
    detail = f"{broken} of {tried} perturbed rows moved more" if broken else ""
    return _Outcome(
        CheckRow(name, status, f"max |Δscore| {fmt_number(worst)}", bound, detail),
        {"max_abs_change": worst, "rows_broken": float(broken), "rows": float(tried)},
        failing,
        broken,
    )


def _directional(ctx: _Context, d: BehaviourGateConfig.Directional) -> _Outcome:
    down = d.direction == "non_increasing"
    name = f"directional {d.column} {d.delta:+g} → score {d.direction.replace('_', '-')}"
    bound = f"Δscore {'<=' if down else '>='} {'+' if down else '-'}{fmt_number(d.tolerance)}"
    if d.column not in ctx.holdout.columns:
        return _missing(name, d.column, bound)
    original = pd.to_numeric(ctx.holdout[d.column], errors="raise").to_numpy(dtype=np.float64)
    changed = original + d.delta
    scores = np.asarray(ctx.predict(ctx.holdout.assign(**{d.column: changed})), dtype=np.float64)
    change = scores - ctx.base
    # The move the wrong way: up for non-increasing, down for non-decreasing.
    wrong = change if down else -change
    bad = ~(wrong <= d.tolerance)  # NaN is broken
    broken = int(bad.sum())
    worst = float(np.nanmax(wrong)) if np.isfinite(wrong).any() else math.inf
    if (~np.isfinite(wrong)).any():
        worst = math.inf
    status = GateStatus.PASS if broken == 0 else GateStatus.FAIL
    value = (
        f"{broken} of {len(change)} rows broke it (worst wrong move {fmt_number(max(worst, 0.0))})"
    )
    return _Outcome(
        CheckRow(name, status, value, bound, f"mean Δscore {float(np.nanmean(change)):+.4f}"),
        {
            "rows_broken": float(broken),
            "rows": float(len(change)),
            "max_wrong_move": worst,
            "mean_change": float(np.nanmean(change)),
        },
        _broken_rows(ctx, bad, d.column, original, changed, scores),
        broken,
    )


def slice_rates(
    y: np.ndarray,
    scores: np.ndarray,
    slices: np.ndarray,
    metric: str,
    threshold: float,
) -> dict[str, tuple[int, float]]:
    """Per slice value: (rows of the metric's denominator, recall or false-positive rate)."""
    predicted = scores >= threshold
    wanted = y == 1 if metric == "recall" else y == 0
    out = {}
    for value in sorted(set(slices.tolist())):
        mask = (slices == value) & wanted
        denom = int(mask.sum())
        out[value] = (denom, float(predicted[mask].mean()) if denom else math.nan)
    return out


def _gap(rates: dict[str, float]) -> tuple[float, str, str]:
    """The largest gap between two slices' rates, and those two slices (highest, lowest)."""
    ranked = sorted(rates, key=lambda k: rates[k])
    low, high = ranked[0], ranked[-1]
    return rates[high] - rates[low], high, low


def _slice_gap(ctx: _Context, s: BehaviourGateConfig.SliceGap) -> _Outcome:
    name = f"slice gap {s.metric} by {s.column}"
    bounds = [f"widening <= {fmt_number(s.max_widening)}"]
    if s.max_gap is not None:
        bounds.insert(0, f"gap <= {fmt_number(s.max_gap)}")
    bound = ", ".join(bounds)
    if s.column not in ctx.holdout.columns:
        return _missing(name, s.column, bound)
    values = ctx.holdout[s.column].astype(str).to_numpy()
    rates = slice_rates(ctx.y, ctx.base, values, s.metric, ctx.cfg.threshold)
    champ_rates = (
        slice_rates(ctx.y, ctx.champion_scores, values, s.metric, ctx.cfg.threshold)
        if ctx.champion_scores is not None
        else {}
    )
    judged = {v: r for v, (denom, r) in rates.items() if denom >= s.min_rows}
    denominator = "positives" if s.metric == "recall" else "negatives"
    slices = [
        {
            "slice": v,
            denominator: denom,
            "challenger": _json_value(r),
            "champion": _json_value(champ_rates[v][1]) if v in champ_rates else None,
            "judged": v in judged,
        }
        for v, (denom, r) in rates.items()
    ]
    if len(judged) < 2:
        detail = f"{len(judged)} slice(s) with >= {s.min_rows} {denominator}: no gap to judge"
        row = CheckRow(name, GateStatus.INCONCLUSIVE, "n/a", bound, detail)
        return _Outcome(row, {"slices_judged": float(len(judged))}, slices=slices)
    gap, high, low = _gap(judged)
    value = f"gap {gap:.4f} ({high} {judged[high]:.3f} vs {low} {judged[low]:.3f})"
    metrics = {"gap": gap, "slices_judged": float(len(judged))}
    failures = []
    if s.max_gap is not None and not gap <= s.max_gap:
        failures.append(f"gap {gap:.4f} > {fmt_number(s.max_gap)}")
    if ctx.champion_error is not None:
        failures.append(f"champion exists but could not be scored ({ctx.champion_error})")
        detail = ""
    elif ctx.champion_scores is None:
        detail = (
            "no champion: judged on max_gap alone"
            if s.max_gap is not None
            else "no champion: gap reported, not judged"
        )
    else:
        champ_gap, _, _ = _gap({v: champ_rates[v][1] for v in judged})
        widening = gap - champ_gap
        metrics.update({"champion_gap": champ_gap, "widening": widening})
        value += f", {widening:+.4f} vs champion v{ctx.champion_version}"
        detail = f"champion gap {champ_gap:.4f}"
        if not widening <= s.max_widening:
            failures.append(f"widened by {widening:.4f} > {fmt_number(s.max_widening)}")
    status = GateStatus.FAIL if failures else GateStatus.PASS
    detail = "; ".join([*failures, detail] if detail else failures)
    return _Outcome(CheckRow(name, status, value, bound, detail), metrics, slices=slices)
