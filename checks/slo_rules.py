"""Prometheus recording and alerting rules generated from the service level objectives in `slo:`.

Two groups, in the order an incident shows itself:

1. leading indicators, per instance, each a warning after `slo.leading_for`: requests the
   batcher sheds (503: its queue is full or a request waited past `serving.max_latency_ms`),
   batches that keep filling (mean rows per ONNX Runtime call against
   `serving.max_batch_size`), the batcher's queue, its wait and the requests in flight (see
   below), the request rate against `slo.capacity_rps`, and inference-log rows dropped
   (monitoring goes blind before users notice anything);
2. the objectives: first recording rules, per model, the share of requests that missed each
   objective (5xx answers; answers slower than a latency bound) over every window the alerts
   use, then the burn-rate alerts (Google's SRE workbook, multiple windows and burn rates):
   per objective and severity, firing when both windows of any of its pairs spend the error
   budget at least `factor` times as fast as would spend it exactly in `slo.window_days`.
   The short window lets an alert resolve soon after the burn stops. One group, because
   Prometheus evaluates a group's rules in order but groups independently: the alerts read
   the ratios of the same evaluation, never a previous one gone stale.
3. dependencies: a circuit breaker open (`mlgate_circuit_breaker_state == 2`), a warning;
4. cost, when the `cost:` prices are given: the cost per 1,000 predictions of each model
   version and variant over the last hour (`checks/cost.py`'s formula, in PromQL), and with
   `cost.budget_per_1000` an alert when it stays above the budget for `slo.leading_for`.

The load indicators warn at `slo.max_capacity_share` (0.8) of a bound, the same share as
the request rate against `slo.capacity_rps`:

- queue: Little's law, W = L / λ. The rows in the batcher's queue (L, a gauge) over the rows
  the instance scores per second (λ, the rate of `mlgate_batch_rows_sum`) is the time a row
  arriving now waits for the queue ahead of it; it warns above the share of the latency
  objective (`slo.latency_p99_s`, else `latency_p95_s`, else the batcher's deadline). The
  scored rate stands for capacity only while the scorer is always busy, and that is what
  `for:` asks: a queue that is not empty at every evaluation for `slo.leading_for` means a
  scorer that never idles. At low traffic the queue is empty at most evaluations and the
  alert cannot hold. A queue with nothing scored divides by zero: +Inf, a stuck scorer,
  warns. (A share of the batcher's row bound would warn late: the bound is
  64 times `serving.max_rows_per_request` rows, far past the latency objective.)
- wait: the p99 of the time rows waited in the queue before their ONNX Runtime call against
  the share of `serving.max_latency_ms`, past which the batcher sheds them (only when
  `max_wait_s` is given);
- in flight: requests admitted and not yet scored over the admission bound
  (`serving.max_in_flight`, both summed over the workers); at the bound requests are shed.

The breaker alert reads `max_over_time` over 2 minutes and holds for 3: an open breaker
tries one call after 30 s (half-open, a whole retried call) and opens again while the
dependency stays down, so the state seen at one instant may be 1 through an outage, and a
single 30 s opening does not warn. Its series has no `model_name`: every model's rule file
carries the alert, with the same labels, which Alertmanager takes as one alert.

Objectives are per model (`model_name`), across versions and the canary's variants: users
see one endpoint. A latency bound must be a bound of the latency histogram's buckets, so the
share of requests within it is counted, not interpolated. This module knows the series
`services/metrics.py` exports by name only, and none that it does not export:
`NOT_EXPORTED` says which requested indicators have no series, and `RuleFile.notes` names
the objectives no rule could be generated for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from checks.cost import PER, SECONDS_PER_HOUR
from checks.runbooks import ALERT_PAGES, runbook_link, runbook_page
from models.config import CostConfig, SloConfig, prom_duration_s

# The series services/metrics.py exports (prometheus-client adds `_total` to counters);
# tests/checks/test_slo_rules.py holds every name used here to a real exposition.
REQUESTS = "mlgate_requests_total"
LATENCY = "mlgate_request_latency_seconds"
BATCH_ROWS = "mlgate_batch_rows"
LOG_ROWS = "mlgate_inference_log_rows_total"
LAST_KNOWN_GOOD = "mlgate_model_from_last_known_good"
CPU_SECONDS = "mlgate_cpu_seconds_total"
GPU_SECONDS = "mlgate_gpu_seconds_total"
SCORED_ROWS = "mlgate_score_count"
QUEUED_ROWS = "mlgate_batcher_queued_rows"
BATCHER_WAIT = "mlgate_batcher_wait_seconds"
IN_FLIGHT = "mlgate_in_flight_requests"
MAX_IN_FLIGHT = "mlgate_max_in_flight"
BREAKER_STATE = "mlgate_circuit_breaker_state"
BREAKER_OPEN = 2
BREAKER_RANGE = "2m"
BREAKER_FOR = "3m"

SLO_BY = "model_name"
INSTANCE_BY = "model_name, variant, instance"
LEADING_RANGE = "5m"
COST_BY = "model_name, model_version, variant"
COST_RANGE = "1h"
COST_PER_1000 = f"model_version_variant:mlgate_cost_per_1000:rate{COST_RANGE}"

# Indicators asked for that services/metrics.py does not export, and what stands in for
# them: none since the batcher's queue, its wait and the requests in flight are exported.
NOT_EXPORTED: tuple[str, ...] = ()

_BAD_SERIES = {
    "availability": "mlgate_requests_5xx",
    "latency_p95": "mlgate_requests_over_p95_bound",
    "latency_p99": "mlgate_requests_over_p99_bound",
}
_ALERT_NAMES = {
    "availability": "MlgateAvailabilityBudgetBurn",
    "latency_p95": "MlgateLatencyP95BudgetBurn",
    "latency_p99": "MlgateLatencyP99BudgetBurn",
}
_RUNBOOKS = {
    "availability": (
        "500s: the service log names each request id. 503s: load shed by the batcher (see "
        "MlgateBatcherShedding). During a canary: `mlgate canary status`, and `mlgate canary "
        "abort --reason ...` if the canary is the cause; after a promotion: `mlgate rollback "
        "NAME --reason ...`."
    ),
    "latency": (
        "Check the leading indicators (MlgateBatcherSaturated, MlgateLoadNearCapacity): "
        "load calls for more serving.workers or instances. A slower version since the last "
        "promotion (mlgate_model_info): `mlgate rollback NAME --reason ...`."
    ),
    "MlgateBatcherShedding": (
        "The batcher's queue is full or requests wait past serving.max_latency_ms: add "
        "serving.workers or instances, or find what slowed scoring (a new model version)."
    ),
    "MlgateBatcherSaturated": (
        "Scoring barely keeps up: every ONNX Runtime call takes a nearly full batch. Add "
        "serving.workers or instances before requests are shed."
    ),
    "MlgateBatcherQueueBacklog": (
        "Rows queue faster than the instance scores them: a row arriving now waits most of "
        "the latency objective. Add serving.workers or instances; if the scored rate fell, "
        "a slower version (mlgate_model_info): `mlgate rollback NAME --reason ...`."
    ),
    "MlgateBatcherWaitHigh": (
        "Rows wait in the batcher's queue close to serving.max_latency_ms, past which they "
        "are shed (503): add serving.workers or instances before that."
    ),
    "MlgateInFlightNearLimit": (
        "Requests in flight are close to serving.max_in_flight, past which they are shed "
        "(503): add serving.workers or instances, or find the client sending a burst."
    ),
    "MlgateCircuitBreakerOpen": (
        "Calls to the dependency fail fast (breaker open after 3 consecutive failures). "
        "Registry: the service keeps serving its model; promotions, rollbacks and alias "
        "swaps wait. `mlgate stack status` says what is down."
    ),
    "MlgateLoadNearCapacity": (
        "Traffic is close to what one instance was measured to serve (slo.capacity_rps): "
        "add instances, or check for a client retrying in a loop (per-key rate limits)."
    ),
    "MlgateInferenceLogDropping": (
        "The inference log cannot keep up or its store is unreachable "
        "(serving.inference_log_dir or inference_log_uri): the service log says why. "
        "Monitoring sees fewer rows until it recovers; predictions are unaffected."
    ),
    "MlgateServingLastKnownGood": (
        "The instance could not reach the registry when it started and serves its "
        "last-known-good copy: `mlgate stack status`; once the registry answers, restart it."
    ),
    "MlgateCostOverBudget": (
        "A version or variant costs more per prediction than cost.budget_per_1000: a new "
        "version (`mlgate models show NAME@champion`) that is heavier, idle instances or "
        "workers, or GPUs held for little traffic. A promotion to blame: `mlgate rollback "
        "NAME --reason ...`."
    ),
}


class SloRulesError(ValueError):
    """An objective that cannot be turned into rules; the message names the field."""


@dataclass(frozen=True)
class RuleFile:
    """A Prometheus rule file's groups, and what the objectives asked for that no rule
    could be generated for."""

    groups: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups)}

    def to_yaml(self, header: Sequence[str] = ()) -> str:
        """The rule file, `header` and `notes` as comments above it."""
        comments = [*header, *(f"not generated: {n}" for n in self.notes)]
        top = "".join(f"# {line}\n" for line in comments)
        return top + yaml.dump(
            self.to_dict(), Dumper=_RulesDumper, sort_keys=False, width=100, allow_unicode=True
        )

    def alert_names(self) -> list[str]:
        return [r["alert"] for g in self.groups for r in g["rules"] if "alert" in r]

    def recorded_names(self) -> list[str]:
        return [r["record"] for g in self.groups for r in g["rules"] if "record" in r]


class _RulesDumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, so the file reads as PromQL."""


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_RulesDumper.add_representer(str, _str_representer)


