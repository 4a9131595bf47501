"""Canary guardrails: one step of a canary rollout, canary against stable over the same
window of live traffic.

The controller (`services/canary.py`, reading through `services/canary_windows.py`) turns
HAProxy's per-server counters and each instance's `/metrics` histograms into one
`VariantWindow` per side: the increase of every counter between two reads. This module only
judges those numbers; it knows neither HAProxy nor Prometheus. Each step analysed to a pass
is kept as a `CanaryStep`; `analysis_gaps` says what a rollout still lacks before it may be
promoted, and `summarize_steps` folds its steps into the one result the promotion carries.

Guardrails, in the order a failure is reported:

1. metrics: both windows readable. A side whose numbers could not be read (endpoint
   unreachable, counters that went backwards because an instance restarted, an instance
   serving another version) is a failure, never a pass.
2. invalid_outputs: scores the canary returned that are not probabilities (NaN, or outside
   [0, 1]), counted from its score histogram.
3. error_rate: the canary's share of failed requests (4xx, 5xx, connection and response
   errors, as HAProxy saw them) minus the stable's. Both sides get the same clients at the
   same time, so what clients cause cancels out and what is left is the canary's doing.
4. latency_p99: the ratio of the two p99 latencies, each interpolated from histogram
   buckets. It fails only when the canary's p99 is both `max_p99_ratio` times the stable's
   and `min_p99_delta_ms` slower: below that slack a ratio measures scheduler noise. In a
   window of fewer than 300 requests the quantile is 1 - 3/n rather than 0.99
   (`LATENCY_OUTLIERS`), the same on both sides.
5. score_psi: PSI between the two score distributions (see `score_psi`). A PSI above the
   bound fails only when it is also above what sampling noise gives two samples of one
   distribution once in a thousand windows (`psi_noise_bound`); in between, the step waits
   for more traffic.
6. cost_ratio: the canary's cost per 1,000 predictions over the stable's (`checks/cost.py`,
   from each instance's CPU and GPU seconds and rows scored, priced by `cost:`). Always
   reported; judged only when `max_cost_ratio` is set, once both sides have scored
   `min_requests` rows: a model that doubles the bill is a bad deploy. Idle CPU counts, so
   at a small step the canary's ratio reads high; an instance that exports no CPU seconds
   fails the judged check (fail closed).
7. min_requests: each side needs `min_requests` requests in the window. Below that nothing
   passes (inconclusive), so a step never passes on too little data. Failures need no
   minimum when the evidence is already there: an invalid output, unreadable metrics, an
   error count or a score shift that chance would give less than once in a thousand
   windows (`SIGNIFICANCE`). Latency is judged only at `min_requests`: a p99 of a few
   dozen requests is their maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from checks.cost import cost_per_1000, cost_ratio
from checks.drift import SMOOTHING, psi
from checks.result import CheckRow, GateResult, GateStatus, fmt_number, worst_status
from models.config import CanaryConfig, CostConfig

NAME = "canary"
GUARDRAILS = (
    "metrics",
    "invalid_outputs",
    "error_rate",
    "latency_p99",
    "score_psi",
    "cost_ratio",
    "min_requests",
)
# Below this many expected canary observations per merged bucket, PSI measures sampling
# noise: its expected value for two samples of one distribution is about
# (K - 1) * (1/n_canary + 1/n_stable) for K buckets.
_MIN_PER_PSI_BUCKET = 10
# The latency quantile compared is the p99 when the window holds enough requests, else the
# highest quantile that leaves this many requests above it: a p99 of 30 requests is their
# maximum, and one stall would decide it.
LATENCY_OUTLIERS = 3
# Before `min_requests`, a rate or distribution check may already fail, but only on
# evidence that chance would produce less than once in a thousand windows.
SIGNIFICANCE = 0.001
_Z_SIGNIFICANCE = 3.090232  # one-sided standard normal quantile of 1 - SIGNIFICANCE


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in logs (n may be large)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg = math.lgamma
    terms = [
        lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def chi2_quantile(df: int, z: float = _Z_SIGNIFICANCE) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z."""
    k = max(1, df)
    return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def psi_noise_bound(bins: int, n_canary: float, n_stable: float) -> float:
    """The PSI that two samples of one distribution exceed once in a thousand: PSI is a
    Jeffreys divergence, about chi-square(bins - 1) * (1/n_canary + 1/n_stable) under the
    null. A PSI above the bound but below this is sampling noise, not a shift."""
    if n_canary <= 0 or n_stable <= 0:
        return math.inf
    return chi2_quantile(bins - 1) * (1.0 / n_canary + 1.0 / n_stable)


