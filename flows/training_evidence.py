"""The evidence of one training run, gathered into one value before anything is written.

The training flow computes; the functions here assemble what it computed into a
`TrainingEvidence`, and `flows/registry.py` writes that value in one go at the end
(`record_training_run`, then `register_candidate`), so a flow that crashes half-way leaves
no run with part of its evidence and no version without it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from checks.behaviour import check_behaviour
from checks.champion import ScoredModel
from checks.data_quality import DataProfile, check_data_quality, profile_reference
from checks.drift import check_drift
from checks.result import GateResult
from flows import registry
from flows.champion import ChampionState
from flows.gate_tables import gates_markdown
from flows.model_report import report_sections, titled_report
from models.candidates import Selection
from models.config import (
    BehaviourGateConfig,
    DataGateConfig,
    DatasetConfig,
    DriftGateConfig,
    MlgateConfig,
    TrainConfig,
)
from models.data import Split, encode_target, hash_frame
from models.metrics import evaluate
from models.onnx_export import (
    OnnxModel,
    latency_per_row_us,
    make_session,
    predict_proba_onnx,
    write_model_dir,
)
from models.performance_estimate import fit_calibrator
from models.reference import SCORE_COLUMN, ReferenceHistograms, compute_reference_histograms
from models.registry_layout import (
    CALIBRATOR_ARTIFACT,
    CONFIG_ARTIFACT,
    DATA_DOCS_ARTIFACT_DIR,
    DRIFT_ARTIFACT,
    HISTOGRAMS_ARTIFACT,
    MODEL_ARTIFACT_DIR,
    PROFILE_ARTIFACT,
    REPORT_ARTIFACT,
    SAMPLE_ARTIFACT,
    SELECTION_ARTIFACT,
)
from models.train import TrainedModel, predict_proba

_DRIFT_METRIC_PREFIX = "drift_vs_champion.psi."
_SELECTION_METRIC_PREFIX = "selection."


@dataclass(frozen=True)
class RunFacts:
    """What identifies a training run before any gate: its data, code, config and champion,
    and, with `train.candidates`, which candidate was chosen on the training part and why."""

    model_name: str
    run_name: str
    data_hash: str
    champion_version: str | None
    tags: Mapping[str, str]
    config: Mapping[str, Any]
    selection: Selection | None = None


@dataclass(frozen=True)
class NestedRun:
    """A run recorded under the training run: one per candidate tried."""

    run_name: str
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class ScoredHoldout:
    """The trained challenger on the holdout: sklearn's and ONNX Runtime's scores, the
    metrics (from sklearn's), and what the champion gate measures on the ONNX model."""

    frame: pd.DataFrame
    holdout_hash: str
    y: np.ndarray
    sklearn_scores: np.ndarray
    onnx_scores: np.ndarray
    metrics: Mapping[str, float]
    challenger: ScoredModel
    slices: pd.DataFrame | None
    params: Mapping[str, Any]
    fit_seconds: float


@dataclass(frozen=True)
class CandidateEvidence:
    """What a challenger that reached the champion gate adds: its model directory (ONNX,
    schema, model card), the references monitoring compares live traffic with (and the
    calibrator it estimates performance with before labels), the drift of its data since
    the champion and the body of the HTML report."""

    onnx: OnnxModel
    model_files: Mapping[str, bytes]
    profile: Mapping[str, Any]
    histograms: Mapping[str, Any]
    sample: bytes
    report: str
    primary_metric: str
    drift: GateResult | None = None
    identical_to: str | None = None
    calibrator: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TrainingEvidence:
    """Everything one training run leaves in the registry, by meaning. A run stopped at the
    data gate has no holdout; one stopped at the parity gate has no candidate."""

    facts: RunFacts
    gates: tuple[GateResult, ...]
    data_docs: Mapping[str, bytes] = field(default_factory=dict)
    holdout: ScoredHoldout | None = None
    candidate: CandidateEvidence | None = None

    @property
    def run_name(self) -> str:
        return self.facts.run_name

    @property
    def accepted(self) -> bool:
        """Every offline gate passed."""
        return all(g.passed for g in self.gates)

    @property
    def stopped_at(self) -> str | None:
        return next((g.name for g in self.gates if not g.passed), None)

    @property
    def reason(self) -> str:
        return rejection_reason(self.gates)

    @property
    def registrable(self) -> bool:
        """A challenger the champion gate judged becomes a version, accepted or not, unless
        it is byte-identical to the champion: a twin would only blur the history."""
        return self.candidate is not None and self.candidate.identical_to is None

    @property
    def holdout_metrics(self) -> dict[str, float]:
        return dict(self.holdout.metrics) if self.holdout else {}

    @property
    def tags(self) -> dict[str, str]:
        """The run's facts; the registry adds the gate statuses and the verdict."""
        tags = dict(self.facts.tags)
        if self.holdout is not None:
            tags["holdout_hash"] = self.holdout.holdout_hash
        if self.candidate is not None and self.candidate.identical_to is not None:
            tags["identical_to_version"] = self.candidate.identical_to
        return tags

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.holdout.params) if self.holdout else {}

    @property
    def nested_runs(self) -> tuple[NestedRun, ...]:
        """One run per candidate tried (none without `train.candidates`): its params, its
        validation metric on the training part, what ran it and whether it was chosen."""
        sel = self.facts.selection
        if sel is None:
            return ()
        return tuple(
            NestedRun(
                run_name=f"{self.facts.model_name}-candidate-{s.index}-{s.estimator}",
                tags={
                    "candidate_index": str(s.index),
                    "chosen": str(s is sel.chosen).lower(),
                    "worker": s.worker,
                    "worker_address": s.worker_address,
                    "estimator": s.estimator,
                    "data_hash": self.facts.data_hash,
                    "selection_fit_hash": sel.fit_hash,
                    "selection_validation_hash": sel.validation_hash,
                },
                params={"estimator": s.estimator, **s.params},
                metrics={
                    f"{_SELECTION_METRIC_PREFIX}{s.metric}": s.value,
                    "fit_seconds": s.fit_seconds,
                    "fit_rows": float(s.fit_rows),
                    "validation_rows": float(s.validation_rows),
                },
            )
            for s in sel.scores
        )

    @property
    def metrics(self) -> dict[str, float]:
        """The holdout metrics, the fit time, the chosen candidate's validation metric and
        the PSI against the champion's reference; the registry adds each gate's numbers."""
        if self.holdout is None:
            return {}
        metrics = {**self.holdout.metrics, "fit_seconds": self.holdout.fit_seconds}
        sel = self.facts.selection
        if sel is not None:
            metrics[f"{_SELECTION_METRIC_PREFIX}{sel.metric}"] = sel.chosen.value
        psi = drift_psi(self.candidate.drift) if self.candidate else None
        metrics.update({f"{_DRIFT_METRIC_PREFIX}{k}": v for k, v in (psi or {}).items()})
        return metrics

    @property
    def version_tags(self) -> dict[str, str]:
        """The facts a version carries besides its gates, verdict and evidence links."""
        if self.candidate is None:
            return {}
        primary = self.holdout_metrics.get(self.candidate.primary_metric, math.nan)
        return {
            "data_hash": self.facts.data_hash,
            "holdout_hash": self.holdout.holdout_hash if self.holdout else "",
            "git_commit": self.facts.tags.get("git_commit", "unknown"),
            "estimator": self.facts.tags.get("estimator", ""),
            "primary_metric": self.candidate.primary_metric,
            "primary_metric_value": f"{primary:.6f}",
        }

    @property
    def description(self) -> str:
        """A version's description: the champion gate's reason."""
        return self.gates[-1].reason if self.candidate is not None else ""

    def artifacts(self, run_id: str) -> dict[str, bytes]:
        """Every artifact of the run by its path in the registry's layout; the report is
        titled with the run it is stored in. The registry adds the gates' evidence JSON."""
        out = {CONFIG_ARTIFACT: _json_bytes(self.facts.config)}
        if self.facts.selection is not None:
            out[SELECTION_ARTIFACT] = _json_bytes(self.facts.selection.to_dict())
        out.update({f"{DATA_DOCS_ARTIFACT_DIR}/{p}": b for p, b in self.data_docs.items()})
        c = self.candidate
        if c is None:
            return out
        out.update({f"{MODEL_ARTIFACT_DIR}/{p}": b for p, b in c.model_files.items()})
        out[PROFILE_ARTIFACT] = _json_bytes(c.profile)
        out[HISTOGRAMS_ARTIFACT] = _json_bytes(c.histograms)
        if c.calibrator is not None:
            out[CALIBRATOR_ARTIFACT] = _json_bytes(c.calibrator)
        if c.drift is not None:
            out[DRIFT_ARTIFACT] = _json_bytes(c.drift.to_dict())
        out[SAMPLE_ARTIFACT] = c.sample
        title = f"{self.facts.model_name}: challenger from run {run_id}"
        out[REPORT_ARTIFACT] = titled_report(title, c.report).encode()
        return out