def build_slo_rules(
    slo: SloConfig,
    model_name: str,
    max_batch_size: int,
    latency_buckets: Sequence[float],
    cost: CostConfig | None = None,
    max_wait_s: float | None = None,
) -> RuleFile:
    """The rule file for `slo` on the series of `model_name` (`registry.model_name`), so that
    the files of several models load side by side. `max_batch_size` is
    `serving.max_batch_size`; `latency_buckets` the upper bounds of the service's latency
    histogram; `cost` the `cost:` section (None: no cost rules); `max_wait_s` the batcher's
    deadline, `serving.max_latency_ms` in seconds (None: no wait alert)."""
    model = f'model_name="{model_name}"'
    objectives = slo.objectives()
    matchers = {
        name: _le_matcher(name, bound, latency_buckets)
        for name, (_, bound) in objectives.items()
        if bound is not None
    }
    windows = sorted(
        {w for pair in slo.burn_windows for w in (pair.long, pair.short)}, key=prom_duration_s
    )
    recording = [
        {
            "record": _recorded(name, window),
            "expr": _bad_share(name, window, model, matchers.get(name)),
        }
        for name in objectives
        for window in windows
    ]
    burn_alerts = [
        _burn_alert(slo, name, good, bound, severity)
        for name, (good, bound) in objectives.items()
        for severity in dict.fromkeys(pair.severity for pair in slo.burn_windows)
    ]
    groups: tuple[dict[str, Any], ...] = (
        {
            "name": f"mlgate-{model_name}-leading-indicators",
            "rules": _leading_alerts(slo, model, max_batch_size, max_wait_s),
        },
        {"name": f"mlgate-{model_name}-slo", "rules": [*recording, *burn_alerts]},
        {"name": f"mlgate-{model_name}-dependencies", "rules": [_breaker_alert(slo)]},
    )
    if cost is not None:
        groups = (
            *groups,
            {"name": f"mlgate-{model_name}-cost", "rules": _cost_rules(slo, cost, model)},
        )
    return RuleFile(groups=groups, notes=(*NOT_EXPORTED, *_objectives_without_series(slo)))


