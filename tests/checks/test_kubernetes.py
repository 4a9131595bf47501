"""The Kubernetes manifests (checks/kubernetes.py): every object validates offline against the
vendored CRD schemas and kubernetes-validate, and a broken one is refused; the GPU variant;
the Rollout's steps; the scaling targets; the NetworkPolicy and the exposure it allows; the
cost guardrail only when judged. The PromQL itself runs under promtool in
test_kubernetes_promtool.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from checks.kubernetes import (
    BENTO_CPU,
    BENTO_GPU,
    PORT,
    KubernetesRenderError,
    analysis_template,
    exposure,
    guardrails,
    in_flight_per_replica,
    min_replicas,
    network_policy,
    queued_rows_per_replica,
    render_manifests,
    rollout,
    scaled_object,
    to_yaml,
    validate_manifest,
)
from models.config import MlgateConfig, load_config
from tests.conftest import write_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **overrides: dict[str, Any]) -> MlgateConfig:
    sections: dict[str, dict[str, Any]] = {
        "slo": {"capacity_rps": 100.0},
        "kubernetes": {"expected_peak_rps": 250.0, "image_registry": "registry.example/ml"},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return load_config(write_config(tmp_path, **sections))


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return container


def test_every_object_validates(tmp_path: Path) -> None:
    objects = render_manifests(_cfg(tmp_path))
    assert [o["kind"] for o in objects] == [
        "NetworkPolicy",
        "Service",
        "Service",
        "AnalysisTemplate",
        "Rollout",
        "ScaledObject",
    ]
    for obj in objects:
        assert validate_manifest(obj) == [], obj["kind"]
        # Written out as applied: no YAML anchors for objects used twice (probes, ports).
        text = to_yaml(obj)
        assert "&id" not in text and yaml.safe_load(text) == obj


def test_gpu_config_gives_cuda_image_and_gpu_limit(tmp_path: Path) -> None:
    cpu = _container(rollout(_cfg(tmp_path)))
    assert cpu["image"] == f"registry.example/ml/{BENTO_CPU}:latest"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    gpu_obj = rollout(_cfg(tmp_path, serving={"gpus": 2}))
    assert validate_manifest(gpu_obj) == []
    gpu = _container(gpu_obj)
    assert gpu["image"] == f"registry.example/ml/{BENTO_GPU}:latest"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 2
    # The bento names are the bentofiles' own.
    for name, bentofile in ((BENTO_CPU, "bentofile.yaml"), (BENTO_GPU, "bentofile-gpu.yaml")):
        assert yaml.safe_load((ROOT / "services" / bentofile).read_text())["name"] == name
    keys = [e for e in gpu["env"] if e["name"] == "MLGATE_API_KEYS"]
    assert keys[0]["valueFrom"]["secretKeyRef"]["name"] == "mlgate-api-keys"
    assert "value" not in keys[0]


def test_rollout_steps_are_the_canary_steps(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, canary={"steps": [10, 30, 100]})
    steps = rollout(cfg)["spec"]["strategy"]["canary"]["steps"]
    weights = [s["setWeight"] for s in steps if "setWeight" in s]
    # The last step, 100, is the promotion that follows the last analysis.
    assert [*weights, 100] == list(cfg.canary.steps)
    assert all("analysis" in s for s in steps[1::2])


def test_replica_floor_is_littles_law(tmp_path: Path) -> None:
    # 250 rps over 100 rps per replica at 80 % utilisation: 3.125 busy replicas -> 4.
    cfg = _cfg(tmp_path)
    assert min_replicas(cfg) == 4
    assert scaled_object(cfg)["spec"]["minReplicaCount"] == 4
    with pytest.raises(KubernetesRenderError, match="max_replicas"):
        min_replicas(_cfg(tmp_path, kubernetes={"expected_peak_rps": 5000.0}))
    with pytest.raises(KubernetesRenderError, match="capacity_rps"):
        min_replicas(load_config(write_config(tmp_path)))


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        ("ScaledObject", ("spec", "minReplicaCount"), "four", "is not of type 'integer'"),
        ("Rollout", ("spec", "replicas"), "4", "is not of type 'integer'"),
        ("AnalysisTemplate", ("spec", "metrics"), {"name": "x"}, "is not of type 'array'"),
        ("Service", ("spec", "ports"), [{"port": "http"}], "port"),
        ("NetworkPolicy", ("spec", "policyTypes"), "Ingress", "is not of type 'array'"),
    ],
)
def test_a_broken_manifest_is_refused(
    tmp_path: Path, kind: str, path: tuple[str, ...], value: Any, message: str
) -> None:
    obj = copy.deepcopy(next(o for o in render_manifests(_cfg(tmp_path)) if o["kind"] == kind))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = validate_manifest(obj)
    assert errors and message in " ".join(errors)


def test_rollout_pod_template_is_checked_as_kubernetes_pod(tmp_path: Path) -> None:
    obj = rollout(_cfg(tmp_path))
    # A misspelt field: the Rollout CRD's schema lets unknown fields through, Kubernetes'
    # strict schema of a pod template does not.
    _container(obj)["readinesProbe"] = _container(obj)["readinessProbe"]
    errors = validate_manifest(obj)
    assert errors and all("Rollout pod template" in e for e in errors), errors


GUARDRAIL_NAMES = [
    "metrics-readable",
    "invalid-outputs",
    "error-rate",
    "latency-p99",
    "score-psi",
    "min-requests",
]


def test_analysis_template_counts_and_limits(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    metrics = analysis_template(cfg)["spec"]["metrics"]
    assert [m["name"] for m in metrics] == GUARDRAIL_NAMES
    for m in metrics:
        assert m["failureLimit"] == 0
        assert m["inconclusiveLimit"] == m["count"] - 1


def test_cost_ratio_is_a_metric_only_when_judged(tmp_path: Path) -> None:
    # canary.max_cost_ratio unset: canary.py reports the ratio without judging it.
    assert "cost-ratio" not in [g.name for g in guardrails(_cfg(tmp_path))]
    cfg = _cfg(
        tmp_path,
        canary={"max_cost_ratio": 1.25},
        cost={"price_per_core_hour": 0.07, "price_per_gpu_hour": 2.5},
    )
    template = analysis_template(cfg)
    assert validate_manifest(template) == []
    cost = next(m for m in template["spec"]["metrics"] if m["name"] == "cost-ratio")
    assert cost["successCondition"] == "result[0] <= 1.25"
    assert cost["failureCondition"] == "result[0] > 1.25"
    query = cost["provider"]["prometheus"]["query"]
    for part in ("mlgate_cpu_seconds_total", "mlgate_gpu_seconds_total", "* 0.07", "* 2.5"):
        assert part in query


def test_scaling_targets_from_littles_law(tmp_path: Path) -> None:
    # 100 rps x 80 % x the 50 ms p95 objective: 4 rows queued per replica.
    cfg = _cfg(tmp_path)
    assert queued_rows_per_replica(cfg) == 4
    # The tighter objective counts: a p99 of 20 ms under a p95 of 50 ms.
    assert queued_rows_per_replica(_cfg(tmp_path, slo={"latency_p99_s": 0.02})) == 1
    faster = _cfg(tmp_path, slo={"capacity_rps": 2000.0, "latency_p95_s": 0.1})
    assert queued_rows_per_replica(faster) == 160
    # No measured capacity: one full batch per worker.
    unmeasured = load_config(write_config(tmp_path, serving={"max_batch_size": 64, "workers": 3}))
    assert queued_rows_per_replica(unmeasured) == 192
    # In flight: 80 % of the admission bound, max_in_flight per worker.
    assert in_flight_per_replica(_cfg(tmp_path, serving={"max_in_flight": 50, "workers": 2})) == 80
    triggers = scaled_object(cfg)["spec"]["triggers"]
    assert [t["name"] for t in triggers] == ["queue-depth", "in-flight"]
    queue = triggers[0]["metadata"]
    assert queue["threshold"] == "4"
    assert 'mlgate_batcher_queued_rows{model_name="churn"}' in queue["query"]
    assert all(t["metricType"] == "AverageValue" for t in triggers)


def test_network_policy_admits_prometheus_and_the_clients(tmp_path: Path) -> None:
    # Clients from anywhere: the port is open to them, so the operator endpoints need a key.
    anywhere = _cfg(tmp_path)
    rules = network_policy(anywhere)["spec"]["ingress"]
    scrapers = rules[0]["from"][0]
    assert scrapers["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert scrapers["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "from" not in rules[1] and rules[1]["ports"] == [{"protocol": "TCP", "port": PORT}]
    assert exposure(anywhere) == "key"
    env = {e["name"]: e.get("value") for e in _container(rollout(anywhere))["env"]}
    assert env["MLGATE_SERVING__INTERNAL_ENDPOINTS"] == "key"

    confined = _cfg(
        tmp_path,
        kubernetes={
            "client_namespaces": ["shop", "ingress-nginx"],
            "prometheus_namespace": "observability",
            "prometheus_pod_labels": {"app": "prom"},
        },
    )
    policy = network_policy(confined)
    assert validate_manifest(policy) == []
    scrapers, clients = (rule["from"][0] for rule in policy["spec"]["ingress"])
    assert scrapers["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == (
        "observability"
    )
    assert scrapers["podSelector"]["matchLabels"] == {"app": "prom"}
    assert clients["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "shop",
        "ingress-nginx",
    ]
    assert exposure(confined) == "public"
    # Without the policy nothing confines the port: a key again.
    off = _cfg(tmp_path, kubernetes={"client_namespaces": ["shop"], "network_policy": False})
    assert exposure(off) == "key"
    assert "NetworkPolicy" not in [o["kind"] for o in render_manifests(off)]
