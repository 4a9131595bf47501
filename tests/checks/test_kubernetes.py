"""The Kubernetes manifests (checks/kubernetes.py): every object validates offline against the
vendored CRD schemas and kubernetes-validate, and a broken one is refused; the GPU variant;
the Rollout's steps; and the AnalysisTemplate's queries under `promtool test rules`, each
guardrail's success and failure conditions turned into alerting rules over synthetic series
of the service's metric names, agreeing with checks/canary.py on the same numbers.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from checks.canary import GUARDRAILS, Histogram, VariantWindow, check_canary_step
from checks.kubernetes import (
    BENTO_CPU,
    BENTO_GPU,
    KubernetesRenderError,
    analysis_template,
    guardrails,
    min_replicas,
    render_manifests,
    rollout,
    scaled_object,
    validate_manifest,
)
from checks.result import GateStatus
from models.config import MlgateConfig, load_config
from services.metrics import LATENCY_BUCKETS_S, SCORE_BUCKETS
from tests.conftest import write_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")


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
        "Service",
        "Service",
        "AnalysisTemplate",
        "Rollout",
        "ScaledObject",
    ]
    for obj in objects:
        assert validate_manifest(obj) == [], obj["kind"]


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


# --- the analysis queries under promtool -----------------------------------------------------

STEP_S = 15
WINDOW_STEPS = 4  # canary.interval_s 60 s: four 15 s scrapes
CANARY, STABLE = "c4n4ry", "st4bl3"


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _side_series(
    model: str, side: str, ok: int, err: int, latency: list[int], scores: list[int]
) -> list[dict[str, str]]:
    """Counters growing by these amounts every scrape (per bucket, not cumulative)."""
    base = f'model_name="{model}",rollouts_pod_template_hash="{side}"'
    out = [
        {"series": f"mlgate_model_info{{{base}}}", "values": "1+0x40"},
        {"series": f'mlgate_requests_total{{{base},status="200"}}', "values": f"0+{ok}x40"},
        {"series": f'mlgate_requests_total{{{base},status="500"}}', "values": f"0+{err}x40"},
    ]
    for metric, bounds, counts in (
        ("mlgate_request_latency_seconds", (*LATENCY_BUCKETS_S, float("inf")), latency),
        ("mlgate_score", (*SCORE_BUCKETS, float("inf")), scores),
    ):
        assert len(bounds) == len(counts)
        cumulative = 0
        for bound, c in zip(bounds, counts, strict=True):
            cumulative += c
            out.append(
                {
                    "series": f'{metric}_bucket{{{base},le="{_le(bound)}"}}',
                    "values": f"0+{cumulative}x40",
                }
            )
        out.append({"series": f"{metric}_count{{{base}}}", "values": f"0+{cumulative}x40"})
    return out


def _window(side: str, ok: int, err: int, latency: list[int], scores: list[int]) -> VariantWindow:
    n = WINDOW_STEPS
    return VariantWindow(
        variant=side,
        version="1",
        seconds=STEP_S * n,
        requests=(ok + err) * n,
        server_errors=err * n,
        latency=Histogram((*LATENCY_BUCKETS_S, float("inf")), tuple(float(c * n) for c in latency)),
        scores=Histogram((*SCORE_BUCKETS, float("inf")), tuple(float(c * n) for c in scores)),
    )


def _latency(fast: int, slow: int = 0) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    counts[3] = fast  # <= 5 ms
    counts[7] = slow  # 50-100 ms
    return counts


def _scores(low: int, high: int, invalid: int = 0) -> list[int]:
    counts = [0] * (len(SCORE_BUCKETS) + 1)
    counts[5] = low  # 0.2-0.25
    counts[16] = high  # 0.75-0.8
    counts[-1] = invalid  # above 1 or NaN
    return counts


# (stable, canary) per-scrape numbers: ok, errors, latency buckets, score buckets.
SCENARIOS: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "passing": (
        (99, 1, _latency(100), _scores(70, 30)),
        (99, 1, _latency(100), _scores(70, 30)),
    ),
    "failing": (
        (99, 1, _latency(100), _scores(70, 30)),
        (70, 30, _latency(40, 60), _scores(20, 78, invalid=2)),
    ),
    "too-little-traffic": (
        (10, 0, _latency(10), _scores(7, 3)),
        (10, 0, _latency(10), _scores(7, 3)),
    ),
    # Below min_requests, but errors and a score shift that chance would not give: failures.
    "early-failure": (
        (10, 0, _latency(10), _scores(7, 3)),
        (5, 15, _latency(20), _scores(0, 20)),
    ),
}
# checks/canary.py's guardrail for each AnalysisTemplate metric.
CANARY_NAMES = {
    "metrics-readable": "metrics",
    "invalid-outputs": "invalid_outputs",
    "error-rate": "error_rate",
    "latency-p99": "latency_p99",
    "score-psi": "score_psi",
    "min-requests": "min_requests",
}


def _alert(name: str, which: str) -> str:
    return f"{name.replace('-', '_')}_{which}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_analysis_queries_agree_with_canary_gate(tmp_path: Path, scenario: str) -> None:
    # Like tests/checks/test_slo_rules_promtool.py: no promtool is an error, never a skip.
    if PROMTOOL is None:
        pytest.fail("promtool is not installed; on Debian or Ubuntu: apt-get install -y prometheus")
    cfg = _cfg(tmp_path)
    assert cfg.canary.interval_s == STEP_S * WINDOW_STEPS
    stable_numbers, canary_numbers = SCENARIOS[scenario]
    result = check_canary_step(
        _window("stable", *stable_numbers),
        _window("canary", *canary_numbers),
        cfg.canary,
        step_percent=25,
    )
    # With both sides readable every guardrail has its row, in GUARDRAILS order.
    assert len(result.checks) == len(GUARDRAILS)
    statuses = {g: row.status for g, row in zip(GUARDRAILS, result.checks, strict=True)}

    rules = []
    tests = []
    for g in guardrails(cfg):
        query = g.query.replace("{{args.canary-hash}}", CANARY).replace(
            "{{args.stable-hash}}", STABLE
        )
        for which, (op, bound) in (("success", g.success), ("failure", g.failure)):
            rules.append(
                {
                    "alert": _alert(g.name, which),
                    "expr": f"({query}) {op} {bound!r}",
                    "labels": {"guardrail": g.name},
                }
            )
        expected = statuses[CANARY_NAMES[g.name]]
        for which, status in (("success", GateStatus.PASS), ("failure", GateStatus.FAIL)):
            tests.append(
                {
                    "eval_time": "5m",
                    "alertname": _alert(g.name, which),
                    "exp_alerts": [{"exp_labels": {"guardrail": g.name}}]
                    if expected is status
                    else [],
                }
            )
    model = cfg.registry.model_name
    series = [
        *_side_series(model, STABLE, *stable_numbers),
        *_side_series(model, CANARY, *canary_numbers),
    ]
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "guardrails", "rules": rules}]})
    )
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": f"{STEP_S}s",
                "tests": [
                    {"interval": f"{STEP_S}s", "input_series": series, "alert_rule_test": tests}
                ],
            }
        )
    )
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"canary.py: {statuses}\n{run.stdout}\n{run.stderr}"
    # The scenarios do what their names say, so the agreement is not trivially all-waiting.
    seen = {
        "passing": {GateStatus.PASS},
        "failing": {GateStatus.FAIL, GateStatus.PASS},
        "too-little-traffic": {GateStatus.INCONCLUSIVE, GateStatus.PASS},
        "early-failure": {GateStatus.FAIL, GateStatus.INCONCLUSIVE, GateStatus.PASS},
    }[scenario]
    assert set(statuses.values()) == seen
    assert result.status is {
        "passing": GateStatus.PASS,
        "too-little-traffic": GateStatus.INCONCLUSIVE,
    }.get(scenario, GateStatus.FAIL)


def test_analysis_template_counts_and_limits(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    metrics = analysis_template(cfg)["spec"]["metrics"]
    assert {m["name"] for m in metrics} == set(CANARY_NAMES)
    for m in metrics:
        assert m["failureLimit"] == 0
        assert m["inconclusiveLimit"] == m["count"] - 1
