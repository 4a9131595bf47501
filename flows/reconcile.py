"""`reconcile_flow`: a training run that crashed with its worker is submitted again, a
bounded number of times, and the registry is checked for a half-recorded alias move.

What happens when a worker dies mid-run, and why:

- Prefect does not notice. The server keeps the state the run last reported (Running); the
  flow-run process was the worker's child and died with it, so nobody reports Crashed, and
  a flow's `retries` never apply (they retry an exception inside a living process).
- Detection is Prefect's documented zombie recipe, set up by `mlgate stack deploy`
  (`flows/deploy.py`): every deployment run sends a heartbeat event every
  `orchestration.heartbeat_s`, and a proactive automation on the server marks a run Crashed
  when `orchestration.crash_after_s` pass without one (or without a final state). It is
  judged on the server from events, so it also works when the worker's whole host is gone;
  a reconcile that checked the run's recorded pid could not (the pid lives on the worker's
  host, and pids are reused).
- Only training is resubmitted. A crashed monitoring window is replaced by the next hourly
  one; a training run was started once (weekly, or by drift, after which the trigger's
  cooldown suppresses another), so losing it means no retrain for a long while. Each
  resubmission carries an attempt tag; past `orchestration.crash_resubmits` the run is
  reported (notification, run log) and left alone. The Crashed event starts this flow at
  once through a second automation, and its own schedule is the safety net; resubmitting
  uses an idempotency key per crashed run, so concurrent reconciles submit it once.
- Resubmitting is safe: the training flow writes the registry only at its end, and moves
  aliases by compare-and-set against the champion it judged, so a crashed run leaves at most
  an MLflow run, or a version that holds no alias; the new run judges against the champion
  as it is now. An alias move is set first and recorded in the audit experiment right
  after, so a kill between the two would leave an unrecorded holder: after a crash the flow
  compares each alias with its recorded history and reports a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows import alias_moves, registry
from flows.deployments import TRAINING_DEPLOYMENT
from models.config import MlgateConfig, load_config
from models.registry_layout import CHALLENGER_ALIAS, CHAMPION_ALIAS

# Tags of a flow run: the attempt it is (the first run has none), the crashed run it
# replaces, and "this crashed run has been dealt with".
ATTEMPT_TAG = "mlgate.attempt:"
RESUBMIT_OF_TAG = "mlgate.resubmit-of:"
RECONCILED_TAG = "mlgate.reconciled"
# Crashed runs older than this are left alone: the scheduled reconcile (every few minutes)
# has seen them, unless it was down for a day, and then the next scheduled run is as good.
LOOKBACK = timedelta(days=1)
# The most runs the API returns per query.
API_PAGE = 200


@dataclass(frozen=True)
class CrashedRun:
    """A crashed training run and what reconcile did: `resubmitted` (as `new_run_id`),
    `superseded` (a later run with the same parameters exists), or `gave up` (attempts
    spent)."""

    flow_run_id: str
    name: str
    attempt: int
    action: str
    new_run_id: str | None = None

    def describe(self) -> str:
        tail = f" as {self.new_run_id}" if self.new_run_id else ""
        run = f"training run {self.name} ({self.flow_run_id}, attempt {self.attempt})"
        return f"{run}: {self.action}{tail}"


@dataclass
class ReconcileOutcome:
    crashed: list[CrashedRun] = field(default_factory=list)
    unrecorded_aliases: list[str] = field(default_factory=list)


def attempt_of(tags: list[str]) -> int:
    return max((int(t[len(ATTEMPT_TAG) :]) for t in tags if _is_attempt(t)), default=1)


def _is_attempt(tag: str) -> bool:
    return tag.startswith(ATTEMPT_TAG) and tag[len(ATTEMPT_TAG) :].isdigit()


def should_resubmit(attempt: int, max_resubmits: int) -> bool:
    """Attempt 1 is the original run; `max_resubmits` more may follow it."""
    return attempt <= max_resubmits


def reconcile_crashed_training(cfg: MlgateConfig) -> list[CrashedRun]:
    """Every crashed, not yet reconciled run of the training deployment in the last day,
    oldest first: resubmitted, superseded or given up, then tagged as reconciled. Uses the
    Prefect API of the current settings (a worker's, or `flows.deploy.team_prefect`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        except ObjectNotFound:
            return []

        def training_runs(since: datetime, sort: FlowRunSort, **filters: Any) -> list[Any]:
            return list(
                client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                        expected_start_time=FlowRunFilterExpectedStartTime(after_=cast(Any, since)),
                        **filters,
                    ),
                    sort=sort,
                    limit=API_PAGE,
                )
            )

        crashed = training_runs(
            datetime.now(UTC) - LOOKBACK,
            FlowRunSort.EXPECTED_START_TIME_ASC,
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
        )
        crashed = [r for r in crashed if RECONCILED_TAG not in r.tags]
        if not crashed:
            return []
        since = crashed[0].expected_start_time
        recent = training_runs(since, FlowRunSort.EXPECTED_START_TIME_DESC)
        done: list[CrashedRun] = []
        for run in crashed:
            later = [
                r
                for r in recent
                if r.expected_start_time > run.expected_start_time and _replaces(r, run)
            ]
            done.append(_reconcile_one(cfg, run, later))
            client.update_flow_run(run.id, tags=[*run.tags, RECONCILED_TAG])
    return done


