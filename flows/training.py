"""`training_flow`: data gate, train, evaluate, ONNX + parity, champion gate, register."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from checks.champion import ScoredModel, compare_to_champion
from checks.data_quality import DataProfile, check_data_quality, profile_reference
from checks.drift import check_drift
from checks.parity import check_parity
from checks.result import GateResult, GateStatus
from flows import registry
from flows.evidence import render_model_report
from models.config import MlgateConfig, load_config
from models.data import encode_target, hash_frame, load_dataset, split_data
from models.metrics import evaluate
from models.onnx_export import (
    export_onnx,
    latency_per_row_us,
    make_session,
    predict_proba_onnx,
    predict_proba_with_schema,
    write_model_dir,
)
from models.reference import SCORE_COLUMN, ReferenceHistograms, compute_reference_histograms
from models.train import predict_proba, train_model
from services.canary import Phase
from services.model_store import load_registered_model


def _task(fn: Any, name: str, **kw: Any) -> Any:
    # Inputs are DataFrames and fitted models: hashing them for a cache key costs more than
    # the step, and a cached training step would hide a changed model.
    return task(name=name, cache_policy=NO_CACHE, **kw)(fn)


load_data = _task(load_dataset, "load-data")
run_data_gate = _task(check_data_quality, "data-gate")
split = _task(split_data, "split")
build_histograms = _task(compute_reference_histograms, "reference-histograms")
train = _task(train_model, "train")
export = _task(export_onnx, "export-onnx")
run_parity_gate = _task(check_parity, "parity-gate")
run_champion_gate = _task(compare_to_champion, "champion-gate")


@dataclass(frozen=True)
class ChampionState:
    version: str | None
    profile: DataProfile | None
    histograms: ReferenceHistograms | None = None
    sha256: str | None = None
    scored: ScoredModel | None = None
    error: str | None = None


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


def _actor() -> str:
    if flow_run.id:
        return f"prefect:training_flow/{flow_run.name} ({flow_run.id})"
    return registry.current_actor()


def read_champion(client: MlflowClient, cfg: MlgateConfig) -> ChampionState:
    """The current champion and its stored reference profile. A champion that exists but
    cannot be read is reported as an error, never mistaken for 'no champion'."""
    mv = registry.get_alias_version(client, cfg.registry.model_name, "champion")
    if mv is None:
        return ChampionState(version=None, profile=None)
    if not mv.run_id:
        return ChampionState(str(mv.version), None, error="champion version has no run")
    try:
        raw = registry.load_json_artifact(client, mv.run_id, registry.PROFILE_ARTIFACT)
        profile = DataProfile.from_dict(raw)
    except Exception as err:
        return ChampionState(str(mv.version), None, error=f"reference profile unreadable: {err}")
    try:
        raw = registry.load_json_artifact(client, mv.run_id, registry.HISTOGRAMS_ARTIFACT)
        histograms: ReferenceHistograms | None = ReferenceHistograms.from_dict(raw)
    except Exception:
        # Drift against the champion is evidence for the report, not a gate of training.
        histograms = None
    return ChampionState(str(mv.version), profile, histograms, mv.tags.get(registry.SHA_TAG))


@task(name="score-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def score_champion(
    cfg: MlgateConfig, champion: ChampionState, holdout: pd.DataFrame
) -> ChampionState:
    if champion.version is None or champion.error:
        return champion
    try:
        loaded = load_registered_model(
            cfg.registry.resolved_tracking_uri(),
            cfg.registry.model_name,
            version=champion.version,
        )
        session = make_session(loaded.content)
        scores = predict_proba_with_schema(session, holdout, loaded.schema)
        scored = ScoredModel(scores, version=champion.version, size_bytes=len(loaded.content))
        return dataclasses.replace(champion, scored=scored)
    except Exception as err:
        return dataclasses.replace(champion, error=f"{type(err).__name__}: {err}")


def _finish(
    client: MlflowClient, cfg: MlgateConfig, run_id: str, outcome: TrainingOutcome
) -> TrainingOutcome:
    registry.log_gate_results(client, run_id, outcome.gates)
    if not outcome.accepted:
        registry.notify(
            cfg.registry,
            f"mlgate: {cfg.registry.model_name} challenger rejected at the "
            f"{outcome.stopped_at} gate",
            f"training run {run_id}: {outcome.reason}",
        )
    client.set_tag(run_id, "mlgate.outcome", "accepted" if outcome.accepted else "rejected")
    if outcome.stopped_at:
        client.set_tag(run_id, "mlgate.stopped_at", outcome.stopped_at)
    client.set_terminated(run_id, "FINISHED")
    return outcome


def _rejected(stage: str, gates: list[GateResult], **kw: Any) -> TrainingOutcome:
    failed = [g for g in gates if not g.passed]
    reason = "; ".join(f"{g.name} gate {g.status.value}: {g.reason}" for g in failed)
    return TrainingOutcome(False, stage, reason, gates=gates, **kw)


@flow(name="training_flow", log_prints=True)
def training_flow(
    config_path: str = "mlgate.yaml", data_path: str | None = None
) -> TrainingOutcome:
    """Train a challenger and let the gates decide whether it is registered and promoted."""
    logger = get_run_logger()
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    df = load_data(cfg.dataset, Path(data_path) if data_path else None)
    data_hash = hash_frame(df)

    champion = read_champion(client, cfg)
    reference = champion.profile or profile_reference(df, cfg.dataset)
    exp_id = registry.ensure_experiment(client, cfg.registry, cfg.registry.experiment)
    run = client.create_run(
        exp_id,
        tags={
            "data_hash": data_hash,
            "git_commit": registry.git_commit(Path(config_path).resolve().parent),
            "data_path": str(data_path or cfg.dataset.path),
            "champion_version": str(champion.version),
            "prefect_flow_run_id": str(flow_run.id),
            "estimator": cfg.train.estimator,
        },
        run_name=f"{cfg.registry.model_name}-{cfg.train.estimator}",
    )
    run_id = run.info.run_id
    common = {"run_id": run_id, "champion_before": champion.version, "data_hash": data_hash}
    try:
        registry.log_json_artifact(
            client, run_id, "config/mlgate.json", cfg.model_dump(mode="json")
        )
        with tempfile.TemporaryDirectory() as docs:
            data_gate = run_data_gate(
                df, cfg.dataset, cfg.gates.data, reference, docs_dir=Path(docs)
            )
            if "data_docs_index" in data_gate.evidence:
                client.log_artifacts(run_id, docs, registry.DATA_DOCS_ARTIFACT_DIR)
        gates = [data_gate]
        if not data_gate.passed:
            logger.warning("data gate %s: %s", data_gate.status.value, data_gate.reason)
            return _finish(client, cfg, run_id, _rejected("data", gates, **common))

        parts = split(df, cfg.dataset, cfg.train)
        model = train(parts.train, cfg.dataset, cfg.train)
        y = encode_target(parts.holdout, cfg.dataset)
        sk_scores = predict_proba(model.pipeline, parts.holdout, cfg.dataset)
        metrics = evaluate(y, sk_scores)
        registry.log_params_metrics(
            client,
            run_id,
            params={"estimator": model.estimator, **cfg.train.params},
            metrics={**metrics, "fit_seconds": model.fit_seconds},
        )
        client.set_tag(run_id, "holdout_hash", parts.holdout_hash)

        onnx_model = export(model.pipeline, cfg.dataset)
        session = make_session(onnx_model.content)
        onnx_scores = predict_proba_onnx(session, parts.holdout, cfg.dataset)
        parity = run_parity_gate(sk_scores, onnx_scores, cfg.gates.parity)
        gates.append(parity)
        if not parity.passed:
            return _finish(
                client, cfg, run_id, _rejected("parity", gates, metrics=metrics, **common)
            )

        champion = score_champion(cfg, champion, parts.holdout)
        slices = (
            parts.holdout[list(cfg.dataset.slice_columns)] if cfg.dataset.slice_columns else None
        )
        challenger = ScoredModel(
            onnx_scores,
            latency_us_per_row=latency_per_row_us(session, parts.holdout, cfg.dataset),
            size_bytes=onnx_model.size_bytes,
        )
        champion_gate = run_champion_gate(
            y,
            challenger,
            champion.scored,
            cfg.gates.champion,
            holdout_hash=parts.holdout_hash,
            slices=slices,
            champion_error=champion.error,
        )
        gates.append(champion_gate)

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_model_dir(onnx_model, cfg.dataset, Path(tmp) / "model")
            (model_dir / "model_card.md").write_text(
                model_card(cfg, metrics, gates, data_hash, parts.holdout_hash)
            )
            client.log_artifacts(run_id, str(model_dir), registry.MODEL_ARTIFACT_DIR)
        profile = profile_reference(df, cfg.dataset)
        registry.log_json_artifact(client, run_id, registry.PROFILE_ARTIFACT, profile.to_dict())
        # Monitoring compares live traffic with these, so they describe unseen rows: the
        # holdout's features and the scores the served (ONNX) model gave them.
        histograms = build_histograms(parts.holdout, cfg.dataset, onnx_scores, cfg.gates.drift.bins)
        registry.log_json_artifact(
            client, run_id, registry.HISTOGRAMS_ARTIFACT, histograms.to_dict()
        )
        drift_psi = training_drift(client, run_id, df, champion, cfg)
        sample = parts.holdout[list(cfg.dataset.features)].assign(**{SCORE_COLUMN: onnx_scores})
        with tempfile.TemporaryDirectory() as tmp:
            sample_path = Path(tmp) / Path(registry.SAMPLE_ARTIFACT).name
            sample.to_parquet(sample_path, index=False)
            client.log_artifact(
                run_id, str(sample_path), str(Path(registry.SAMPLE_ARTIFACT).parent)
            )
        report = render_model_report(
            title=f"{cfg.registry.model_name}: challenger from run {run_id}",
            y=y,
            challenger=onnx_scores,
            champion=champion.scored.scores if champion.scored else None,
            champion_version=champion.version,
            slices=slices,
            gates=gates,
            primary_metric=cfg.gates.champion.primary_metric,
            drift_psi=drift_psi,
            facts={
                "estimator": cfg.train.estimator,
                "data hash": data_hash,
                "holdout hash": parts.holdout_hash,
                "holdout rows": str(len(y)),
            },
        )
        registry.log_text_artifact(client, run_id, registry.REPORT_ARTIFACT, report)

        accepted = champion_gate.passed
        if accepted and champion.sha256 == onnx_model.sha256:
            # Same data, code and seed give a byte-identical model: a new version would only
            # move @champion to a twin of itself and blur the history.
            client.set_tag(run_id, "identical_to_version", str(champion.version))
            same = TrainingOutcome(
                True,
                None,
                f"identical to champion v{champion.version} (same ONNX sha256): nothing new "
                "to register",
                version=champion.version,
                champion_after=champion.version,
                metrics=metrics,
                gates=gates,
                **common,
            )
            return _finish(client, cfg, run_id, same)
        primary = metrics.get(cfg.gates.champion.primary_metric, float("nan"))
        mv = registry.register_version(
            client,
            cfg.registry.model_name,
            run_id,
            onnx_model.sha256,
            tags={
                **{f"{registry.GATE_TAG_PREFIX}{g.name}": g.status.value for g in gates},
                "data_hash": data_hash,
                "holdout_hash": parts.holdout_hash,
                "git_commit": client.get_run(run_id).data.tags.get("git_commit", "unknown"),
                "estimator": cfg.train.estimator,
                "primary_metric": cfg.gates.champion.primary_metric,
                "primary_metric_value": f"{primary:.6f}",
                "mlgate.outcome": "accepted" if accepted else "rejected",
                "evidence.gates": f"{run.info.artifact_uri}/{registry.EVIDENCE_ARTIFACT}",
                "evidence.report": f"{run.info.artifact_uri}/{registry.REPORT_ARTIFACT}",
            },
            description=champion_gate.reason,
        )
        client.set_tag(run_id, "model_version", str(mv.version))
        outcome_kw = {**common, "version": str(mv.version), "metrics": metrics}
        if not accepted:
            logger.warning("champion gate %s: %s", champion_gate.status.value, champion_gate.reason)
            return _finish(client, cfg, run_id, _rejected("champion", gates, **outcome_kw))

        reason = f"training run {run_id}: data, parity and champion gates passed"
        # The flow moves aliases through the same evidence-checked, compare-and-set path as
        # a person does. With the canary enabled (and a champion to compare with live), the
        # challenger must then earn @champion on live traffic; otherwise passing every
        # offline gate makes it the champion, compared against the champion we judged.
        canary_on = cfg.canary.enabled and champion.version is not None
        moves: list[tuple[str, str | None]] = [
            ("challenger", _alias_version(client, cfg, "challenger"))
        ]
        if not canary_on:
            moves.append(("champion", champion.version))
        for alias, expected in moves:
            registry.promote(
                client,
                cfg.registry,
                cfg.registry.model_name,
                str(mv.version),
                alias=alias,
                reason=reason,
                expected_from=expected,
                actor=_actor(),
            )
        if canary_on:
            return _finish(
                client, cfg, run_id, _canary_step(client, cfg, config_path, mv, gates, outcome_kw)
            )
        outcome = TrainingOutcome(
            True,
            None,
            "first model, floor passed" if champion.version is None else champion_gate.reason,
            gates=gates,
            champion_after=str(mv.version),
            **outcome_kw,
        )
        return _finish(client, cfg, run_id, outcome)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def _canary_step(
    client: MlflowClient,
    cfg: MlgateConfig,
    config_path: str,
    mv: Any,
    gates: list[GateResult],
    outcome_kw: dict[str, Any],
) -> TrainingOutcome:
    """The challenger on live traffic (`flows.canary.canary_rollout`); accepted only when
    the canary promoted it."""
    from flows.canary import canary_rollout, decision_result

    version = str(mv.version)
    state = canary_rollout(cfg, str(Path(config_path).resolve()), version, _actor())
    verdict = decision_result(state)
    if state.candidate_version != version:
        verdict = dataclasses.replace(
            verdict,
            status=GateStatus.INCONCLUSIVE,
            reason=f"superseded by v{state.candidate_version} during the canary",
        )
    gates = [*gates, verdict]
    promoted = state.phase == Phase.PROMOTED and state.candidate_version == version
    client.set_model_version_tag(
        cfg.registry.model_name, version, "mlgate.outcome", "accepted" if promoted else "rejected"
    )
    if not promoted:
        return _rejected("canary", gates, **outcome_kw)
    return TrainingOutcome(
        True, None, verdict.reason, gates=gates, champion_after=version, **outcome_kw
    )


def training_drift(
    client: MlflowClient,
    run_id: str,
    df: pd.DataFrame,
    champion: ChampionState,
    cfg: MlgateConfig,
) -> dict[str, float] | None:
    """PSI of the new training data against the champion's reference: evidence of how the
    world moved since the champion was trained. Retraining on drifted data is the point of
    the loop, so this informs the reviewer and never blocks."""
    if champion.histograms is None:
        return None
    result = check_drift(df, champion.histograms, cfg.gates.drift)
    registry.log_json_artifact(client, run_id, registry.DRIFT_ARTIFACT, result.to_dict())
    psi = {k.removeprefix("psi."): v for k, v in result.metrics.items() if k.startswith("psi.")}
    registry.log_params_metrics(
        client, run_id, {}, {f"drift_vs_champion.psi.{k}": v for k, v in psi.items()}
    )
    return psi


def _alias_version(client: MlflowClient, cfg: MlgateConfig, alias: str) -> str | None:
    mv = registry.get_alias_version(client, cfg.registry.model_name, alias)
    return str(mv.version) if mv else None


def model_card(
    cfg: MlgateConfig,
    metrics: dict[str, float],
    gates: list[GateResult],
    data_hash: str,
    holdout_hash: str,
) -> str:
    from flows.report import gates_markdown

    lines = [
        f"# Model card: {cfg.registry.model_name}",
        "",
        f"- estimator: `{cfg.train.estimator}` with params `{json.dumps(cfg.train.params)}`",
        f"- target: `{cfg.dataset.target}` (positive label `{cfg.dataset.positive_label}`)",
        f"- features: {len(cfg.dataset.numeric_features)} numeric, "
        f"{len(cfg.dataset.categorical_features)} categorical",
        f"- data hash: `{data_hash}`; holdout hash: `{holdout_hash}`",
        "",
        "## Holdout metrics",
        "",
        *(f"- {k}: {v:.4f}" for k, v in metrics.items()),
        "",
        "## Gates",
        "",
        gates_markdown(gates),
    ]
    return "\n".join(lines)
