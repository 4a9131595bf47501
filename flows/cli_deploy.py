"""The `mlgate deploy` commands: the serving tier rendered for a target platform.

`render --target kubernetes --output DIR` writes one YAML file per object
(`checks/kubernetes.py` builds them: NetworkPolicy, Services, AnalysisTemplate, Rollout,
ScaledObject), each validated offline first against the vendored CRD schemas and
Kubernetes' own; it exits 2 for another target or a config that lacks what the manifests
need, and 1 when an object does not validate (nothing is written then). It says when the
pods' `/metrics` will need an API key (`checks.kubernetes.exposure`), as Prometheus must then
scrape with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    EXIT_ERROR,
    EXIT_USAGE,
    ConfigOpt,
    console,
    exit_error,
    load_config_or_exit,
)

TARGETS = ("kubernetes",)

deploy_app = typer.Typer(
    help="Deployment manifests for the serving tier, rendered from the config.",
    no_args_is_help=True,
)


@deploy_app.command()
def render(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write into.")],
    target: Annotated[str, typer.Option("--target", help="Platform: kubernetes.")] = "kubernetes",
    config: ConfigOpt = Path("mlgate.yaml"),
) -> None:
    """Write the serving tier's manifests for TARGET into OUTPUT, one file per object."""
    if target not in TARGETS:
        raise exit_error(
            f"unknown target {target!r}: mlgate deploy render knows {', '.join(TARGETS)}",
            EXIT_USAGE,
        )
    from checks.kubernetes import (
        KubernetesRenderError,
        exposure,
        file_name,
        render_manifests,
        to_yaml,
        validate_manifest,
    )

    cfg = load_config_or_exit(config)
    try:
        objects = render_manifests(cfg)
    except KubernetesRenderError as err:
        raise exit_error(str(err), EXIT_USAGE) from None
    problems = [p for obj in objects for p in validate_manifest(obj)]
    if problems:
        raise exit_error("rendered manifests do not validate: " + "; ".join(problems), EXIT_ERROR)
    output.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        path = output / file_name(obj)
        path.write_text(to_yaml(obj))
        console.print(f"wrote [bold]{path}[/]: {obj['kind']} {obj['metadata']['name']}")
    console.print(
        f"{len(objects)} objects for namespace {cfg.kubernetes.namespace}: "
        f"kubectl apply --server-side -n {cfg.kubernetes.namespace} -f {output}"
    )
    if exposure(cfg) == "key":
        console.print(
            "clients may reach the pods' port (kubernetes.client_namespaces unset), so their "
            "/metrics needs an API key: give Prometheus one (mlgate keys create prometheus; "
            "a bearer credentials_file in its scrape job)"
        )
