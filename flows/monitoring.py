"""`monitoring_flow`: one window of live traffic against the champion's reference.

Reads the last window of the inference log and any labelled batches dropped into the
incoming folder, runs the data gate and PSI drift against what was stored with the champion,
estimates the champion's ROC AUC, precision and recall from its scores alone (with the
calibrator stored with it), lets the trigger policy decide whether to start the training
flow, and records the window (its numbers and Evidently's report) in MLflow in one go at the
end. Labelled batches give the realized metrics beside the estimate made on the same rows. A
labelled batch that fails its data gate is quarantined: named in the run and never trained
on. A window without traffic is never drift: it is recorded as `no_traffic` and alerted on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from filelock import FileLock
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from checks.data_quality import DataProfile, check_data_quality
from checks.drift import check_drift, evidently_drift_report_html, window_traffic
from checks.performance import NAME as ESTIMATE_GATE
from checks.performance import check_estimated_performance
from checks.result import GateResult, GateStatus
from checks.runbooks import MONITORING_PAGES, runbook_link
from checks.trigger import Alert, TriggerDecision, TriggerState, decide_retraining
from flows import registry
from flows.champion import ChampionState, read_champion
from flows.deployments import TRAINING_DEPLOYMENT
from flows.training import training_flow
from models.config import (
    DataGateConfig,
    DatasetConfig,
    DriftGateConfig,
    MlgateConfig,
    MonitorConfig,
    load_config,
)
from models.data import SUPPORTED_SUFFIXES, encode_target, read_table
from models.metrics import metric_value
from models.model_ref import ModelRef
from models.onnx_export import make_session, predict_proba_with_schema
from models.performance_estimate import Calibrator, compare_to_realized
from models.reference import SCORE_COLUMN, ReferenceHistograms
from models.registry_layout import (
    CALIBRATOR_ARTIFACT,
    EVIDENCE_DIR,
    MONITORING_ARTIFACT,
    SAMPLE_ARTIFACT,
    SHADOW_VARIANT,
)
from services.inference_log import read_inference_log
from services.model_store import load_registered_model

# Under the incoming folder: labelled batches that passed their data gate (trained on at
# the next retrain) and those that failed it (kept for a person, never trained on).
PROCESSED_DIR = "processed"
QUARANTINE_DIR = "quarantine"
DRIFT_REPORT_ARTIFACT = f"{EVIDENCE_DIR}/drift_report.html"


@dataclass
class MonitoringOutcome:
    window_start: datetime
    window_end: datetime
    rows: int
    champion_version: str | None
    gates: list[GateResult] = field(default_factory=list)
    live_metrics: dict[str, float] = field(default_factory=dict)
    decision: str = ""
    retrained: bool = False
    training: str | None = None
    run_id: str | None = None
    quarantined: list[str] = field(default_factory=list)
    # How much of the window there was to judge (checks.drift.Traffic); None: nothing was.
    traffic: str | None = None
    alerts: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "gates"}
        d["gates"] = [g.to_dict() for g in self.gates]
        d["window_start"] = self.window_start.isoformat()
        d["window_end"] = self.window_end.isoformat()
        return d


@dataclass(frozen=True)
class IncomingBatches:
    """The labelled batches found in one window, each gated and moved aside once."""

    gates: list[GateResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    processed: list[Path] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class DriftReport:
    """Evidently's HTML drift report of a window, or why there is none. The visual report is
    evidence, never a verdict: an error in it is kept, not raised."""

    html: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class MonitoringEvidence:
    """One monitoring window as `registry.record_monitoring_run` writes it."""

    run_name: str
    tags: dict[str, str]
    gates: tuple[GateResult, ...]
    metrics: dict[str, float]
    outcome: dict[str, Any]
    drift_report: bytes | None = None

    def artifacts(self, run_id: str) -> dict[str, bytes]:
        out = {MONITORING_ARTIFACT: json.dumps(self.outcome, indent=2, default=str).encode()}
        if self.drift_report is not None:
            out[DRIFT_REPORT_ARTIFACT] = self.drift_report
        return out


def trigger_state_path(cfg: MlgateConfig) -> Path:
    folder = cfg.registry.store_dir / "monitor"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{cfg.registry.model_name}.trigger.json"


def load_trigger_state(cfg: MlgateConfig) -> TriggerState:
    path = trigger_state_path(cfg)
    return TriggerState.from_dict(json.loads(path.read_text())) if path.exists() else TriggerState()


def _save_trigger_state(cfg: MlgateConfig, state: TriggerState) -> None:
    path = trigger_state_path(cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2))
    tmp.replace(path)


def advance_trigger(
    cfg: MlgateConfig,
    data_quality: GateResult | None,
    drift: GateResult,
    now: datetime,
    estimate: GateResult | None = None,
) -> TriggerDecision:
    """The trigger policy on this window; the state of earlier windows is read and written
    under one lock, so concurrent windows never lose a count."""
    with FileLock(str(trigger_state_path(cfg).with_suffix(".lock")), timeout=60):
        decision = decide_retraining(
            load_trigger_state(cfg),
            data_quality=data_quality,
            drift=drift,
            now=now,
            cfg=cfg.monitor,
            estimate=estimate,
        )
        _save_trigger_state(cfg, decision.state)
    return decision


def window_bounds(end: datetime, hours: float) -> tuple[datetime, datetime]:
    """The window that ends at `end` (naive: UTC, as in the inference log) and lasts
    `hours`, as (start, end) in UTC."""
    if not hours > 0:
        raise ValueError(f"a monitoring window must last longer than 0 hours, not {hours}")
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    return end - timedelta(hours=hours), end


def read_window(cfg: MlgateConfig, since: datetime, until: datetime) -> pd.DataFrame:
    return read_inference_log(cfg.inference_log_location(), cfg.registry.model_name, since, until)


def champion_traffic(window: pd.DataFrame, version: str) -> pd.DataFrame:
    """The window's rows the champion scored (not a shadow's rows, even of the same version:
    a shadow that was promoted scored its rows beside the champion of its day)."""
    if not len(window):
        return window
    served = window["model_version"].astype(str) == version
    return window[served & (window["variant"].astype(str) != SHADOW_VARIANT)]


def gate_live_data(
    window: pd.DataFrame, dataset: DatasetConfig, gate: DataGateConfig, profile: DataProfile
) -> GateResult | None:
    """The data gate on the window's features (no labels); none for an empty window."""
    if not len(window):
        return None
    return check_data_quality(
        window[list(dataset.features)], dataset, gate, profile, with_label=False
    )


