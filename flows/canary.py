"""Canary rollouts from `flows/`: the registry side of `services.canary` on MLflow, the
offline-evidence check before a canary starts, and the Prefect task the training flow runs
as its last step when `canary.enabled`.

`services/` does not import `flows/`: the controller reaches the registry only through the
`CanaryRegistry` protocol, which `MlflowCanaryRegistry` implements here with the same
evidence-checked, compare-and-set `alias_moves.promote` that a person's `mlgate promote` uses.
The controller hands over the state and the result; the verdict's version tags
(`gate.canary`, `canary.*`) are built here (`pass_tags`, `rollback_tags`,
`superseded_tags`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from checks.result import CheckRow, GateResult, GateStatus
from flows import alias_moves, registry
from models.config import MlgateConfig
from models.registry_layout import (
    CANARY_EVIDENCE_DIR,
    CANARY_FORCED_TAG,
    CANARY_GATE_TAG,
    CANARY_TAG_PREFIX,
)
from services.canary import run_canary, start_canary
from services.canary_state import (
    CanaryBusyError,
    CanaryError,
    CanaryState,
    StateStore,
    canary_paths,
    controller_running,
    final_state_for,
    now_iso,
    version_key,
)

_WAIT_POLL_S = 0.5


def _fmt_tag(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def pass_tags(state: CanaryState, summary: GateResult) -> dict[str, str]:
    """The tags of a candidate that passed every step: the summary's numbers."""
    tags = {
        CANARY_GATE_TAG: "pass",
        f"{CANARY_TAG_PREFIX}stable_version": state.stable_version,
        f"{CANARY_TAG_PREFIX}steps": ",".join(str(p) for p in state.steps),
        f"{CANARY_TAG_PREFIX}finished_at": now_iso(),
    }
    tags.update({f"{CANARY_TAG_PREFIX}{k}": _fmt_tag(v) for k, v in summary.metrics.items()})
    return tags


def rollback_tags(state: CanaryState, result: GateResult) -> dict[str, str]:
    """The tags of a candidate rolled back for `state.decision`: the verdict (fail, or
    inconclusive when the stable could not be judged), the guardrail and `result`'s
    numbers."""
    decision = state.decision or {}
    tags = {
        CANARY_GATE_TAG: str(decision.get("verdict", GateStatus.FAIL.value)),
        f"{CANARY_TAG_PREFIX}failed_guardrail": str(decision["guardrail"]),
        f"{CANARY_TAG_PREFIX}failed_step": str(int(result.metrics.get("step_percent", 0))),
        f"{CANARY_TAG_PREFIX}stable_version": state.stable_version,
        f"{CANARY_TAG_PREFIX}reason": decision["reason"][:4000],
        f"{CANARY_TAG_PREFIX}finished_at": now_iso(),
    }
    tags.update(
        {
            f"{CANARY_TAG_PREFIX}{k}": _fmt_tag(v)
            for k, v in result.metrics.items()
            if not (isinstance(v, float) and math.isnan(v))
        }
    )
    return tags


def superseded_tags(state: CanaryState, successor: str) -> dict[str, str]:
    """The tags of a candidate that gave way to a newer one before a verdict."""
    return {
        CANARY_GATE_TAG: GateStatus.INCONCLUSIVE.value,
        f"{CANARY_TAG_PREFIX}superseded_by": successor,
        f"{CANARY_TAG_PREFIX}stable_version": state.stable_version,
    }


