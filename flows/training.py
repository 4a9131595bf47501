"""`training_flow`: data gate, train, evaluate, ONNX + parity, behaviour, champion gate, register.

With `train.candidates`, the candidates are trained (on the Dask workers when a scheduler is
configured) and one is chosen on a split of the training part before the model is trained
(`flows/candidates.py`); the holdout the gates use plays no part in the choice.

The flow computes first and gathers what it computed into one `TrainingEvidence`; the
registry is written only at the end (`finish_training`), so a crash on the way leaves
nothing half-registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from checks.champion import compare_to_champion
from checks.data_quality import profile_reference
from checks.parity import check_parity
from checks.result import GateResult, GateStatus
from flows import alias_moves, registry
from flows.candidates import choose_candidate
from flows.champion import read_champion, score_champion
from flows.training_evidence import (
    TrainingEvidence,
    describe_run,
    gate_behaviour,
    gate_training_data,
    gather_training_evidence,
    holdout_histograms,
    rejection_reason,
    score_holdout,
    stopped_evidence,
)
from models.config import MlgateConfig, load_config
from models.data import load_dataset, split_data
from models.onnx_export import export_onnx, predict_proba_gpu_graph
from models.train import train_model
from services.canary_state import Phase


def _task(fn: Any, name: str, **kw: Any) -> Any:
    # Inputs are DataFrames and fitted models: hashing them for a cache key costs more than
    # the step, and a cached training step would hide a changed model.
    return task(name=name, cache_policy=NO_CACHE, **kw)(fn)


load_data = _task(load_dataset, "load-data")
run_data_gate = _task(gate_training_data, "data-gate")
split = _task(split_data, "split")
train = _task(train_model, "train")
export = _task(export_onnx, "export-onnx")
score = _task(score_holdout, "score-holdout")
score_gpu_graph = _task(predict_proba_gpu_graph, "score-gpu-graph")
run_parity_gate = _task(check_parity, "parity-gate")
champion_on_holdout = _task(score_champion, "score-champion", retries=2, retry_delay_seconds=2)
run_behaviour_gate = _task(gate_behaviour, "behaviour-gate")
run_champion_gate = _task(compare_to_champion, "champion-gate")
build_histograms = _task(holdout_histograms, "reference-histograms")
gather_evidence = _task(gather_training_evidence, "gather-evidence")


@dataclass
class TrainingOutcome:
    accepted: bool
    stopped_at: str | None
    reason: str
    run_id: str | None = None
    version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    data_hash: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "gates"}
        d["gates"] = [g.to_dict() for g in self.gates]
        return d


def _actor(cfg: MlgateConfig) -> str:
    if flow_run.id:
        return f"prefect:training_flow/{flow_run.name} ({flow_run.id})"
    return registry.current_actor(cfg.registry)


@flow(name="training_flow", log_prints=True)
def training_flow(
    config_path: str = "mlgate.yaml", data_path: str | None = None
) -> TrainingOutcome:
    """Train a challenger and let the gates decide whether it is registered and promoted."""
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    df = load_data(cfg.dataset, Path(data_path) if data_path else None)
    champion = read_champion(client, cfg)
    facts = describe_run(cfg, config_path, data_path, df, champion.version, flow_run.id)
    reference = champion.profile or profile_reference(df, cfg.dataset)
    data_gate, docs = run_data_gate(df, cfg.dataset, cfg.gates.data, reference)
    if not data_gate.passed:
        return finish_training(client, cfg, config_path, stopped_evidence(facts, [data_gate], docs))

    parts = split(df, cfg.dataset, cfg.train)
    cfg, facts = choose_candidate(parts.train, cfg, facts)
    model = train(parts.train, cfg.dataset, cfg.train)
    onnx_model = export(model.pipeline, cfg.dataset)
    holdout = score(model, onnx_model, parts, cfg.dataset, cfg.train)
    gpu_scores = score_gpu_graph(onnx_model, parts.holdout, cfg.dataset)
    parity = run_parity_gate(
        holdout.sklearn_scores, holdout.onnx_scores, cfg.gates.parity, gpu_scores
    )
    if not parity.passed:
        stopped = stopped_evidence(facts, [data_gate, parity], docs, holdout)
        return finish_training(client, cfg, config_path, stopped)

    champion = champion_on_holdout(cfg, champion, parts.holdout)
    behaviour = run_behaviour_gate(onnx_model, holdout, champion, cfg.dataset, cfg.gates.behaviour)
    champion_gate = run_champion_gate(
        holdout.y,
        holdout.challenger,
        champion.scored,
        cfg.gates.champion,
        holdout_hash=parts.holdout_hash,
        slices=holdout.slices,
        champion_error=champion.error,
    )
    histograms = build_histograms(holdout, cfg.dataset, cfg.gates.drift.bins)
    gates = [data_gate, parity, behaviour, champion_gate]
    evidence = gather_evidence(
        cfg, facts, df, holdout, onnx_model, gates, docs, champion, histograms
    )
    return finish_training(client, cfg, config_path, evidence)


def finish_training(
    client: MlflowClient, cfg: MlgateConfig, config_path: str, evidence: TrainingEvidence
) -> TrainingOutcome:
    """Every registry write of a training run, once its evidence is complete: the run, then
    the version (`evidence.registrable`), then the alias moves, through the same
    evidence-checked, compare-and-set path as a person's. With the canary enabled (and a
    champion to compare with live), the challenger gets only `@challenger` here and must
    earn `@champion` on live traffic; otherwise passing every offline gate makes it the
    champion, compared against the champion it was judged against."""
    run_id = registry.record_training_run(client, cfg.registry, evidence)
    mv = (
        registry.register_candidate(client, cfg.registry, run_id, evidence)
        if evidence.registrable
        else None
    )
    outcome = offline_outcome(evidence, run_id, str(mv.version) if mv else None)
    if mv is not None and outcome.accepted:
        canary_on = cfg.canary.enabled and outcome.champion_before is not None
        alias_moves.promote_candidate(
            client,
            cfg.registry,
            str(mv.version),
            judged_against=outcome.champion_before,
            to_champion=not canary_on,
            reason=f"training run {run_id}: data, parity, behaviour and champion gates passed",
            actor=_actor(cfg),
        )
        if canary_on:
            outcome = _canary_step(client, cfg, config_path, outcome)
    if not outcome.accepted:
        _announce_rejection(cfg, outcome)
    return outcome


def offline_outcome(
    evidence: TrainingEvidence, run_id: str, version: str | None
) -> TrainingOutcome:
    """The verdict of the offline gates, for the run recorded as `run_id` and the version it
    was registered as (None: not registered)."""
    common: dict[str, Any] = {
        "run_id": run_id,
        "champion_before": evidence.facts.champion_version,
        "data_hash": evidence.facts.data_hash,
        "metrics": evidence.holdout_metrics,
        "gates": list(evidence.gates),
    }
    if not evidence.accepted:
        return TrainingOutcome(
            False, evidence.stopped_at, evidence.reason, version=version, **common
        )
    identical = evidence.candidate.identical_to if evidence.candidate else None
    if identical is not None:
        reason = f"identical to champion v{identical} (same ONNX sha256): nothing new to register"
        return TrainingOutcome(
            True, None, reason, version=identical, champion_after=identical, **common
        )
    reason = (
        "first model, floor passed"
        if evidence.facts.champion_version is None
        else evidence.gates[-1].reason
    )
    return TrainingOutcome(True, None, reason, version=version, champion_after=version, **common)


def _canary_step(
    client: MlflowClient, cfg: MlgateConfig, config_path: str, outcome: TrainingOutcome
) -> TrainingOutcome:
    """The challenger on live traffic (`flows.canary.canary_rollout`); accepted only when
    the canary promoted it. Its verdict joins the run's gates and sets the verdict."""
    from flows.canary import canary_rollout, decision_result

    version = str(outcome.version)
    state = canary_rollout(cfg, str(Path(config_path).resolve()), version, _actor(cfg))
    verdict = decision_result(state)
    if state.candidate_version != version:
        verdict = dataclasses.replace(
            verdict,
            status=GateStatus.INCONCLUSIVE,
            reason=f"superseded by v{state.candidate_version} during the canary",
        )
    gates = [*outcome.gates, verdict]
    promoted = state.phase == Phase.PROMOTED and state.candidate_version == version
    registry.record_training_verdict(
        client,
        cfg.registry,
        str(outcome.run_id),
        version,
        gates,
        accepted=promoted,
        stopped_at=None if promoted else "canary",
    )
    if promoted:
        return dataclasses.replace(outcome, reason=verdict.reason, gates=gates)
    return dataclasses.replace(
        outcome,
        accepted=False,
        stopped_at="canary",
        reason=rejection_reason(gates),
        gates=gates,
        champion_after=None,
    )


def _announce_rejection(cfg: MlgateConfig, outcome: TrainingOutcome) -> None:
    get_run_logger().warning(
        "challenger rejected at the %s gate: %s", outcome.stopped_at, outcome.reason
    )
    registry.notify(
        cfg.registry,
        f"mlgate: {cfg.registry.model_name} challenger rejected at the {outcome.stopped_at} gate",
        f"training run {outcome.run_id}: {outcome.reason}",
    )
