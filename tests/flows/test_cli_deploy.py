"""`mlgate deploy render`, in-process through typer's CliRunner: the files it writes validate
offline (checks/kubernetes.validate_manifest), a GPU config renders the CUDA image, and
another target or a config without the capacity figures is refused with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from checks.kubernetes import BENTO_GPU, validate_manifest
from flows.cli import EXIT_USAGE, app
from tests.conftest import write_config

pytestmark = pytest.mark.fast

SIZED = {"slo": {"capacity_rps": 50.0}, "kubernetes": {"expected_peak_rps": 120.0}}


def _render(config: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["deploy", "render", "--config", str(config), "--output", str(out), *extra]
    )
    return result.exit_code, result.output


def test_render_writes_valid_manifests(tmp_path: Path) -> None:
    config = write_config(tmp_path, serving={"gpus": 1}, **SIZED)
    code, output = _render(config, tmp_path / "k8s", "--target", "kubernetes")
    assert code == 0, output
    files = sorted((tmp_path / "k8s").glob("*.yaml"))
    kinds = []
    for path in files:
        obj = yaml.safe_load(path.read_text())
        assert validate_manifest(obj) == [], path.name
        assert path.name in output.replace("\n", "")
        kinds.append(obj["kind"])
    assert sorted(kinds) == [
        "AnalysisTemplate",
        "NetworkPolicy",
        "Rollout",
        "ScaledObject",
        "Service",
        "Service",
    ]
    rollout = yaml.safe_load(next(p for p in files if p.name.startswith("rollout-")).read_text())
    container = rollout["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith(f"{BENTO_GPU}:")
    # 120 rps over 50 rps per replica at 80 %: 3 replicas.
    scaled = yaml.safe_load(
        next(p for p in files if p.name.startswith("scaledobject-")).read_text()
    )
    assert scaled["spec"]["minReplicaCount"] == 3
    # Clients from anywhere share the port with Prometheus: the pods' /metrics needs a key.
    assert "needs an API key" in output.replace("\n", " ")


def test_confined_clients_leave_metrics_public(tmp_path: Path) -> None:
    sized = {**SIZED, "kubernetes": {"expected_peak_rps": 120.0, "client_namespaces": ["shop"]}}
    config = write_config(tmp_path, **sized)
    code, output = _render(config, tmp_path / "k8s")
    assert code == 0, output
    assert "API key" not in output
    policy = yaml.safe_load(next((tmp_path / "k8s").glob("networkpolicy-*.yaml")).read_text())
    assert validate_manifest(policy) == []


def test_other_targets_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, **SIZED)
    code, output = _render(config, tmp_path / "out", "--target", "nomad")
    assert code == EXIT_USAGE
    assert "unknown target 'nomad'" in output
    assert not (tmp_path / "out").exists()


def test_missing_capacity_is_named(tmp_path: Path) -> None:
    config = write_config(tmp_path, kubernetes={"expected_peak_rps": 120.0})
    code, output = _render(config, tmp_path / "out")
    assert code == EXIT_USAGE
    assert "slo.capacity_rps" in output
    assert not (tmp_path / "out").exists()
