"""Kubernetes manifests for the serving tier, rendered from the config, and their offline
validation.

`render_manifests` gives, as plain dicts in apply order: the `NetworkPolicy` (unless
`kubernetes.network_policy` is off), the stable and canary `Service`s, the `AnalysisTemplate`,
the Argo Rollouts `Rollout` (the bento's image, `mlgate-gpu` and an `nvidia.com/gpu` limit
when `serving.gpus > 0`; API keys from a Secret, never inline) and the KEDA `ScaledObject`.
`validate_manifest` checks one object offline: the CRDs' published schemas vendored in
deploy/kubernetes/schemas/ (with jsonschema) for Rollout, AnalysisTemplate and ScaledObject,
kubernetes-validate for the built-in kinds (NetworkPolicy and Service), and the Rollout's pod
template again as a Deployment's (kubernetes-validate, strict).

The AnalysisTemplate is checks/canary.py's guardrails in PromQL, one metric each, over the
same window (`canary.interval_s`) of the canary's and the stable's pods (told apart by the
`rollouts_pod_template_hash` label that Prometheus must keep from the pods, see the README).
Every query answers NaN while its guardrail waits: Argo reads a value meeting neither the
success nor the failure condition as inconclusive, as canary.py's INCONCLUSIVE.

- metrics-readable: both sides export `mlgate_model_info` (canary.py's "metrics").
  Counter resets are not failures here: `increase` corrects them.
- invalid-outputs: the canary's scores below 0 or above 1 (NaN lands in +Inf) from the
  score histogram's buckets; no minimum, as in canary.py (a NaN sum is not counted again).
- error-rate: 4xx and 5xx share, canary minus stable, judged at `min_requests` per side;
  before that it fails only when significant. canary.py takes the exact binomial tail; PromQL
  has no such function, so this takes its normal approximation (z above 3.09, p = 0.001).
- latency-p99: `histogram_quantile` at min(0.99, 1 - 3/n), as canary.py's interpolation;
  fails when the ratio is above `max_p99_ratio` and the canary `min_p99_delta_ms` slower; an
  undefined ratio or delta fails (+Inf).
- score-psi: NOT canary.py's exact PSI. canary.py merges the 22 fixed score buckets into
  quantile bins of the stable's distribution sized by the window, which PromQL cannot do.
  The closest correct form: Jeffreys-smoothed PSI (alpha 0.5, checks.drift) over all 22
  fixed buckets, with the noise bound of 21 degrees of freedom (Wilson-Hilferty, as
  `psi_noise_bound`). Fails when PSI >= `max_score_psi` and above the noise bound (before
  `min_requests` too); passes below `max_score_psi` at `min_requests`; else inconclusive.
- cost-ratio (only with `canary.max_cost_ratio`): checks/cost.py's cost per 1,000 on each
  side from `mlgate_cpu_seconds_total`, `mlgate_gpu_seconds_total` and `mlgate_score_count`
  at the `cost:` prices, canary over stable; fails above the bound, or at once when a side
  exports no CPU seconds; inconclusive below `min_requests` requests or rows on a side.
- min-requests: the fewer requests of the two sides against `min_requests`; below it,
  inconclusive.

Argo measures each metric `count` times (`max_wait_s / interval_s`) after a first window,
allowing all but one inconclusive and no failure: a step passes when no window failed and one
did pass, close to the controller's "wait up to max_wait_s for a passing window".

KEDA scales on the batcher's queue depth (`mlgate_batcher_queued_rows` over every pod of the
model) against a target per replica from Little's law (`queued_rows_per_replica`), and on
the in-flight requests against the admission bound (`in_flight_per_replica`). The replica
floor is Little's law over the replicas: busy replicas = arrival rate x time a request holds
a replica (1 / capacity_rps), at `slo.max_capacity_share` utilisation, for
`expected_peak_rps`.

The NetworkPolicy admits the pods' one port from the Prometheus pods and the clients; as it
cannot tell `/metrics` from `/predict` on that port, the pods' operator endpoints are public
only when the clients are confined to `kubernetes.client_namespaces` (`exposure`).

Written by hand (dicts, not a client library's models): the objects are small and the
kubernetes client's models do not cover the CRDs; the validation is done by the libraries.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from checks.canary import _Z_SIGNIFICANCE, LATENCY_OUTLIERS, chi2_quantile
from checks.cost import PER, SECONDS_PER_HOUR
from checks.drift import JEFFREYS_ALPHA
from models.config import MlgateConfig

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "schemas"
KUBERNETES_VERSION = "1.34.0"
# The bentos' names in services/bentofile.yaml and services/bentofile-gpu.yaml.
BENTO_CPU = "mlgate"
BENTO_GPU = "mlgate-gpu"
# What a `bentoml containerize` image serves on (all interfaces).
PORT = 3000
APP_LABEL = "app.kubernetes.io/name"
HASH_LABEL = "rollouts_pod_template_hash"
# The score histogram's bucket bounds as prometheus-client writes them in `le`
# (services/metrics.SCORE_BUCKETS, then +Inf).
SCORE_LE = ("-1e-09", *(repr(round(0.05 * i, 2)) for i in range(1, 21)), "+Inf")

_CRDS = {
    ("argoproj.io/v1alpha1", "Rollout"): "argoproj.io_rollouts.yaml",
    ("argoproj.io/v1alpha1", "AnalysisTemplate"): "argoproj.io_analysistemplates.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


class KubernetesRenderError(ValueError):
    """The config lacks what the manifests need."""


@dataclass(frozen=True)
class Guardrail:
    """One AnalysisTemplate metric: its PromQL and the success and failure conditions as
    (operator, bound) on the query's value, so that a test can turn them into PromQL."""

    name: str
    query: str
    success: tuple[str, float]
    failure: tuple[str, float]

    def condition(self, which: str) -> str:
        op, bound = self.success if which == "success" else self.failure
        return f"result[0] {op} {_num(bound)}"


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