def rejection_reason(gates: Sequence[GateResult]) -> str:
    return "; ".join(f"{g.name} gate {g.status.value}: {g.reason}" for g in gates if not g.passed)


def describe_run(
    cfg: MlgateConfig,
    config_path: str,
    data_path: str | None,
    df: pd.DataFrame,
    champion_version: str | None,
    flow_run_id: str | None,
) -> RunFacts:
    data_hash = hash_frame(df)
    return RunFacts(
        model_name=cfg.registry.model_name,
        run_name=f"{cfg.registry.model_name}-{cfg.train.estimator}",
        data_hash=data_hash,
        champion_version=champion_version,
        tags={
            "data_hash": data_hash,
            "git_commit": registry.git_commit(Path(config_path).resolve().parent),
            "data_path": str(data_path or cfg.dataset.path),
            "champion_version": str(champion_version),
            "prefect_flow_run_id": str(flow_run_id),
            "estimator": cfg.train.estimator,
        },
        config=cfg.model_dump(mode="json"),
    )


def describe_choice(facts: RunFacts, selection: Selection) -> RunFacts:
    """The facts of a run whose model is the candidate `selection` chose: named and tagged
    after its estimator, with the choice and the rows it used."""
    chosen = selection.chosen
    return dataclasses.replace(
        facts,
        run_name=f"{facts.model_name}-{chosen.estimator}",
        tags={
            **facts.tags,
            "estimator": chosen.estimator,
            "selected_candidate": str(chosen.index),
            "selection_fit_hash": selection.fit_hash,
            "selection_validation_hash": selection.validation_hash,
        },
        selection=selection,
    )


