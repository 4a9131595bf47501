"""`mlgate stack deploy`: mlgate's deployments on the team Prefect server's work pool, with
flow-run heartbeats and the automations that deal with a worker dying mid-run.

Applies `prefect.yaml`'s deployments (training, monitoring) and `mlgate-reconcile` to
`orchestration.work_pool`. Their code runs from this repository's directory on the workers
(a `set_working_directory` pull step: the workers share this checkout, or have it at the
same path). Each run gets the config's absolute path as its `config_path` parameter (the
workers need that file at that path too), the config's crons, and the team servers'
addresses as the deployer resolves them (`run_env`). Secrets never go into a deployment
(the API shows job variables): the MLflow password, the lock DSN and Prefect's auth string
reach a run through the config file or its worker's environment (`mlgate stack up` starts
the workers with the caller's environment, MLGATE_ settings included). When the stack starts
the workers with warm processes, the deployments' command forks each run from its worker's
warm process (`job_variables`, flows/warm_start.py).

A worker that dies takes its flow-run process with it and Prefect marks nothing (see
`flows/reconcile.py` for the reasoning). The automations created here, replaced on every
deploy:
- silent runs: a run of these deployments that sent a heartbeat and then neither another
  one nor a final state within `orchestration.crash_after_s` is marked Crashed (Prefect's
  zombie recipe; runs send a heartbeat every `orchestration.heartbeat_s`, set through the
  deployments' job variables);
- runs that never start: Pending, then not Running within `START_GRACE_S` (the worker died
  between taking the run and starting it): Crashed too;
- crashed training: a training run's Crashed event runs `mlgate-reconcile` at once, which
  submits it again within `orchestration.crash_resubmits` (it also runs every ten minutes,
  in case an event was missed).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from flows.deployments import (
    RECONCILE_NAME,
    REPO,
    TRAINING_NAME,
    DeploymentSpec,
    deployment_specs,
)
from models.config import MlgateConfig, OrchestrationConfig, env_override_name
from services.stack import warm_socket_dir

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
SILENT_AUTOMATION = "mlgate: crash runs whose heartbeat stopped"
NEVER_STARTED_AUTOMATION = "mlgate: crash runs that never started"
RESUBMIT_AUTOMATION = "mlgate: reconcile crashed training runs"
# A run's process imports mlflow, sklearn and Great Expectations before it reports Running:
# seconds on an idle host, a minute on a busy one. Ten minutes is never a healthy start.
START_GRACE_S = 600
RECONCILE = DeploymentSpec(
    name=RECONCILE_NAME,
    entrypoint="flows/reconcile.py:reconcile_flow",
    description="Resubmit crashed training runs (bounded); check aliases after a crash.",
    tags=("mlgate",),
    cron="*/10 * * * *",
)
FINAL_EVENTS = frozenset(
    f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
)


class DeployError(RuntimeError):
    """The deployments cannot be applied; the message says why."""


@dataclass(frozen=True)
class Deployed:
    """What `deploy_team` applied: deployment and automation names with their ids."""

    deployments: dict[str, str]
    automations: dict[str, str]


@contextlib.contextmanager
def team_prefect(orchestration: OrchestrationConfig) -> Iterator[None]:
    """Prefect's client settings pointed at the config's server and auth string for this
    block, whatever the process's environment or import order."""
    import prefect.settings
    from prefect.settings import temporary_settings

    from flows.runtime import prefect_client_settings

    settings = prefect_client_settings(orchestration)
    if not settings:
        raise DeployError(
            "orchestration.api_url is not set: team mode's deployments need a Prefect server "
            "(`mlgate stack env` prints the settings of the stack started here)"
        )
    updates = {getattr(prefect.settings, key): value for key, value in settings.items()}
    with temporary_settings(updates=updates):
        yield


def team_specs(cfg: MlgateConfig) -> list[DeploymentSpec]:
    return [*deployment_specs(cfg.monitor), RECONCILE]