def _le_matcher(name: str, bound: float, buckets: Sequence[float]) -> str:
    for b in buckets:
        if math.isclose(b, bound, rel_tol=1e-9):
            # prometheus-client writes `le="1.0"`; Prometheus 3 rewrites whole numbers as
            # `le="1"` when it scrapes, so those match either spelling.
            return f'le=~"{b:g}|{b!r}"' if float(b).is_integer() else f'le="{b!r}"'
    bounds = ", ".join(f"{b:g}" for b in buckets)
    raise SloRulesError(
        f"slo.{name}_s {bound:g} is not a bound of the service's latency buckets ({bounds}): "
        "the share of requests within it could only be interpolated; use one of them"
    )


def _recorded(name: str, window: str) -> str:
    return f"{SLO_BY}:{_BAD_SERIES[name]}:ratio_rate{window}"


def _bad_share(name: str, window: str, model: str, le: str | None) -> str:
    if le is None:
        errors = f'sum by ({SLO_BY}) (rate({REQUESTS}{{{model},status=~"5.."}}[{window}]))'
        every = f"sum by ({SLO_BY}) (rate({REQUESTS}{{{model}}}[{window}]))"
        return f"{errors}\n/\n{every}\n"
    within = f"sum by ({SLO_BY}) (rate({LATENCY}_bucket{{{model},{le}}}[{window}]))"
    every = f"sum by ({SLO_BY}) (rate({LATENCY}_count{{{model}}}[{window}]))"
    return f"1 - (\n  {within}\n  /\n  {every}\n)\n"