def gate_training_data(
    df: pd.DataFrame, dataset: DatasetConfig, gate: DataGateConfig, reference: DataProfile
) -> tuple[GateResult, dict[str, bytes]]:
    """The data gate and the Data Docs Great Expectations rendered for it, read into memory
    (path -> bytes) so they outlive the scratch folder; none when GX rendered none."""
    with tempfile.TemporaryDirectory() as docs:
        result = check_data_quality(df, dataset, gate, reference, docs_dir=Path(docs))
        files = read_tree(Path(docs)) if "data_docs_index" in result.evidence else {}
    return result, files


def score_holdout(
    model: TrainedModel,
    onnx_model: OnnxModel,
    parts: Split,
    dataset: DatasetConfig,
    train: TrainConfig,
) -> ScoredHoldout:
    holdout = parts.holdout
    y = encode_target(holdout, dataset)
    sklearn_scores = predict_proba(model.pipeline, holdout, dataset)
    session = make_session(onnx_model.content)
    onnx_scores = predict_proba_onnx(session, holdout, dataset)
    challenger = ScoredModel(
        onnx_scores,
        latency_us_per_row=latency_per_row_us(session, holdout, dataset),
        size_bytes=onnx_model.size_bytes,
    )
    return ScoredHoldout(
        frame=holdout,
        holdout_hash=parts.holdout_hash,
        y=y,
        sklearn_scores=sklearn_scores,
        onnx_scores=onnx_scores,
        metrics=evaluate(y, sklearn_scores),
        challenger=challenger,
        slices=holdout[list(dataset.slice_columns)] if dataset.slice_columns else None,
        params={"estimator": model.estimator, **train.params},
        fit_seconds=model.fit_seconds,
    )


def gate_behaviour(
    onnx_model: OnnxModel,
    holdout: ScoredHoldout,
    champion: ChampionState,
    dataset: DatasetConfig,
    cfg: BehaviourGateConfig,
) -> GateResult:
    """The behaviour gate on the served (ONNX) model: every perturbed holdout is scored by
    the session and the function that scored the holdout for the other gates; slice gaps
    are compared with the champion's scores of the same holdout."""
    session = make_session(onnx_model.content)
    return check_behaviour(
        lambda frame: predict_proba_onnx(session, frame, dataset),
        holdout.frame,
        holdout.y,
        cfg,
        champion_scores=champion.scored.scores if champion.scored else None,
        champion_version=champion.version,
        champion_error=champion.error,
        id_column=dataset.id_column,
    )


def holdout_histograms(
    holdout: ScoredHoldout, dataset: DatasetConfig, bins: int
) -> ReferenceHistograms:
    """The reference histograms stored with a version. Monitoring compares live traffic with
    them, so they describe unseen rows: the holdout's features and the scores the served
    (ONNX) model gave them."""
    return compute_reference_histograms(holdout.frame, dataset, holdout.onnx_scores, bins)