class MlflowCanaryRegistry:
    """`services.canary.CanaryRegistry` on MLflow."""

    def __init__(self, cfg: MlgateConfig, actor: str | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.registry.model_name
        self.client = registry.connect(cfg.registry)
        self.actor = actor or registry.current_actor(cfg.registry)
        self.notes: list[tuple[str, str]] = []

    def champion_version(self) -> str | None:
        mv = registry.get_alias_version(self.client, self.name, "champion")
        return str(mv.version) if mv else None

    def record_pass(self, state: CanaryState, summary: GateResult) -> None:
        self.record_result(state.candidate_version, summary, pass_tags(state, summary))

    def record_rollback(self, state: CanaryState, result: GateResult) -> None:
        self.record_result(state.candidate_version, result, rollback_tags(state, result))

    def record_superseded(self, state: CanaryState, successor: str, note: GateResult) -> None:
        self.record_result(state.candidate_version, note, superseded_tags(state, successor))

    def record_result(self, version: str, result: GateResult, tags: Mapping[str, str]) -> None:
        """The verdict as version tags (`gate.canary`, `canary.*`) and the whole result, with
        every step's window, as a JSON artifact of the version's run."""
        # The verdict is the tag: a rollback for the stable's unreadable numbers is judged
        # FAIL step-wise but tagged inconclusive for the candidate.
        verdict = tags.get(CANARY_GATE_TAG, result.status.value)
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        mv = self.client.get_model_version(self.name, version)
        if mv.run_id:
            path = f"{CANARY_EVIDENCE_DIR}/v{version}-{verdict}.json"
            registry.log_json_artifact(self.client, mv.run_id, path, result.to_dict())
            run = self.client.get_run(mv.run_id)
            self.client.set_model_version_tag(
                self.name, version, registry.CANARY_EVIDENCE_TAG, f"{run.info.artifact_uri}/{path}"
            )
        alias_moves.record_canary(
            self.client,
            self.cfg.registry,
            self.name,
            version,
            stable_version=str(tags.get(f"{CANARY_TAG_PREFIX}stable_version", "None")),
            outcome=verdict,
            reason=result.reason,
            actor=self.actor,
            evidence={"tags": dict(tags)},
        )

    def promote(self, version: str, *, expected_from: str | None, reason: str) -> None:
        alias_moves.promote(
            self.client,
            self.cfg.registry,
            self.name,
            version,
            reason=reason,
            alias="champion",
            expected_from=expected_from,
            actor=self.actor,
        )

    def notify(self, title: str, body: str) -> None:
        self.notes.append((title, body))
        registry.notify(self.cfg.registry, title, body)


def offline_gates(cfg: MlgateConfig) -> tuple[str, ...]:
    """The gates a candidate must carry before a canary: the registry's required gates but
    the canary itself."""
    return tuple(g for g in cfg.registry.required_gates if g != "canary")


def begin_canary(
    cfg: MlgateConfig,
    version: str,
    *,
    force: bool = False,
    reason: str = "",
    public_port: int | None = None,
    actor: str | None = None,
) -> CanaryState:
    """Record a canary of `version` after checking that it passed the offline gates. With
    `force` (and a reason) a version without that evidence is let onto live traffic; the
    reason is tagged on the version (`canary.forced_start`). The controller still decides:
    a forced start is never a forced promotion."""
    client = registry.connect(cfg.registry)
    name = cfg.registry.model_name
    try:
        mv = client.get_model_version(name, str(version))
    except Exception:
        raise registry.RegistryError(f"{name} has no version {version}") from None
    missing = alias_moves.missing_evidence(mv, offline_gates(cfg))
    if missing:
        if not force:
            raise alias_moves.EvidenceError(name, str(version), missing)
        if not reason.strip():
            raise registry.RegistryError("--force needs --reason")
        who = actor or registry.current_actor(cfg.registry)
        client.set_model_version_tag(
            name, str(version), CANARY_FORCED_TAG, f"{who}: {reason}"[:4000]
        )
    return start_canary(
        cfg, str(version), MlflowCanaryRegistry(cfg, actor), public_port=public_port
    )


def decision_result(state: CanaryState) -> GateResult:
    """The canary's verdict as a `GateResult`: the summary of every step on a promotion,
    the failing window on a rollback."""
    decision = state.decision or {}
    if decision.get("result"):
        return GateResult.from_dict(decision["result"])
    return GateResult(
        "canary",
        GateStatus.INCONCLUSIVE,
        f"canary of v{state.candidate_version} ended {state.phase} without a decision",
        checks=(CheckRow("canary", GateStatus.INCONCLUSIVE, state.phase, "a decision"),),
    )


@task(name="canary", cache_policy=NO_CACHE)
def canary_rollout(
    cfg: MlgateConfig,
    config_path: str,
    version: str,
    actor: str,
    on_event: Callable[[CanaryState, str], None] | None = None,
) -> CanaryState:
    """The training flow's last step: the candidate on live traffic through HAProxy, step by
    step, until it is promoted or rolled back. A controller already running this model's
    canary (a person's `mlgate canary start`) is joined rather than duplicated: the newer
    candidate replaces the older there, and this task waits for the end."""
    logger = get_run_logger()
    cr = MlflowCanaryRegistry(cfg, actor)
    recorded = start_canary(cfg, version, cr)
    # Which finished canary is this version's: the controller may go on with a newer one.
    not_before = recorded.started_at if recorded.candidate_version == version else time.time()
    final = _rollout(cfg, config_path, version, cr, logger, on_event)
    return final_state_for(cfg, version, not_before) or final


def _rollout(
    cfg: MlgateConfig,
    config_path: str,
    version: str,
    cr: MlflowCanaryRegistry,
    logger: Any,
    on_event: Callable[[CanaryState, str], None] | None,
) -> CanaryState:
    """Run the controller, or wait for the one already running and carry on if it stops."""

    def log_event(state: CanaryState, event: str) -> None:
        if event in ("running", "step_passed", "rollback_decided", "promoted", "done"):
            logger.info(
                "canary v%s: %s (step %s, weights %s)",
                state.candidate_version,
                event,
                state.step_index,
                state.weights,
            )
        if on_event is not None:
            on_event(state, event)

    try:
        return run_canary(cfg, Path(config_path), cr, on_event=log_event)
    except CanaryBusyError:
        logger.info(
            "a canary controller already runs for %s: waiting for it", cfg.registry.model_name
        )
    store = StateStore(canary_paths(cfg))
    while True:
        state = store.read()
        if state is None:
            raise CanaryError("the canary state vanished while another controller ran it")
        if state.terminal and state.candidate_version == version:
            return state
        if version_key(state.candidate_version) > version_key(version):
            # A newer candidate took over the rollout: this one was superseded.
            return state
        if not controller_running(cfg):
            # The other controller stopped without finishing: carry it on here.
            with contextlib.suppress(CanaryBusyError):
                return run_canary(cfg, Path(config_path), cr, on_event=log_event)
        time.sleep(_WAIT_POLL_S)