def _replaces(later: Any, crashed: Any) -> bool:
    """A later run with the same parameters that has started (a scheduled one may be days
    away) makes a resubmission pointless."""
    from prefect.client.schemas.objects import StateType

    started = later.state_type not in (StateType.SCHEDULED, None)
    return bool(started and later.parameters == crashed.parameters)


def _reconcile_one(cfg: MlgateConfig, run: Any, later: list[Any]) -> CrashedRun:
    from prefect.deployments import run_deployment

    attempt = attempt_of(list(run.tags))

    def outcome(action: str, new_run_id: str | None = None) -> CrashedRun:
        return CrashedRun(str(run.id), str(run.name), attempt, action, new_run_id)

    if later:
        return outcome("superseded", str(later[0].id))
    if not should_resubmit(attempt, cfg.orchestration.crash_resubmits):
        gave_up = outcome("gave up")
        registry.notify(
            cfg.registry,
            f"mlgate: {cfg.registry.model_name} training crashed {attempt} times",
            f"{gave_up.describe()}; orchestration.crash_resubmits is "
            f"{cfg.orchestration.crash_resubmits}: start it again by hand",
        )
        return gave_up
    new: Any = run_deployment(
        TRAINING_DEPLOYMENT,
        parameters=dict(run.parameters),
        tags=[f"{ATTEMPT_TAG}{attempt + 1}", f"{RESUBMIT_OF_TAG}{run.id}"],
        idempotency_key=f"mlgate-resubmit-{run.id}",
        timeout=0,
        as_subflow=False,
    )
    return outcome("resubmitted", str(new.id))


def unrecorded_alias_moves(client: MlflowClient, model_name: str) -> list[str]:
    """Each alias whose holder is not the one its recorded moves lead to (a move set but
    never recorded, or a move made outside mlgate)."""
    problems = []
    for alias in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
        holder = registry.get_alias_version(client, model_name, alias)
        if holder is None:
            continue
        stack = alias_moves.holder_stack(alias_moves.alias_history(client, model_name, alias))
        recorded = stack[-1] if stack else None
        if recorded != str(holder.version):
            problems.append(
                f"{model_name}@{alias} is held by version {holder.version} but its recorded "
                f"moves end at {recorded}"
            )
    return problems


@flow(name="reconcile_flow", log_prints=True)
def reconcile_flow(config_path: str = "mlgate.yaml") -> ReconcileOutcome:
    """Resubmit crashed training runs (bounded) and, after a crash, check the aliases."""
    cfg = load_config(config_path)
    outcome = ReconcileOutcome(crashed=reconcile_crashed_training(cfg))
    logger = get_run_logger()
    for crashed in outcome.crashed:
        logger.warning(crashed.describe())
    if outcome.crashed:
        client = registry.connect(cfg.registry)
        outcome.unrecorded_aliases = unrecorded_alias_moves(client, cfg.registry.model_name)
        for problem in outcome.unrecorded_aliases:
            logger.error(problem)
            registry.notify(cfg.registry, "mlgate: alias move without a record", problem)
    return outcome