def _num(x: float) -> str:
    return format(round(x, 12), ".12g")


def _percent(share: float) -> str:
    return f"{round(share * 100, 10):g}%"


def _burn_alert(
    slo: SloConfig, name: str, good: float, bound: float | None, severity: str
) -> dict[str, Any]:
    budget = 1.0 - good
    pairs = [p for p in slo.burn_windows if p.severity == severity]
    clauses = []
    for p in pairs:
        threshold = _num(p.factor * budget)
        clauses.append(
            f"(\n  {_recorded(name, p.long)} > {threshold}\n  and\n"
            f"  {_recorded(name, p.short)} > {threshold}\n)"
        )
    rates = "; ".join(
        f"{p.long} and {p.short} at {p.factor:g}x (budget spent in "
        f"{slo.window_days / p.factor:.3g} days)"
        for p in pairs
    )
    days = f"{slo.window_days:g} days"
    if bound is None:
        missed = "of /predict answers were 5xx"
        objective = f"{_percent(good)} of /predict answers not 5xx over {days}"
        what = "availability"
    else:
        missed = f"of /predict requests took longer than {bound:g} s"
        objective = f"{_percent(good)} of /predict requests within {bound:g} s over {days}"
        what = f"p{round(good * 100)} latency"
    alert = _ALERT_NAMES[name]
    return {
        "alert": alert,
        "expr": "\nor\n".join(clauses) + "\n",
        "labels": {"severity": severity, "slo": name},
        "annotations": {
            "summary": f"{{{{ $labels.model_name }}}}: {what} is spending its error budget "
            "too fast",
            "description": (
                f"{{{{ $value | humanizePercentage }}}} {missed} over the longer window "
                f"that tripped (objective: {objective}). Fires on {rates}."
            ),
            **_runbook(slo, alert, "availability" if bound is None else "latency"),
        },
    }


def _runbook(slo: SloConfig, alert: str, key: str) -> dict[str, str]:
    """The first steps in a sentence, the page in the repository (docs/runbooks/), and, when
    `slo.runbook_url` says where the pages are published, the link to it."""
    stem = ALERT_PAGES[alert]
    found = {"runbook": _RUNBOOKS[key], "runbook_page": runbook_page(stem)}
    if slo.runbook_url:
        found["runbook_url"] = runbook_link(stem, slo.runbook_url)
    return found


def _leading(
    slo: SloConfig, alert: str, expr: str, summary: str, description: str
) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": slo.leading_for,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": summary,
            "description": description,
            **_runbook(slo, alert, alert),
        },
    }