def _bounded(name: str, query: str, bound: float, *, strict: bool = False) -> Guardrail:
    """A guardrail that passes at or below `bound` and fails above it (`strict`: passes below
    it and fails at it or above); any other value, NaN, is inconclusive."""
    if strict:
        return Guardrail(name, query, ("<", bound), (">=", bound))
    return Guardrail(name, query, ("<=", bound), (">", bound))


def _or_wait(query: str) -> str:
    """`query`, or NaN (inconclusive) where it has no value."""
    return f"({query} or on() vector(NaN))"


def app_name(cfg: MlgateConfig) -> str:
    return f"mlgate-{cfg.registry.model_name.lower().replace('_', '-').replace('.', '-')}"


def image(cfg: MlgateConfig) -> str:
    bento = BENTO_GPU if cfg.serving.gpus > 0 else BENTO_CPU
    k = cfg.kubernetes
    repo = f"{k.image_registry.rstrip('/')}/{bento}" if k.image_registry else bento
    return f"{repo}:{k.image_tag}"


def min_replicas(cfg: MlgateConfig) -> int:
    """Little's law: mean busy replicas = peak rate x 1 / capacity_rps, kept at
    `max_capacity_share` utilisation; at least 1."""
    if cfg.slo.capacity_rps is None:
        raise KubernetesRenderError(
            "slo.capacity_rps is not set: measure one instance's capacity (`make bench`) so "
            "that the replica floor and the autoscaling threshold can be sized"
        )
    peak = cfg.kubernetes.expected_peak_rps
    if peak is None:
        raise KubernetesRenderError(
            "kubernetes.expected_peak_rps is not set: the replica floor is sized for it"
        )
    per_replica = cfg.slo.capacity_rps * cfg.slo.max_capacity_share
    floor = max(1, math.ceil(peak / per_replica - 1e-9))
    if floor > cfg.kubernetes.max_replicas:
        raise KubernetesRenderError(
            f"kubernetes.expected_peak_rps {peak:g} needs {floor} replicas at "
            f"{per_replica:g} rps each, above kubernetes.max_replicas "
            f"{cfg.kubernetes.max_replicas}"
        )
    return floor