def deploy_team(cfg: MlgateConfig, config_path: Path, *, schedules_active: bool = True) -> Deployed:
    """Create or update the deployments and automations on the config's Prefect server.
    `schedules_active=False` pauses the schedules (runs still start on demand)."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    orch = cfg.orchestration
    config = str(Path(config_path).resolve())
    with team_prefect(orch), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(orch.work_pool)
        except ObjectNotFound:
            raise DeployError(
                f"the Prefect server has no work pool {orch.work_pool!r}: its workers create "
                "it when they start (`mlgate stack up`)"
            ) from None
        ids: dict[str, UUID] = {}
        for spec in team_specs(cfg):
            flow: Any = Flow.from_source(source=str(REPO), entrypoint=spec.entrypoint)
            deployment = flow.to_deployment(
                name=spec.name,
                cron=spec.cron,
                paused=not schedules_active,
                parameters={"config_path": config},
                description=spec.description,
                tags=[*spec.tags, cfg.registry.model_name],
                work_pool_name=orch.work_pool,
                job_variables=job_variables(cfg),
            )
            ids[spec.name] = deployment.apply()
        automations = {
            a.name: str(_upsert_automation(client, a)) for a in crash_automations(cfg, config, ids)
        }
    return Deployed({name: str(i) for name, i in ids.items()}, automations)


def job_variables(cfg: MlgateConfig) -> dict[str, Any]:
    """What a deployment sets for its runs on the process work pool: their environment and,
    when the stack starts the workers with warm processes, the command that forks a run from
    its worker's warm process (flows/warm_client.py; it starts cold where there is none).
    The command names this interpreter: the stack's workers run on it. Workers of your own
    get Prefect's default command."""
    variables: dict[str, Any] = {"env": run_env(cfg)}
    if cfg.stack.prefect.start and cfg.stack.prefect.warm_start:
        sockets = warm_socket_dir(cfg.stack, cfg.registry)
        variables["command"] = shlex.join(
            [sys.executable, "-m", "flows.warm_client", "--socket-dir", str(sockets)]
        )
    return variables


def run_env(cfg: MlgateConfig) -> dict[str, str]:
    """The environment a deployment adds to its runs: the heartbeat, and the team servers'
    addresses as this config resolves them (from the file or the deployer's MLGATE_
    overrides), so runs use the servers the deployer sees. Never a secret: job variables
    are readable through the API; passwords reach runs through the config file or their
    worker's environment."""
    env = {HEARTBEAT_ENV: str(cfg.orchestration.heartbeat_s)}
    addresses = {
        ("registry", "tracking_uri"): cfg.registry.tracking_uri,
        ("orchestration", "api_url"): cfg.orchestration.api_url,
        ("dask", "scheduler_address"): cfg.dask.scheduler_address,
    }
    for path, value in addresses.items():
        if value:
            env[env_override_name(*path)] = value
    return env


def crash_automations(
    cfg: MlgateConfig, config_path: str, ids: dict[str, UUID]
) -> list[AutomationCore]:
    """The three automations of the module docstring, scoped to these deployments' runs."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    runs = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    ours = ResourceSpecification(
        {
            "prefect.resource.role": "deployment",
            "prefect.resource.id": [f"prefect.deployment.{i}" for i in ids.values()],
        }
    )
    training = ResourceSpecification(
        {
            "prefect.resource.role": "deployment",
            "prefect.resource.id": f"prefect.deployment.{ids[TRAINING_NAME]}",
        }
    )
    orch = cfg.orchestration

    def crash_when_silent(after: str, expect: set[str], within_s: int, why: str) -> Any:
        return dict(
            trigger=EventTrigger(
                after={after},
                expect=expect | FINAL_EVENTS,
                match=runs,
                match_related=ours,
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=within_s),
            ),
            # Not forced: a run that reached a final state meanwhile keeps it.
            actions=[
                ChangeFlowRunState(name=None, state=StateType.CRASHED, message=why, force=False)
            ],
        )

    return [
        AutomationCore(
            name=SILENT_AUTOMATION,
            description="A run whose process died (with its worker) stops sending heartbeats.",
            **crash_when_silent(
                "prefect.flow-run.heartbeat",
                {"prefect.flow-run.heartbeat"},
                orch.crash_after_s,
                f"no heartbeat for {orch.crash_after_s} s: its worker or process died",
            ),
        ),
        AutomationCore(
            name=NEVER_STARTED_AUTOMATION,
            description="A worker that died between taking a run and starting it.",
            **crash_when_silent(
                "prefect.flow-run.Pending",
                {"prefect.flow-run.Running"},
                START_GRACE_S,
                f"Pending for {START_GRACE_S} s without starting: its worker died",
            ),
        ),
        AutomationCore(
            name=RESUBMIT_AUTOMATION,
            description="A crashed training run is submitted again by mlgate-reconcile.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"},
                match=runs,
                match_related=training,
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=ids[RECONCILE_NAME],
                    parameters={"config_path": config_path},
                    job_variables=None,
                )
            ],
        ),
    ]


def _upsert_automation(client: Any, automation: AutomationCore) -> UUID:
    """One automation of that name: updated in place, extra copies deleted."""
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        return UUID(str(client.create_automation(automation)))
    keep, *extra = existing
    client.update_automation(keep.id, automation)
    for stale in extra:
        client.delete_automation(stale.id)
    return UUID(str(keep.id))