def gate_drift(
    window: pd.DataFrame,
    dataset: DatasetConfig,
    reference: ReferenceHistograms,
    gate: DriftGateConfig,
) -> GateResult:
    """PSI per feature and on the score; an empty window is the drift gate's to judge."""
    features = list(dataset.features)
    if not len(window):
        return check_drift(pd.DataFrame(columns=features), reference, gate, scores=None)
    return check_drift(window[features], reference, gate, scores=window["score"].to_numpy())


def read_calibrator(
    client: MlflowClient, cfg: MlgateConfig, champion: ChampionState
) -> Calibrator | None:
    """The calibrator stored with the champion; none for a version trained before
    performance estimation, or one whose calibrator cannot be read (said in the log)."""
    if champion.version is None:
        return None
    try:
        mv = client.get_model_version(cfg.registry.model_name, str(champion.version))
        raw = registry.load_json_artifact(client, str(mv.run_id), CALIBRATOR_ARTIFACT)
        return Calibrator.from_dict(raw)
    except Exception as err:
        get_run_logger().warning(
            "no performance estimate: calibrator of v%s unreadable: %s", champion.version, err
        )
        return None


def gate_estimate(
    window: pd.DataFrame, calibrator: Calibrator | None, drift: GateResult, monitor: MonitorConfig
) -> GateResult:
    """The champion's performance estimated from the window's scores, judged on the traffic
    the drift gate saw."""
    scores = window["score"].to_numpy() if len(window) else np.empty(0)
    return check_estimated_performance(
        calibrator, scores, window_traffic(drift), monitor.max_estimated_drop
    )


def processed_dir(cfg: MlgateConfig) -> Path:
    return cfg.incoming_dir() / PROCESSED_DIR


def quarantine_dir(cfg: MlgateConfig) -> Path:
    return cfg.incoming_dir() / QUARANTINE_DIR


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.move(str(path), target)
    return target