# --- the analysis queries -------------------------------------------------------------------


def _window(cfg: MlgateConfig) -> str:
    return f"{max(1, round(cfg.canary.interval_s))}s"


class _Q:
    """PromQL fragments for one model over one window; `side` is canary or stable."""

    def __init__(self, cfg: MlgateConfig) -> None:
        self.model = cfg.registry.model_name
        self.w = _window(cfg)

    def sel(self, side: str, extra: str = "") -> str:
        return f'model_name="{self.model}",{HASH_LABEL}="{{{{args.{side}-hash}}}}"{extra}'

    def inc(self, metric: str, side: str, extra: str = "") -> str:
        return f"(sum(increase({metric}{{{self.sel(side, extra)}}}[{self.w}])) or vector(0))"

    def requests(self, side: str) -> str:
        return self.inc("mlgate_requests_total", side)

    def errors(self, side: str) -> str:
        return self.inc("mlgate_requests_total", side, ',status=~"[45].."')

    def enough(self, n: int) -> str:
        return f"(({self.requests('canary')} >= {n}) and on() ({self.requests('stable')} >= {n}))"

    def fewest(self, a: str, b: str) -> str:
        return f"(({a} <= on() {b}) or on() {b})"

    def score_le(self, side: str, le: str) -> str:
        return self.inc("mlgate_score_bucket", side, f',le="{le}"')

    def score_counts(self, side: str) -> str:
        """Observations per score bucket (not cumulative), labelled by `le`."""
        parts = [
            f'label_replace({self.score_le(side, SCORE_LE[0])}, "le", "{SCORE_LE[0]}", "", "")'
        ]
        for prev, le in itertools.pairwise(SCORE_LE):
            parts.append(
                f"label_replace({self.score_le(side, le)} - {self.score_le(side, prev)}, "
                f'"le", "{le}", "", "")'
            )
        return "(" + " or ".join(parts) + ")"