def _leading_alerts(
    slo: SloConfig, model: str, max_batch_size: int, max_wait_s: float | None
) -> list[dict[str, Any]]:
    r = LEADING_RANGE
    who = "{{ $labels.model_name }} on {{ $labels.instance }} ({{ $labels.variant }})"
    requests = f"sum by ({INSTANCE_BY}) (rate({REQUESTS}{{{model}}}[{r}]))"
    shed = f'sum by ({INSTANCE_BY}) (rate({REQUESTS}{{{model},status="503"}}[{r}]))'
    fill = _num(slo.max_batch_fill * max_batch_size)
    batch_mean = (
        f"sum by ({INSTANCE_BY}) (rate({BATCH_ROWS}_sum{{{model}}}[{r}]))\n/\n"
        f"sum by ({INSTANCE_BY}) (rate({BATCH_ROWS}_count{{{model}}}[{r}]))\n"
    )
    dropped = f'sum by ({INSTANCE_BY}) (rate({LOG_ROWS}{{{model},outcome="dropped"}}[{r}]))'
    logged = f"sum by ({INSTANCE_BY}) (rate({LOG_ROWS}{{{model}}}[{r}]))"
    rules = [
        _leading(
            slo,
            "MlgateBatcherShedding",
            f"{shed}\n/\n{requests}\n> {_num(slo.max_shed_share)}\n",
            f"{who}: the batcher is shedding load (503)",
            f"{{{{ $value | humanizePercentage }}}} of requests were answered 503 over {r} "
            f"(warns above {_percent(slo.max_shed_share)}): the batcher's queue is full or "
            "requests waited past serving.max_latency_ms. These count against availability.",
        ),
        _leading(
            slo,
            "MlgateBatcherSaturated",
            f"{batch_mean}> {fill}\n",
            f"{who}: the batcher's batches are nearly full",
            f"ONNX Runtime calls averaged {{{{ $value | humanize }}}} rows over {r} (warns "
            f"above {fill}, {_percent(slo.max_batch_fill)} of serving.max_batch_size "
            f"{max_batch_size}): requests queue faster than they are scored.",
        ),
    ]
    rules.extend(_load_alerts(slo, model, max_wait_s))
    if slo.capacity_rps is not None:
        limit = _num(slo.max_capacity_share * slo.capacity_rps)
        rules.append(
            _leading(
                slo,
                "MlgateLoadNearCapacity",
                f"{requests} > {limit}\n",
                f"{who}: load is near the instance's capacity",
                f"{{{{ $value | humanize }}}} requests/s over {r} (warns above {limit}, "
                f"{_percent(slo.max_capacity_share)} of slo.capacity_rps "
                f"{slo.capacity_rps:g}).",
            )
        )
    rules.append(
        _leading(
            slo,
            "MlgateServingLastKnownGood",
            f"max by ({INSTANCE_BY}) ({LAST_KNOWN_GOOD}{{{model}}}) > 0\n",
            f"{who}: serving the last-known-good copy, not the registry's",
            "The instance started while the registry could not be reached and serves the "
            "copy it kept (verified by sha256): promotions and rollbacks do not reach it "
            "until it restarts with the registry back.",
        )
    )
    rules.append(
        _leading(
            slo,
            "MlgateInferenceLogDropping",
            f"{dropped}\n/\n{logged}\n> {_num(slo.max_log_drop_share)}\n",
            f"{who}: the inference log is dropping rows",
            f"{{{{ $value | humanizePercentage }}}} of inference-log rows were dropped over "
            f"{r} (warns above {_percent(slo.max_log_drop_share)}): drift monitoring and "
            "retraining see fewer rows than were scored.",
        )
    )
    return rules


def _load_alerts(slo: SloConfig, model: str, max_wait_s: float | None) -> list[dict[str, Any]]:
    """The batcher's queue (Little's law against the latency objective), its wait against
    its deadline, and requests in flight against the admission bound."""
    r = LEADING_RANGE
    who = "{{ $labels.model_name }} on {{ $labels.instance }} ({{ $labels.variant }})"
    share = slo.max_capacity_share
    rules = []
    objective = slo.latency_p99_s or slo.latency_p95_s or max_wait_s
    if objective is not None:
        limit = _num(share * objective)
        queued = f"sum by ({INSTANCE_BY}) ({QUEUED_ROWS}{{{model}}})"
        scored = f"sum by ({INSTANCE_BY}) (rate({BATCH_ROWS}_sum{{{model}}}[{r}]))"
        rules.append(
            _leading(
                slo,
                "MlgateBatcherQueueBacklog",
                f"{queued}\n/\n{scored}\n> {limit}\n",
                f"{who}: the batcher's queue holds more than it scores within the objective",
                f"The rows queued take {{{{ $value | humanizeDuration }}}} to score at the "
                f"rate of the last {r} (Little's law; warns above {limit} s, "
                f"{_percent(share)} of the latency objective {objective:g} s): requests "
                "arrive faster than they are scored.",
            )
        )
    if max_wait_s is not None:
        limit = _num(share * max_wait_s)
        rules.append(
            _leading(
                slo,
                "MlgateBatcherWaitHigh",
                f"histogram_quantile(\n  0.99,\n  sum by (le, {INSTANCE_BY}) "
                f"(rate({BATCHER_WAIT}_bucket{{{model}}}[{r}]))\n)\n> {limit}\n",
                f"{who}: requests wait in the batcher's queue close to its deadline",
                f"The p99 of the queue wait over {r} is {{{{ $value | humanizeDuration }}}} "
                f"(warns above {limit} s, {_percent(share)} of serving.max_latency_ms "
                f"{max_wait_s * 1000:g} ms, past which requests are shed with 503).",
            )
        )
    in_flight = f"sum by ({INSTANCE_BY}) ({IN_FLIGHT}{{{model}}})"
    bound = f"sum by ({INSTANCE_BY}) ({MAX_IN_FLIGHT}{{{model}}})"
    rules.append(
        _leading(
            slo,
            "MlgateInFlightNearLimit",
            f"{in_flight}\n/\n{bound}\n> {_num(share)}\n",
            f"{who}: requests in flight are near serving.max_in_flight",
            f"{{{{ $value | humanizePercentage }}}} of the admission bound is in flight "
            f"(warns above {_percent(share)} of serving.max_in_flight, summed over the "
            "workers; at the bound requests are shed with 503).",
        )
    )
    return rules