def score_incoming(
    cfg: MlgateConfig, champion: ChampionState, calibrator: Calibrator | None = None
) -> IncomingBatches:
    """Labelled batches dropped into the incoming folder, each gated with its labels and
    moved aside so it is counted once: one that passed goes to `processed/`, is scored by the
    champion for the live metric and is trained on at the next retrain; one that failed goes
    to `quarantine/`, is neither scored nor trained on, and is named in the outcome. With a
    calibrator, the metrics estimated from the scores alone stand beside the realized ones
    (`live_estimated_*`, `live_realized_*`, `live_estimation_error_*`)."""
    incoming = cfg.incoming_dir()
    files = sorted(p for p in incoming.glob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files or champion.version is None or champion.profile is None:
        return IncomingBatches()
    loaded = load_registered_model(
        cfg.registry.resolved_tracking_uri(),
        ModelRef(cfg.registry.model_name, version=champion.version),
    )
    session = make_session(loaded.content)
    gates, frames, processed, quarantined = [], [], [], []
    for path in files:
        batch = read_table(path)
        gate = check_data_quality(batch, cfg.dataset, cfg.gates.data, champion.profile)
        gates.append(GateResult(f"incoming:{path.name}", gate.status, gate.reason, gate.metrics))
        if gate.passed:
            frames.append(batch)
            processed.append(_move(path, processed_dir(cfg)))
        else:
            quarantined.append(_move(path, quarantine_dir(cfg)))
    metrics: dict[str, float] = {}
    if frames:
        labelled = pd.concat(frames, ignore_index=True)
        y = encode_target(labelled, cfg.dataset)
        scores = predict_proba_with_schema(session, labelled, loaded.schema)
        name = cfg.gates.champion.primary_metric
        metrics = {f"live_{name}": metric_value(name, y, scores), "labelled_rows": float(len(y))}
        if calibrator is not None:
            compared = compare_to_realized(calibrator, y, scores)
            metrics.update({f"live_{k}": v for k, v in compared.items()})
    return IncomingBatches(gates, metrics, processed, quarantined)


def combine_training_data(cfg: MlgateConfig) -> Path | None:
    """The configured data plus every labelled batch that passed its gate (`processed/`;
    never `quarantine/`), so a retrain learns from the world as it is now."""
    folder = processed_dir(cfg)
    batches = sorted(folder.glob("*")) if folder.exists() else []
    if not batches:
        return None
    frames = [read_table(cfg.dataset.path)] + [read_table(p) for p in batches]
    columns = list(frames[0].columns)
    combined = pd.concat([f[columns] for f in frames], ignore_index=True)
    if cfg.dataset.id_column:
        combined = combined.drop_duplicates(subset=[cfg.dataset.id_column], keep="last")
    out = cfg.registry.store_dir / "training_data"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"combined-{datetime.now(UTC):%Y%m%dT%H%M%S}.parquet"
    combined.to_parquet(path, index=False)
    return path


def start_training(config_path: str, data_path: Path | None) -> str:
    """Through the training deployment when one is served, else as a subflow here."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    params = {"config_path": config_path, "data_path": str(data_path) if data_path else None}
    try:
        run = cast(Any, run_deployment(TRAINING_DEPLOYMENT, parameters=params, timeout=0))
        return f"started deployment {TRAINING_DEPLOYMENT}: flow run {run.id}"
    except ObjectNotFound:
        outcome = training_flow(config_path=config_path, data_path=params["data_path"])
        verdict = "accepted" if outcome.accepted else f"rejected at {outcome.stopped_at}"
        return f"training subflow {verdict}: version {outcome.version}; {outcome.reason}"


def start_retraining(cfg: MlgateConfig, config_path: str, reason: str) -> str:
    get_run_logger().info("retraining: %s", reason)
    return start_training(config_path, combine_training_data(cfg))


def raise_alerts(cfg: MlgateConfig, alerts: tuple[Alert, ...]) -> None:
    """Each alert under a title of its own kind, so a channel can route no-traffic apart
    from data quality."""
    for alert in alerts:
        get_run_logger().warning("alert (%s): %s", alert.kind.value, alert.message)
        title = f"mlgate: {cfg.registry.model_name} monitoring alert: {alert.kind.value}"
        page = runbook_link(MONITORING_PAGES[alert.kind.value], cfg.slo.runbook_url)
        registry.notify(cfg.registry, title, f"{alert.message}\nrunbook: {page}")


def drift_report(
    client: MlflowClient, cfg: MlgateConfig, champion: ChampionState, window: pd.DataFrame
) -> DriftReport:
    """Evidently's report of the window against the holdout sample stored with the champion;
    none for an empty window."""
    if champion.version is None or not len(window):
        return DriftReport()
    try:
        mv = client.get_model_version(cfg.registry.model_name, str(champion.version))
        with tempfile.TemporaryDirectory() as tmp:
            reference = pd.read_parquet(
                client.download_artifacts(str(mv.run_id), SAMPLE_ARTIFACT, tmp)
            )
            current = window.rename(columns={"score": SCORE_COLUMN})
            columns = [c for c in reference.columns if c in current.columns]
            html = evidently_drift_report_html(
                reference[columns], current[columns], columns, Path(tmp) / "drift_report.html"
            )
            return DriftReport(html=Path(html).read_bytes())
    except Exception as err:
        return DriftReport(error=str(err))


def monitoring_evidence(
    cfg: MlgateConfig, outcome: MonitoringOutcome, report: DriftReport
) -> MonitoringEvidence:
    tags = {
        "model_name": cfg.registry.model_name,
        "champion_version": str(outcome.champion_version),
        "window_start": outcome.window_start.isoformat(),
        "window_end": outcome.window_end.isoformat(),
        "decision": outcome.decision[:5000],
        "retrained": str(outcome.retrained).lower(),
    }
    if outcome.traffic is not None:
        tags["traffic"] = outcome.traffic
    if outcome.alerts:
        tags["alerts"] = ", ".join(a["kind"] for a in outcome.alerts)
    if outcome.quarantined:
        tags["quarantined"] = ", ".join(outcome.quarantined)[:5000]
    if report.error is not None:
        tags["evidently_error"] = report.error[:5000]
    metrics = {"rows": float(outcome.rows), **outcome.live_metrics}
    for g in outcome.gates:
        if g.name in ("drift", ESTIMATE_GATE):
            metrics.update(g.metrics)
    return MonitoringEvidence(
        run_name=f"monitor {outcome.window_end:%Y-%m-%d %H:%M}",
        tags=tags,
        gates=tuple(outcome.gates),
        metrics=metrics,
        outcome=outcome.to_dict(),
        drift_report=report.html,
    )


def finish_monitoring(
    client: MlflowClient, cfg: MlgateConfig, outcome: MonitoringOutcome, report: DriftReport
) -> MonitoringOutcome:
    """The window's only MLflow write: its run, once everything about it is known."""
    evidence = monitoring_evidence(cfg, outcome, report)
    outcome.run_id = registry.record_monitoring_run(client, cfg.registry, evidence)
    return outcome


def _task(fn: Any, name: str, **kw: Any) -> Any:
    return task(name=name, cache_policy=NO_CACHE, **kw)(fn)


read_traffic = _task(read_window, "read-window", retries=2, retry_delay_seconds=2)
run_data_gate = _task(gate_live_data, "live-data-gate")
run_drift = _task(gate_drift, "drift")
estimate_performance = _task(gate_estimate, "performance-estimate")
gate_incoming = _task(score_incoming, "labelled-batches")
decide = _task(advance_trigger, "trigger-policy")
render_drift_report = _task(drift_report, "drift-report")


@flow(name="monitoring_flow", log_prints=True)
def monitoring_flow(
    config_path: str = "mlgate.yaml",
    now: datetime | None = None,
    retrain: bool = True,
    window_hours: float | None = None,
) -> MonitoringOutcome:
    """One monitoring window; `now` fixes the window's end (default: the current time; naive
    is UTC, as in the inference log), `window_hours` its length (default:
    `monitor.window_hours`)."""
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    hours = cfg.monitor.window_hours if window_hours is None else window_hours
    start, end = window_bounds(now or datetime.now(UTC), hours)
    champion = read_champion(client, cfg)
    if champion.version is None or champion.histograms is None or champion.profile is None:
        idle = MonitoringOutcome(start, end, 0, champion.version, decision=_idle_reason(champion))
        return finish_monitoring(client, cfg, idle, DriftReport())

    window = champion_traffic(read_traffic(cfg, start, end), champion.version)
    dq = run_data_gate(window, cfg.dataset, cfg.gates.data, champion.profile)
    drift = run_drift(window, cfg.dataset, champion.histograms, cfg.gates.drift)
    calibrator = read_calibrator(client, cfg, champion)
    estimate = estimate_performance(window, calibrator, drift, cfg.monitor)
    batches = gate_incoming(cfg, champion, calibrator)
    decision = decide(cfg, dq, drift, end, estimate)
    raise_alerts(cfg, decision.alerts)
    retrained = decision.retrain and retrain
    training = start_retraining(cfg, config_path, decision.reason) if retrained else None
    outcome = MonitoringOutcome(
        start,
        end,
        len(window),
        champion.version,
        gates=[g for g in (dq, drift, estimate) if g is not None] + batches.gates,
        live_metrics=batches.metrics,
        decision=decision.reason,
        retrained=retrained,
        training=training,
        quarantined=[p.name for p in batches.quarantined],
        traffic=window_traffic(drift).value,
        alerts=[a.to_dict() for a in decision.alerts],
    )
    report = render_drift_report(client, cfg, champion, window)
    return finish_monitoring(client, cfg, outcome, report)


def _idle_reason(champion: ChampionState) -> str:
    if champion.error is not None:
        return f"champion unreadable: {champion.error}"
    return "no champion with stored reference histograms and profile: nothing to monitor"


def drift_status(outcome: MonitoringOutcome) -> GateStatus | None:
    return next((g.status for g in outcome.gates if g.name == "drift"), None)