def guardrails(cfg: MlgateConfig) -> tuple[Guardrail, ...]:
    """checks/canary.py's guardrails as AnalysisTemplate metrics (see the module docstring
    for where PromQL differs)."""
    c = cfg.canary
    q = _Q(cfg)
    enough = q.enough(c.min_requests)

    both = " * on() ".join(
        f"clamp_max(count(mlgate_model_info{{{q.sel(side)}}}) or vector(0), 1)"
        for side in ("canary", "stable")
    )
    readable = Guardrail("metrics-readable", both, (">=", 1), ("<", 1))

    over = (
        f"({q.score_le('canary', '+Inf')} - {q.score_le('canary', '1.0')} "
        f"+ {q.score_le('canary', SCORE_LE[0])})"
    )
    invalid = _bounded("invalid-outputs", over, c.max_invalid_outputs)

    rate_c = f"({q.errors('canary')} / {q.requests('canary')})"
    rate_s = f"({q.errors('stable')} / ({q.requests('stable')} > 0) or vector(0))"
    delta = f"({rate_c} - on() {rate_s})"
    allowed = f"clamp_max({rate_s} + {_num(c.max_error_rate_delta)}, 1)"
    n_c = q.requests("canary")
    z = f"(({q.errors('canary')} - {n_c} * {allowed}) / sqrt({n_c} * {allowed} * (1 - {allowed})))"
    error_rate = _bounded(
        "error-rate",
        _or_wait(
            f"({delta} and on() {enough}) or on() ({delta} and on() ({z} > {_Z_SIGNIFICANCE}))"
        ),
        c.max_error_rate_delta,
    )

    lat = "mlgate_request_latency_seconds"
    fewest = q.fewest(q.inc(f"{lat}_count", "canary"), q.inc(f"{lat}_count", "stable"))
    quantile = f"scalar(clamp_max(1 - {LATENCY_OUTLIERS} / {fewest}, 0.99))"

    def p(side: str) -> str:
        return (
            f"histogram_quantile({quantile}, sum by (le) "
            f"(increase({lat}_bucket{{{q.sel(side)}}}[{q.w}])))"
        )

    ratio = f"({p('canary')} / on() {p('stable')})"
    slower = f"(({p('canary')} - on() {p('stable')}) > {_num(c.min_p99_delta_ms / 1000.0)})"
    within = f"(({p('canary')} - on() {p('stable')}) <= {_num(c.min_p99_delta_ms / 1000.0)})"
    bound = _num(c.max_p99_ratio)
    judged = (
        f"((({ratio} > {bound}) and on() {slower}) "
        f"or on() ({ratio} <= {bound}) "
        f"or on() (clamp_max({ratio} == {ratio}, {bound}) and on() {within}) "
        f"or on() vector(+Inf))"
    )
    latency = _bounded("latency-p99", _or_wait(f"({judged} and on() {enough})"), c.max_p99_ratio)

    k = len(SCORE_LE)
    a = JEFFREYS_ALPHA
    n_s_scores = q.inc("mlgate_score_count", "stable")
    n_c_scores = q.inc("mlgate_score_count", "canary")
    share_c = f"(({q.score_counts('canary')} + {a}) / scalar({n_c_scores} + {k * a}))"
    share_s = f"(({q.score_counts('stable')} + {a}) / scalar({n_s_scores} + {k * a}))"
    psi = f"sum(({share_c} - on(le) {share_s}) * on(le) ln({share_c} / on(le) {share_s}))"
    noise = f"({_num(chi2_quantile(k - 1))} * (1 / {n_c_scores} + 1 / on() {n_s_scores}))"
    bound_psi = _num(c.max_score_psi)
    score_psi = _bounded(
        "score-psi",
        _or_wait(
            f"(({psi} >= {bound_psi}) > on() {noise}) "
            f"or on() (({psi} < {bound_psi}) and on() {enough})"
        ),
        c.max_score_psi,
        strict=True,
    )

    least = q.fewest(q.requests("canary"), q.requests("stable"))
    min_requests = Guardrail(
        "min-requests",
        _or_wait(f"({least} >= {c.min_requests})"),
        (">=", c.min_requests),
        ("<", 0),
    )
    judged_cost = () if c.max_cost_ratio is None else (_cost_ratio(cfg, q, enough),)
    return (readable, invalid, error_rate, latency, score_psi, *judged_cost, min_requests)


def _cost_ratio(cfg: MlgateConfig, q: _Q, enough: str) -> Guardrail:
    """canary.py's cost_ratio with checks/cost.py's formula: cost per 1,000 = (CPU s x price
    per core-hour + GPU s x price per GPU-hour) / 3600 / rows x 1000 on each side, their
    ratio (+Inf when only the stable's is 0, 1 when both are). A side without
    `mlgate_cpu_seconds_total` fails at once (fail closed, +Inf); before both sides have
    `min_requests` requests and rows scored, inconclusive. Only with `canary.max_cost_ratio`."""
    c = cfg.canary
    assert c.max_cost_ratio is not None
    price_core, price_gpu = cfg.cost.price_per_core_hour, cfg.cost.price_per_gpu_hour

    def per_1000(side: str) -> str:
        cpu = q.inc("mlgate_cpu_seconds_total", side)
        gpu = q.inc("mlgate_gpu_seconds_total", side)
        rows = q.inc("mlgate_score_count", side)
        spent = f"({cpu} * {_num(price_core)} + {gpu} * {_num(price_gpu)})"
        return f"({spent} / {_num(SECONDS_PER_HOUR)} / {rows} * {_num(PER)})"

    canary, stable = per_1000("canary"), per_1000("stable")
    ratio = f"(({canary} / on() ({stable} > 0)) or on() (({canary} > 0) / 0) or on() vector(1))"
    exported = " and on() ".join(
        f"count(mlgate_cpu_seconds_total{{{q.sel(side)}}})" for side in ("canary", "stable")
    )
    rows = q.fewest(q.inc("mlgate_score_count", "canary"), q.inc("mlgate_score_count", "stable"))
    judged = f"({ratio} and on() {enough} and on() ({rows} >= {c.min_requests}))"
    return _bounded(
        "cost-ratio",
        _or_wait(f"(vector(+Inf) unless on() ({exported})) or on() {judged}"),
        c.max_cost_ratio,
    )