def stopped_evidence(
    facts: RunFacts,
    gates: Sequence[GateResult],
    data_docs: Mapping[str, bytes],
    holdout: ScoredHoldout | None = None,
) -> TrainingEvidence:
    """A run a gate stopped before the champion gate: nothing of it can be registered."""
    return TrainingEvidence(facts, tuple(gates), data_docs, holdout)


def gather_training_evidence(
    cfg: MlgateConfig,
    facts: RunFacts,
    df: pd.DataFrame,
    holdout: ScoredHoldout,
    onnx_model: OnnxModel,
    gates: Sequence[GateResult],
    data_docs: Mapping[str, bytes],
    champion: ChampionState,
    histograms: ReferenceHistograms,
) -> TrainingEvidence:
    """The evidence of a challenger the champion gate (the last of `gates`) judged."""
    drift = drift_vs_champion(df, champion.histograms, cfg.gates.drift)
    primary_metric = cfg.gates.champion.primary_metric
    report = report_sections(
        y=holdout.y,
        challenger=holdout.onnx_scores,
        champion=champion.scored.scores if champion.scored else None,
        champion_version=champion.version,
        slices=holdout.slices,
        gates=list(gates),
        primary_metric=primary_metric,
        drift_psi=drift_psi(drift),
        facts={
            "estimator": cfg.train.estimator,
            **({"candidate choice": facts.selection.reason} if facts.selection else {}),
            "data hash": facts.data_hash,
            "holdout hash": holdout.holdout_hash,
            "holdout rows": str(len(holdout.y)),
        },
    )
    card = model_card(
        cfg,
        dict(holdout.metrics),
        list(gates),
        facts.data_hash,
        holdout.holdout_hash,
        facts.selection.reason if facts.selection else None,
    )
    # Same data, code and seed give a byte-identical model: a new version would only move
    # @champion to a twin of itself.
    identical = gates[-1].passed and champion.sha256 == onnx_model.sha256
    sample = holdout.frame[list(cfg.dataset.features)].assign(**{SCORE_COLUMN: holdout.onnx_scores})
    candidate = CandidateEvidence(
        onnx=onnx_model,
        model_files=model_files(onnx_model, cfg.dataset, card),
        profile=profile_reference(df, cfg.dataset).to_dict(),
        histograms=histograms.to_dict(),
        sample=parquet_bytes(sample),
        report=report,
        primary_metric=primary_metric,
        drift=drift,
        identical_to=champion.version if identical else None,
        # On the served (ONNX) model's scores, as monitoring sees them.
        calibrator=fit_calibrator(holdout.y, holdout.onnx_scores).to_dict(),
    )
    return TrainingEvidence(facts, tuple(gates), data_docs, holdout, candidate)


def drift_vs_champion(
    df: pd.DataFrame, reference: ReferenceHistograms | None, cfg: DriftGateConfig
) -> GateResult | None:
    """PSI of the new training data against the champion's reference: evidence of how the
    world moved since the champion was trained. Retraining on drifted data is the point of
    the loop, so this informs the reviewer and never blocks."""
    return None if reference is None else check_drift(df, reference, cfg)


def drift_psi(drift: GateResult | None) -> dict[str, float] | None:
    if drift is None:
        return None
    return {k.removeprefix("psi."): v for k, v in drift.metrics.items() if k.startswith("psi.")}


def model_card(
    cfg: MlgateConfig,
    metrics: dict[str, float],
    gates: list[GateResult],
    data_hash: str,
    holdout_hash: str,
    selection_reason: str | None = None,
) -> str:
    lines = [
        f"# Model card: {cfg.registry.model_name}",
        "",
        f"- estimator: `{cfg.train.estimator}` with params `{json.dumps(cfg.train.params)}`",
        *([f"- candidate choice: {selection_reason}"] if selection_reason else []),
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


def model_files(onnx_model: OnnxModel, dataset: DatasetConfig, card: str) -> dict[str, bytes]:
    """The model directory a version's source points at (`write_model_dir`) and its card."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_dir(onnx_model, dataset, Path(tmp))
        (folder / "model_card.md").write_text(card)
        return read_tree(folder)


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _json_bytes(payload: Any) -> bytes:
    # As `registry.log_json_artifact` writes JSON.
    return json.dumps(payload, indent=2, default=str).encode()