@dataclass(frozen=True)
class Histogram:
    """Observations per bucket (not cumulative) with each bucket's upper bound; the last
    bound is +inf. `total` is the sum of the observations (NaN once any NaN was observed)."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.counts) or not self.bounds:
            raise ValueError(f"{len(self.bounds)} bounds for {len(self.counts)} counts")
        if list(self.bounds) != sorted(self.bounds) or self.bounds[-1] != math.inf:
            raise ValueError(f"bucket bounds must ascend to +inf, got {self.bounds}")

    @classmethod
    def from_cumulative(
        cls, buckets: Sequence[tuple[float, float]], total: float = 0.0
    ) -> Histogram:
        """From Prometheus `le` buckets: (upper bound, cumulative count) pairs."""
        ordered = sorted((float(b), float(c)) for b, c in buckets)
        bounds = tuple(b for b, _ in ordered)
        cumulative = [c for _, c in ordered]
        counts = tuple(c - p for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True))
        if any(c < 0 for c in counts):
            raise ValueError(f"cumulative bucket counts decrease: {cumulative}")
        return cls(bounds, counts, float(total))

    @property
    def count(self) -> float:
        return float(sum(self.counts))

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made since `earlier`; a count that went down means the process
        behind the histogram restarted, and the difference would be meaningless."""
        if earlier.bounds != self.bounds:
            raise ValueError("histogram buckets changed between reads")
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        if any(c < 0 for c in counts):
            raise ValueError("histogram counts went down between reads (counter reset)")
        return Histogram(self.bounds, counts, self.total - earlier.total)

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding rank q*n, as Prometheus'
        `histogram_quantile`; +inf when that rank lies beyond the last finite bound, NaN
        for an empty histogram."""
        n = self.count
        if n <= 0:
            return math.nan
        rank = q * n
        lower, seen = 0.0, 0.0
        for bound, c in zip(self.bounds, self.counts, strict=True):
            if c > 0 and seen + c >= rank:
                if math.isinf(bound):
                    return math.inf
                return lower + (bound - lower) * max(0.0, rank - seen) / c
            seen += c
            lower = bound
        return lower

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": [b if math.isfinite(b) else "+Inf" for b in self.bounds],
            "counts": list(self.counts),
            "total": self.total if math.isfinite(self.total) else str(self.total),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        return cls(
            tuple(float(b) if b != "+Inf" else math.inf for b in d["bounds"]),
            tuple(float(c) for c in d["counts"]),
            float(d.get("total", 0.0)),
        )


@dataclass(frozen=True)
class VariantWindow:
    """What one side (stable or canary) did during one window.

    `requests`, `server_errors`, `client_errors`, `connection_errors` and `response_errors`
    come from HAProxy (what clients saw); `latency` (seconds) and `scores` from the
    instance's `/metrics`, and so do `cpu_seconds` and `gpu_seconds` (None: the instance
    exports no such counter). `problem` says why the window cannot be trusted."""

    variant: str
    version: str | None
    seconds: float
    requests: int = 0
    server_errors: int = 0
    client_errors: int = 0
    connection_errors: int = 0
    response_errors: int = 0
    latency: Histogram | None = None
    scores: Histogram | None = None
    problem: str | None = None
    cpu_seconds: float | None = None
    gpu_seconds: float | None = None

    @property
    def rows(self) -> float:
        """Rows scored: one score observed per row."""
        return self.scores.count if self.scores is not None else 0.0

    def cost_per_1000(self, cost: CostConfig) -> float:
        """NaN when the instance exports no CPU seconds or scored no row."""
        if self.cpu_seconds is None:
            return math.nan
        return cost_per_1000(self.cpu_seconds, self.gpu_seconds or 0.0, self.rows, cost)

    @property
    def errors(self) -> int:
        return (
            self.server_errors + self.client_errors + self.connection_errors + self.response_errors
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "version": self.version,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "server_errors": self.server_errors,
            "client_errors": self.client_errors,
            "connection_errors": self.connection_errors,
            "response_errors": self.response_errors,
            "latency": self.latency.to_dict() if self.latency else None,
            "scores": self.scores.to_dict() if self.scores else None,
            "problem": self.problem,
            "cpu_seconds": self.cpu_seconds,
            "gpu_seconds": self.gpu_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantWindow:
        return cls(
            variant=d["variant"],
            version=d.get("version"),
            seconds=float(d.get("seconds", 0.0)),
            requests=int(d.get("requests", 0)),
            server_errors=int(d.get("server_errors", 0)),
            client_errors=int(d.get("client_errors", 0)),
            connection_errors=int(d.get("connection_errors", 0)),
            response_errors=int(d.get("response_errors", 0)),
            latency=Histogram.from_dict(d["latency"]) if d.get("latency") else None,
            scores=Histogram.from_dict(d["scores"]) if d.get("scores") else None,
            problem=d.get("problem"),
            cpu_seconds=_optional_float(d.get("cpu_seconds")),
            gpu_seconds=_optional_float(d.get("gpu_seconds")),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def invalid_scores(scores: Histogram | None) -> int:
    """Scores above 1 land beyond the last finite bound (1.0), and so does NaN (the service
    puts it in the +Inf bucket); scores below 0 are counted when the first bound is below 0
    (the service's first bucket is `le=-1e-09`, so a score of exactly 0 stays valid). A NaN
    sum, where a histogram exports one, counts once more."""
    if scores is None:
        return 0
    over = 0.0
    for bound, c in zip(scores.bounds, scores.counts, strict=True):
        if bound > 1.0:
            over += c
    below = scores.counts[0] if scores.bounds[0] < 0.0 else 0.0
    nan = 1 if math.isnan(scores.total) else 0
    return int(over + below) + nan


def merged_buckets(reference: np.ndarray, target_buckets: int) -> list[list[int]]:
    """Adjacent buckets merged into at most `target_buckets` groups of about equal reference
    mass (quantile bins of the stable distribution, as the drift gate bins features by
    quantiles of their reference). A bucket joins the group its reference mid-mass falls
    in, so one bucket holding most of the mass cannot swallow the others."""
    total = float(reference.sum())
    if total <= 0 or target_buckets < 2:
        return [list(range(reference.size))]
    groups: list[list[int]] = []
    last_key = -1
    before = 0.0
    for i, c in enumerate(reference.tolist()):
        key = min(target_buckets - 1, int(target_buckets * (before + c / 2.0) / total))
        if key != last_key:
            groups.append([])
            last_key = key
        groups[-1].append(i)
        before += c
    return groups


def score_psi(stable: Histogram, canary: Histogram, max_buckets: int) -> tuple[float, int]:
    """PSI of the canary's scores against the stable's, both from the services' score
    histograms, with `checks.drift.psi` (Jeffreys smoothing, buckets empty on both sides
    dropped). The fixed buckets are first merged into quantile bins of the stable's
    distribution, as many as `max_buckets` and the canary's sample allow (at least
    `_MIN_PER_PSI_BUCKET` canary observations per bin on average), so that a small window
    does not read as drift. Returns (PSI, bins used)."""
    if stable.bounds != canary.bounds:
        raise ValueError("stable and canary score histograms have different buckets")
    ref = np.asarray(stable.counts, dtype=np.float64)
    cur = np.asarray(canary.counts, dtype=np.float64)
    target = max(2, min(max_buckets, int(cur.sum() // _MIN_PER_PSI_BUCKET)))
    groups = merged_buckets(ref, target)
    ref_m = np.array([ref[g].sum() for g in groups])
    cur_m = np.array([cur[g].sum() for g in groups])
    total = float(ref_m.sum())
    if total <= 0:
        return math.nan, len(groups)
    return psi(ref_m / total, cur_m, ref_count=total), len(groups)


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "> last bucket"
    return f"{seconds * 1000:.2f} ms"


def check_canary_step(
    stable: VariantWindow,
    canary: VariantWindow,
    cfg: CanaryConfig,
    *,
    step_percent: int,
    cost: CostConfig | None = None,
) -> GateResult:
    """Judge one window of one step, pricing each side's cost with `cost` (None: the default
    prices; without GPUs the ratio does not depend on them). Never raises: an error inside is
    a failure."""
    try:
        return _check(stable, canary, cfg, step_percent, cost or CostConfig())
    except Exception as err:  # a gate fails closed
        return GateResult(
            name=NAME,
            status=GateStatus.FAIL,
            reason=f"canary gate error: {type(err).__name__}: {err}",
            metrics={"step_percent": float(step_percent)},
            evidence={"failed_guardrail": "metrics", "step_percent": step_percent},
        )


def _check(
    stable: VariantWindow,
    canary: VariantWindow,
    cfg: CanaryConfig,
    step_percent: int,
    cost: CostConfig,
) -> GateResult:
    evidence: dict[str, Any] = {
        "step_percent": step_percent,
        "stable": stable.to_dict(),
        "canary": canary.to_dict(),
        "bounds": {
            "max_error_rate_delta": cfg.max_error_rate_delta,
            "max_p99_ratio": cfg.max_p99_ratio,
            "min_p99_delta_ms": cfg.min_p99_delta_ms,
            "max_score_psi": cfg.max_score_psi,
            "max_invalid_outputs": cfg.max_invalid_outputs,
            "min_requests": cfg.min_requests,
            "max_cost_ratio": cfg.max_cost_ratio,
            "price_per_core_hour": cost.price_per_core_hour,
            "price_per_gpu_hour": cost.price_per_gpu_hour,
        },
        "psi_smoothing": SMOOTHING,
    }
    metrics: dict[str, float] = {
        "step_percent": float(step_percent),
        "stable_requests": float(stable.requests),
        "canary_requests": float(canary.requests),
    }
    rows: dict[str, CheckRow] = {}

    broken = [f"{w.variant}: {w.problem}" for w in (stable, canary) if w.problem]
    rows["metrics"] = CheckRow(
        "metrics readable (both sides)",
        GateStatus.FAIL if broken else GateStatus.PASS,
        "unreadable" if broken else "yes",
        "both readable",
        "; ".join(broken),
    )
    if broken:
        return _result(rows, metrics, evidence, canary, stable, "")

    enough = stable.requests >= cfg.min_requests and canary.requests >= cfg.min_requests
    few = (
        ""
        if enough
        else (
            f"not judged: stable {stable.requests:,} and canary {canary.requests:,} requests, "
            f"each needs {cfg.min_requests:,}"
        )
    )
    rows["min_requests"] = CheckRow(
        "requests per side",
        GateStatus.PASS if enough else GateStatus.INCONCLUSIVE,
        f"stable {stable.requests:,}, canary {canary.requests:,}",
        f">= {cfg.min_requests:,} each",
        "" if enough else "too little traffic in this window",
    )

    invalid = invalid_scores(canary.scores)
    metrics["invalid_outputs"] = float(invalid)
    rows["invalid_outputs"] = CheckRow(
        "canary invalid outputs (NaN, outside [0, 1])",
        GateStatus.PASS if invalid <= cfg.max_invalid_outputs else GateStatus.FAIL,
        f"{invalid:,}",
        f"<= {cfg.max_invalid_outputs:,}",
        "" if canary.scores is not None else "the canary exports no score histogram",
    )

    c_rate, s_rate = canary.error_rate, stable.error_rate
    delta = c_rate - s_rate
    metrics.update(
        {"canary_error_rate": c_rate, "stable_error_rate": s_rate, "error_rate_delta": delta}
    )
    rate_value = (
        f"{delta:+.4f} ({canary.errors:,}/{canary.requests:,} vs "
        f"{stable.errors:,}/{stable.requests:,})"
    )
    rate_detail = few
    if not enough:
        # The chance of this many canary errors if its true rate were the stable's plus
        # the allowance (the stable's rate counts as 0 when it has no requests yet).
        allowed = min(1.0, (0.0 if math.isnan(s_rate) else s_rate) + cfg.max_error_rate_delta)
        chance = binomial_tail(canary.errors, canary.requests, allowed)
        metrics["error_rate_p_value"] = chance
        if canary.requests > 0 and chance < SIGNIFICANCE:
            rate_status = GateStatus.FAIL
            rate_detail = f"significant before min_requests (p = {chance:.2g})"
        else:
            rate_status = GateStatus.INCONCLUSIVE
    elif math.isfinite(delta) and delta <= cfg.max_error_rate_delta:
        rate_status = GateStatus.PASS
    else:
        rate_status = GateStatus.FAIL
    rows["error_rate"] = CheckRow(
        "error rate, canary - stable",
        rate_status,
        rate_value,
        f"<= {cfg.max_error_rate_delta:+.4f}",
        rate_detail,
    )

    rows["latency_p99"] = _latency_row(stable, canary, cfg, enough, few, metrics)
    rows["score_psi"] = _psi_row(stable, canary, cfg, enough, few, metrics, evidence)
    rows["cost_ratio"] = _cost_row(stable, canary, cfg, cost, enough, few, metrics)
    return _result(rows, metrics, evidence, canary, stable, few)


def _latency_row(
    stable: VariantWindow,
    canary: VariantWindow,
    cfg: CanaryConfig,
    enough: bool,
    few: str,
    metrics: dict[str, float],
) -> CheckRow:
    check = "p99 latency, canary / stable"
    bound = f"<= {cfg.max_p99_ratio:g}x or <= +{cfg.min_p99_delta_ms:g} ms"
    if stable.latency is None or canary.latency is None:
        side = "stable" if stable.latency is None else "canary"
        return CheckRow(check, GateStatus.FAIL, "n/a", bound, f"{side} has no latency histogram")
    fewest = min(stable.latency.count, canary.latency.count)
    q = min(0.99, 1.0 - LATENCY_OUTLIERS / fewest) if fewest > 0 else 0.99
    s99, c99 = stable.latency.quantile(q), canary.latency.quantile(q)
    ratio = c99 / s99 if s99 > 0 else (math.inf if c99 > 0 else math.nan)
    delta_ms = (c99 - s99) * 1000.0
    metrics.update({"stable_p99_ms": s99 * 1000.0, "canary_p99_ms": c99 * 1000.0})
    metrics.update({"p99_ratio": ratio, "latency_quantile": q})
    shown_q = "" if q >= 0.99 else f" at p{q * 100:.3g}, too few requests for p99"
    value = f"{fmt_number(ratio, 3)}x ({_ms(c99)} vs {_ms(s99)}{shown_q})"
    if not enough:
        return CheckRow(check, GateStatus.INCONCLUSIVE, value, bound, few)
    if math.isnan(ratio) or math.isnan(delta_ms):
        return CheckRow(check, GateStatus.FAIL, value, bound, "p99 undefined on this window")
    slower = ratio > cfg.max_p99_ratio and delta_ms > cfg.min_p99_delta_ms
    if slower:
        detail = f"canary {delta_ms:+.2f} ms at p{q * 100:.3g}"
        return CheckRow(check, GateStatus.FAIL, value, bound, detail)
    detail = "within the slack" if ratio > cfg.max_p99_ratio else ""
    return CheckRow(check, GateStatus.PASS, value, bound, detail)


def _cost_row(
    stable: VariantWindow,
    canary: VariantWindow,
    cfg: CanaryConfig,
    cost: CostConfig,
    enough: bool,
    few: str,
    metrics: dict[str, float],
) -> CheckRow:
    check = "cost per 1,000 predictions, canary / stable"
    c_cost, s_cost = canary.cost_per_1000(cost), stable.cost_per_1000(cost)
    ratio = cost_ratio(c_cost, s_cost)
    metrics.update(
        {"cost_per_1000_canary": c_cost, "cost_per_1000_stable": s_cost, "cost_ratio": ratio}
    )
    value = f"{fmt_number(ratio, 3)}x ({fmt_number(c_cost, 4)} vs {fmt_number(s_cost, 4)})"
    if cfg.max_cost_ratio is None:
        return CheckRow(
            check, GateStatus.PASS, value, "not judged", "canary.max_cost_ratio unset: reported"
        )
    bound = f"<= {cfg.max_cost_ratio:g}x"
    missing = [w.variant for w in (stable, canary) if w.cpu_seconds is None]
    if missing:
        detail = f"{' and '.join(missing)} exports no CPU seconds (mlgate_cpu_seconds_total)"
        return CheckRow(check, GateStatus.FAIL, "n/a", bound, detail)
    fewest = min(stable.rows, canary.rows)
    if not enough or fewest < cfg.min_requests:
        detail = few or f"{fewest:,.0f} rows scored on one side, needs {cfg.min_requests:,}"
        return CheckRow(check, GateStatus.INCONCLUSIVE, value, bound, detail)
    if math.isnan(ratio):
        return CheckRow(check, GateStatus.FAIL, value, bound, "cost undefined on this window")
    if ratio > cfg.max_cost_ratio:
        return CheckRow(check, GateStatus.FAIL, value, bound, "the canary costs more per row")
    return CheckRow(check, GateStatus.PASS, value, bound, "")


def _psi_row(
    stable: VariantWindow,
    canary: VariantWindow,
    cfg: CanaryConfig,
    enough: bool,
    few: str,
    metrics: dict[str, float],
    evidence: dict[str, Any],
) -> CheckRow:
    check = "score PSI, canary vs stable"
    bound = f"< {fmt_number(cfg.max_score_psi)}"
    if stable.scores is None or canary.scores is None:
        side = "stable" if stable.scores is None else "canary"
        return CheckRow(check, GateStatus.FAIL, "n/a", bound, f"{side} has no score histogram")
    if stable.scores.count <= 0 or canary.scores.count <= 0:
        status = GateStatus.INCONCLUSIVE if not enough else GateStatus.FAIL
        metrics["score_psi"] = math.nan
        return CheckRow(check, status, "n/a", bound, few or "no scores on one side")
    value, bins = score_psi(stable.scores, canary.scores, cfg.psi_bins)
    noise = psi_noise_bound(bins, canary.scores.count, stable.scores.count)
    metrics["score_psi"] = value
    metrics["score_psi_noise"] = noise
    evidence["psi_bins"] = bins
    shown = f"{value:.4f}" if math.isfinite(value) else str(value)
    if not math.isfinite(value):
        return CheckRow(check, GateStatus.FAIL, shown, bound, "PSI undefined on this window")
    if value >= cfg.max_score_psi and value > noise:
        return CheckRow(check, GateStatus.FAIL, shown, bound, f"shifted ({bins} bins)")
    if not enough:
        return CheckRow(check, GateStatus.INCONCLUSIVE, shown, bound, few)
    if value >= cfg.max_score_psi:
        detail = (
            f"above the bound but within sampling noise ({noise:.3f} at p = {SIGNIFICANCE:g} "
            f"for {canary.scores.count:,.0f} rows, {bins} bins): waiting for more"
        )
        return CheckRow(check, GateStatus.INCONCLUSIVE, shown, bound, detail)
    return CheckRow(check, GateStatus.PASS, shown, bound, f"{bins} bins")


def _result(
    rows: dict[str, CheckRow],
    metrics: dict[str, float],
    evidence: dict[str, Any],
    canary: VariantWindow,
    stable: VariantWindow,
    few: str,
) -> GateResult:
    ordered = [rows[g] for g in GUARDRAILS if g in rows]
    status = worst_status([r.status for r in ordered])
    failed = [g for g in GUARDRAILS if g in rows and rows[g].status is GateStatus.FAIL]
    waiting = [g for g in GUARDRAILS if g in rows and rows[g].status is GateStatus.INCONCLUSIVE]
    step = evidence["step_percent"]
    head = (
        f"step {step}%: canary v{canary.version} against stable v{stable.version} "
        f"over {canary.seconds:.1f} s"
    )
    if failed:
        evidence["failed_guardrail"] = failed[0]
        detail = "; ".join(f"{g}: {rows[g].value} (needs {rows[g].bound})" for g in failed)
        detail += "".join(f" [{rows[g].detail}]" for g in failed[:1] if rows[g].detail)
        reason = f"{head}: {len(failed)} guardrail(s) tripped: {detail}"
    elif waiting:
        evidence["failed_guardrail"] = None
        evidence["waiting_on"] = waiting[0]
        reason = f"{head}: inconclusive, {few or rows[waiting[0]].detail}"
    else:
        evidence["failed_guardrail"] = None
        reason = (
            f"{head}: all {len(ordered)} guardrails passed on "
            f"{canary.requests:,} canary and {stable.requests:,} stable requests"
        )
    return GateResult(NAME, status, reason, metrics, evidence, tuple(ordered))


# --- a whole rollout ------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryStep:
    """One step analysed to a pass: its share in percent, the candidate it judged, when,
    HAProxy's per-server counts over its window (`services.haproxy.counts_between`) and the
    gate result. `to_dict` is the shape the controller's state file keeps."""

    percent: int
    result: GateResult
    candidate_version: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    seconds: float | None = None
    haproxy: Mapping[str, Mapping[str, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "candidate_version": self.candidate_version,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "seconds": self.seconds,
            "haproxy": (
                None
                if self.haproxy is None
                else {name: dict(counts) for name, counts in self.haproxy.items()}
            ),
            "result": self.result.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CanaryStep:
        return cls(
            percent=int(d["percent"]),
            result=GateResult.from_dict(d["result"]),
            candidate_version=d.get("candidate_version"),
            started_at=d.get("started_at"),
            ended_at=d.get("ended_at"),
            seconds=d.get("seconds"),
            haproxy=d.get("haproxy"),
        )


def analysis_gaps(
    steps_done: Sequence[CanaryStep], *, candidate_version: str, steps: Sequence[int]
) -> str:
    """Empty when every configured step was analysed to a pass for this candidate, in
    order; otherwise what is missing."""
    done = [s for s in steps_done if s.candidate_version == candidate_version]
    percents = [s.percent for s in done]
    if percents != list(steps):
        return f"steps analysed {percents}, configured {list(steps)}"
    failed = [s.percent for s in done if s.result.status is not GateStatus.PASS]
    if failed:
        return f"steps {failed} did not pass"
    return ""


def summarize_steps(
    steps_done: Sequence[CanaryStep],
    *,
    candidate_version: str,
    stable_version: str,
    steps: Sequence[int],
) -> GateResult:
    """One `canary` result for the whole rollout: every step's verdict and the worst numbers
    seen, as evidence for the promotion."""
    results = [s.result for s in steps_done]
    metrics: dict[str, float] = {"steps": float(len(results))}
    for key, pick in (
        ("error_rate_delta", max),
        ("p99_ratio", max),
        ("score_psi", max),
        ("invalid_outputs", max),
        ("canary_requests", sum),
        ("stable_requests", sum),
    ):
        values = [r.metrics[key] for r in results if math.isfinite(r.metrics.get(key, math.nan))]
        if values:
            metrics[key] = float(pick(values))
    # Cost at the last step that measured it: the fullest traffic, where an instance's idle
    # CPU weighs least on its cost per row.
    for r in reversed(results):
        if math.isfinite(r.metrics.get("cost_ratio", math.nan)):
            for key in ("cost_ratio", "cost_per_1000_canary", "cost_per_1000_stable"):
                metrics[key] = float(r.metrics[key])
            break
    rows = tuple(
        CheckRow(
            f"step {int(r.metrics.get('step_percent', 0))}%",
            r.status,
            f"{int(r.metrics.get('canary_requests', 0)):,} canary requests",
            "all guardrails",
            r.reason,
        )
        for r in results
    )
    status = GateStatus.PASS if results and all(r.passed for r in results) else GateStatus.FAIL
    reason = (
        f"v{candidate_version} against v{stable_version} over steps "
        f"{', '.join(f'{p}%' for p in steps)}: "
        f"{int(metrics.get('canary_requests', 0)):,} canary requests, max error-rate delta "
        f"{metrics.get('error_rate_delta', math.nan):+.4f}, max p99 ratio "
        f"{metrics.get('p99_ratio', math.nan):.2f}, max score PSI "
        f"{metrics.get('score_psi', math.nan):.4f}"
    )
    evidence: dict[str, Any] = {
        "steps": [{k: v for k, v in s.to_dict().items() if k != "result"} for s in steps_done],
        "results": [s.result.to_dict() for s in steps_done],
    }
    return GateResult(NAME, status, reason, metrics, evidence, rows)