# --- the objects ----------------------------------------------------------------------------


def _meta(cfg: MlgateConfig, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cfg.kubernetes.namespace,
        "labels": {APP_LABEL: app_name(cfg), "app.kubernetes.io/part-of": "mlgate"},
    }


def services(cfg: MlgateConfig) -> list[dict[str, Any]]:
    """The stable and canary Services the Rollout's canary strategy points at: the
    controller adds each ReplicaSet's pod-template hash to its selector."""
    name = app_name(cfg)
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(cfg, f"{name}-{role}"),
            "spec": {
                "selector": {APP_LABEL: name},
                "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        }
        for role in ("stable", "canary")
    ]


def analysis_template(cfg: MlgateConfig) -> dict[str, Any]:
    c = cfg.canary
    interval = _window(cfg)
    count = max(1, math.ceil(c.max_wait_s / c.interval_s))
    metrics = [
        {
            "name": g.name,
            "initialDelay": interval,
            "interval": interval,
            "count": count,
            "failureLimit": 0,
            "inconclusiveLimit": count - 1,
            "consecutiveErrorLimit": 2,
            "successCondition": g.condition("success"),
            "failureCondition": g.condition("failure"),
            "provider": {
                "prometheus": {"address": cfg.kubernetes.prometheus_address, "query": g.query}
            },
        }
        for g in guardrails(cfg)
    ]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": _meta(cfg, f"{app_name(cfg)}-guardrails"),
        "spec": {"args": [{"name": "canary-hash"}, {"name": "stable-hash"}], "metrics": metrics},
    }


def exposure(cfg: MlgateConfig) -> str:
    """The pods' `serving.internal_endpoints`. Prometheus scrapes them from another pod, not
    over loopback, so `local` would refuse it: `public` when the NetworkPolicy admits only
    Prometheus and the `client_namespaces` to the port, else `key` (clients from anywhere
    reach the same port as Prometheus; Prometheus then scrapes with an API key)."""
    k = cfg.kubernetes
    return "public" if k.network_policy and k.client_namespaces is not None else "key"


def _container(cfg: MlgateConfig) -> dict[str, Any]:
    s = cfg.serving
    k = cfg.kubernetes
    env: list[dict[str, Any]] = [
        {"name": "MLGATE_SERVING__INTERNAL_ENDPOINTS", "value": exposure(cfg)},
        {
            "name": "MLGATE_API_KEYS",
            "valueFrom": {"secretKeyRef": {"name": k.api_keys_secret, "key": "MLGATE_API_KEYS"}},
        },
    ]
    if cfg.registry.tracking_uri:
        env.append({"name": "MLGATE_REGISTRY__TRACKING_URI", "value": cfg.registry.tracking_uri})
    resources: dict[str, Any] = {
        "requests": {"cpu": k.cpu, "memory": k.memory},
        "limits": {"memory": k.memory},
    }
    if s.gpus > 0:
        resources["limits"]["nvidia.com/gpu"] = s.gpus
        env.append({"name": "MLGATE_SERVING__GPUS", "value": str(s.gpus)})
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    return {
        "name": "mlgate",
        "image": image(cfg),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        "readinessProbe": {**probe, "failureThreshold": 3},
        "startupProbe": {**probe, "failureThreshold": 120},
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }


def rollout(cfg: MlgateConfig) -> dict[str, Any]:
    """The Rollout: canary steps from `canary.steps`, each weight followed by the
    guardrails' analysis (the last step, 100, is the promotion itself)."""
    name = app_name(cfg)
    steps: list[dict[str, Any]] = []
    analysis = {
        "templates": [{"templateName": f"{name}-guardrails"}],
        "args": [
            {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}},
            {"name": "stable-hash", "valueFrom": {"podTemplateHashValue": "Stable"}},
        ],
    }
    for percent in cfg.canary.steps[:-1]:
        steps += [{"setWeight": percent}, {"analysis": analysis}]
    pod_spec: dict[str, Any] = {"containers": [_container(cfg)]}
    if cfg.serving.gpus > 0:
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": _meta(cfg, name),
        "spec": {
            "replicas": min_replicas(cfg),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": {APP_LABEL: name}},
            "template": {
                "metadata": {
                    "labels": {APP_LABEL: name},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
            "strategy": {
                "canary": {
                    "stableService": f"{name}-stable",
                    "canaryService": f"{name}-canary",
                    "steps": steps,
                }
            },
        },
    }


def latency_objective_s(cfg: MlgateConfig) -> float:
    """The tightest latency a request is promised: the smaller of `slo.latency_p95_s` and
    `slo.latency_p99_s`, else `serving.max_latency_ms` (past it the batcher sheds)."""
    bounds = [b for b in (cfg.slo.latency_p95_s, cfg.slo.latency_p99_s) if b is not None]
    return min(bounds) if bounds else cfg.serving.max_latency_ms / 1000.0


def queued_rows_per_replica(cfg: MlgateConfig) -> int:
    """KEDA's target of batcher queue depth per replica, in rows.

    Little's law: rows in a replica's queue (waiting or being scored) = the rate rows arrive
    x the time each spends there. At its planned load, `slo.capacity_rps` x
    `slo.max_capacity_share`, with each row there no longer than the latency objective
    (`latency_objective_s`), a replica holds capacity x share x objective rows: more, and
    its rows wait past the objective, so KEDA adds replicas until the queue per replica is
    back under it. `capacity_rps` is measured in one-row requests (`make bench`); larger
    requests are scored faster per row, so the target errs towards scaling early. Without a
    measured capacity: one full batch per worker (`serving.max_batch_size` x
    `serving.workers`), what the replica scores in its next round of ONNX Runtime calls.
    At least 1."""
    s = cfg.slo
    if s.capacity_rps is None:
        return cfg.serving.max_batch_size * cfg.serving.workers
    return max(1, math.floor(s.capacity_rps * s.max_capacity_share * latency_objective_s(cfg)))


def in_flight_per_replica(cfg: MlgateConfig) -> int:
    """KEDA's target of admitted, unanswered requests per replica: `slo.max_capacity_share`
    of the admission bound (`serving.max_in_flight` per worker), so that replicas are added
    before one sheds with 503s. At least 1."""
    bound = cfg.serving.max_in_flight * cfg.serving.workers
    return max(1, math.floor(bound * cfg.slo.max_capacity_share))


def scaling_queries(cfg: MlgateConfig) -> dict[str, tuple[str, int]]:
    """Each KEDA trigger's PromQL and its target per replica: the batcher's queue depth and
    the in-flight requests of every pod of this model (stable and canary alike), averaged
    over a minute of scrapes (a gauge read at one instant is mostly an empty queue between
    two batches)."""
    model = cfg.registry.model_name

    def total(metric: str) -> str:
        return f'(sum(avg_over_time({metric}{{model_name="{model}"}}[1m])) or vector(0))'

    return {
        "queue-depth": (total("mlgate_batcher_queued_rows"), queued_rows_per_replica(cfg)),
        "in-flight": (total("mlgate_in_flight_requests"), in_flight_per_replica(cfg)),
    }


def scaled_object(cfg: MlgateConfig) -> dict[str, Any]:
    """KEDA on the batcher's queue depth (and the in-flight requests) per replica, each an
    AverageValue target (replicas = ceil(total / target), the larger of the two); the floor
    from Little's law (`min_replicas`)."""
    name = app_name(cfg)
    floor = min_replicas(cfg)
    triggers = [
        {
            "type": "prometheus",
            "name": trigger,
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": cfg.kubernetes.prometheus_address,
                "query": query,
                "threshold": str(target),
            },
        }
        for trigger, (query, target) in scaling_queries(cfg).items()
    ]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(cfg, name),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
                "name": name,
            },
            "minReplicaCount": floor,
            "maxReplicaCount": cfg.kubernetes.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": triggers,
        },
    }