def _breaker_alert(slo: SloConfig) -> dict[str, Any]:
    state = f"max_over_time({BREAKER_STATE}[{BREAKER_RANGE}])"
    return {
        "alert": "MlgateCircuitBreakerOpen",
        "expr": f"max by (instance, dependency) ({state}) == {BREAKER_OPEN}\n",
        "for": BREAKER_FOR,
        # A warning, not a page: with the registry down the service keeps serving the model
        # it loaded (and a restart its last-known-good copy); what waits is a promotion, a
        # rollback, an alias swap, a canary's reading or a notification, none of which a
        # user of /predict sees.
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.instance }}: the {{ $labels.dependency }} circuit breaker "
            "is open",
            "description": (
                f"Calls to {{{{ $labels.dependency }}}} failed 3 times in a row and the "
                f"breaker kept opening over {BREAKER_FOR}: they fail fast, and are tried again "
                "every 30 s."
            ),
            **_runbook(slo, "MlgateCircuitBreakerOpen", "MlgateCircuitBreakerOpen"),
        },
    }


def cost_per_1000_expr(cost: CostConfig, model: str) -> str:
    """`checks.cost.cost_per_1000` over the last `COST_RANGE`, per version and variant: the
    rates of the counters stand for their increases (the window's length cancels). An
    instance that scored no row has no value rather than an infinite one."""
    r = COST_RANGE
    cpu_price = _num(cost.price_per_core_hour * PER / SECONDS_PER_HOUR)
    gpu_price = _num(cost.price_per_gpu_hour * PER / SECONDS_PER_HOUR)
    cpu = f"sum by ({COST_BY}) (rate({CPU_SECONDS}{{{model}}}[{r}]))"
    gpu = f"sum by ({COST_BY}) (rate({GPU_SECONDS}{{{model}}}[{r}]))"
    rows = f"sum by ({COST_BY}) (rate({SCORED_ROWS}{{{model}}}[{r}]))"
    return f"(\n  {cpu} * {cpu_price}\n  +\n  {gpu} * {gpu_price}\n)\n/\n({rows} > 0)\n"


def _cost_rules(slo: SloConfig, cost: CostConfig, model: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"record": COST_PER_1000, "expr": cost_per_1000_expr(cost, model)}
    ]
    if cost.budget_per_1000 is None:
        return rules
    budget = _num(cost.budget_per_1000)
    who = "{{ $labels.model_name }} v{{ $labels.model_version }} ({{ $labels.variant }})"
    rules.append(
        {
            "alert": "MlgateCostOverBudget",
            "expr": f"{COST_PER_1000} > {budget}\n",
            "for": slo.leading_for,
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": f"{who}: cost per 1,000 predictions is over budget",
                "description": (
                    f"1,000 predictions cost {{{{ $value | humanize }}}} over the last "
                    f"{COST_RANGE} (budget: {budget}, cost.budget_per_1000), at "
                    f"{_num(cost.price_per_core_hour)} per core-hour and "
                    f"{_num(cost.price_per_gpu_hour)} per GPU-hour."
                ),
                **_runbook(slo, "MlgateCostOverBudget", "MlgateCostOverBudget"),
            },
        }
    )
    return rules


def _objectives_without_series(slo: SloConfig) -> list[str]:
    notes = []
    if slo.champion_max_age_days is not None:
        notes.append(
            "slo.champion_max_age_days: no series on /metrics gives @champion's age "
            "(mlgate_model_info names the version, not when it was trained)"
        )
    if slo.max_score_psi is not None:
        notes.append(
            "slo.max_score_psi: /metrics has the score histogram (mlgate_score) but not the "
            "reference it is compared with, which is stored with the model version; the "
            "monitoring flow measures prediction PSI (gates.drift)"
        )
    if slo.min_estimated_metric is not None:
        notes.append("slo.min_estimated_metric: no estimated performance is exported")
    return notes