def network_policy(cfg: MlgateConfig) -> dict[str, Any]:
    """Ingress to the pods: their one port from the Prometheus pods and from the clients
    (`kubernetes.client_namespaces`; None: from anywhere), nothing else. `/metrics` and
    `/predict` share that port and a NetworkPolicy sees ports, not paths, so what keeps the
    operator endpoints from the clients is the pods' `internal_endpoints` (`_exposure`)."""
    k = cfg.kubernetes
    port = [{"protocol": "TCP", "port": PORT}]
    scrapers = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": k.prometheus_namespace}
        },
        "podSelector": {"matchLabels": dict(k.prometheus_pod_labels)},
    }
    clients: dict[str, Any] = {"ports": port}
    if k.client_namespaces is not None:
        clients["from"] = [
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "In",
                            "values": list(k.client_namespaces),
                        }
                    ]
                }
            }
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(cfg, app_name(cfg)),
        "spec": {
            "podSelector": {"matchLabels": {APP_LABEL: app_name(cfg)}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [scrapers], "ports": port}, clients],
        },
    }


def render_manifests(cfg: MlgateConfig) -> list[dict[str, Any]]:
    """Every object, in the order `kubectl apply` should see them."""
    policy = [network_policy(cfg)] if cfg.kubernetes.network_policy else []
    return [*policy, *services(cfg), analysis_template(cfg), rollout(cfg), scaled_object(cfg)]


def file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


class _NoAliases(yaml.SafeDumper):
    """Writes an object used twice (a probe, a port list) out again rather than as a YAML
    anchor and alias: the manifests read as they are applied."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_NoAliases, sort_keys=False, width=100)


# --- offline validation ---------------------------------------------------------------------


@cache
def _crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMA_DIR / _CRDS[(api_version, kind)]).read_text())
    version = api_version.split("/", 1)[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{kind} {api_version} not in {_CRDS[(api_version, kind)]}")


def validate_manifest(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one object (empty: valid), offline."""
    import jsonschema

    # Round trip through JSON: what the API server would receive (no tuples, no Python types).
    obj = json.loads(json.dumps(obj))
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    errors: list[str] = []
    if key in _CRDS:
        validator = jsonschema.Draft7Validator(_crd_schema(*key))
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(p) for p in err.absolute_path) or "(root)"
            errors.append(f"{key[1]} {where}: {err.message}")
        if key[1] == "Rollout" and not errors:
            deployment = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": obj["metadata"],
                "spec": {
                    "selector": obj["spec"]["selector"],
                    "template": obj["spec"]["template"],
                },
            }
            errors += [f"Rollout pod template: {e}" for e in _builtin_errors(deployment)]
        return errors
    return _builtin_errors(obj)


def _builtin_errors(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "(root)"
        return [f"{obj.get('kind')} {where}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{obj.get('kind')}: no schema ({err})"]
    return []
