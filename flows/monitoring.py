"""`monitoring_flow`: one window of live traffic against the champion's reference.

Reads the last window of the inference log and any labelled batches dropped into the
incoming folder, runs the data gate and PSI drift against what was stored with the champion,
logs the numbers and Evidently's report to MLflow, and lets the trigger policy decide whether
to start the training flow.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pandas as pd
from filelock import FileLock
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from checks.data_quality import check_data_quality
from checks.drift import check_drift, evidently_drift_report_html
from checks.result import GateResult, GateStatus
from checks.trigger import TriggerDecision, TriggerState, decide_retraining
from flows import registry
from flows.schedule import TRAINING_NAME
from flows.training import ChampionState, read_champion, training_flow
from models.config import MlgateConfig, load_config
from models.data import SUPPORTED_SUFFIXES, encode_target, read_table
from models.metrics import metric_value
from models.onnx_export import make_session, predict_proba_with_schema
from models.reference import SCORE_COLUMN
from services.inference_log import read_inference_log
from services.model_store import load_registered_model

MONITOR_EXPERIMENT = "mlgate-monitoring"
TRAINING_DEPLOYMENT = f"training_flow/{TRAINING_NAME}"

run_data_gate = task(name="live-data-gate", cache_policy=NO_CACHE)(check_data_quality)
run_drift = task(name="drift", cache_policy=NO_CACHE)(check_drift)
decide = task(name="trigger-policy", cache_policy=NO_CACHE)(decide_retraining)


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

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "gates"}
        d["gates"] = [g.to_dict() for g in self.gates]
        d["window_start"] = self.window_start.isoformat()
        d["window_end"] = self.window_end.isoformat()
        return d


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


@task(name="read-window", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def read_window(cfg: MlgateConfig, since: datetime, until: datetime) -> pd.DataFrame:
    return read_inference_log(cfg.inference_log_dir(), cfg.registry.model_name, since, until)


@task(name="labelled-batches", cache_policy=NO_CACHE)
def score_incoming(
    cfg: MlgateConfig, champion: ChampionState, processed_dir: Path
) -> tuple[list[GateResult], dict[str, float], list[Path]]:
    """Labelled batches dropped into the incoming folder: gated with their labels, scored by
    the champion for the live metric, then moved aside so each is counted once."""
    incoming = cfg.incoming_dir()
    files = sorted(p for p in incoming.glob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files or champion.version is None or champion.profile is None:
        return [], {}, []
    loaded = load_registered_model(
        cfg.registry.resolved_tracking_uri(), cfg.registry.model_name, version=champion.version
    )
    session = make_session(loaded.content)
    gates, frames, moved = [], [], []
    for path in files:
        batch = read_table(path)
        gate = check_data_quality(batch, cfg.dataset, cfg.gates.data, champion.profile)
        gates.append(GateResult(f"incoming:{path.name}", gate.status, gate.reason, gate.metrics))
        processed_dir.mkdir(parents=True, exist_ok=True)
        target = processed_dir / path.name
        shutil.move(str(path), target)
        if gate.passed:
            frames.append(batch)
            moved.append(target)
    metrics: dict[str, float] = {}
    if frames:
        labelled = pd.concat(frames, ignore_index=True)
        y = encode_target(labelled, cfg.dataset)
        scores = predict_proba_with_schema(session, labelled, loaded.schema)
        name = cfg.gates.champion.primary_metric
        metrics = {f"live_{name}": metric_value(name, y, scores), "labelled_rows": float(len(y))}
    return gates, metrics, moved


def _training_data(cfg: MlgateConfig, processed_dir: Path) -> Path | None:
    """The configured data plus every labelled batch that passed its gate, so a retrain
    learns from the world as it is now."""
    batches = sorted(processed_dir.glob("*")) if processed_dir.exists() else []
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


def _log_run(
    client: MlflowClient,
    cfg: MlgateConfig,
    outcome: MonitoringOutcome,
    window: pd.DataFrame,
    champion: ChampionState,
) -> str:
    exp = registry.ensure_experiment(client, cfg.registry, MONITOR_EXPERIMENT)
    run = client.create_run(
        exp,
        tags={
            "model_name": cfg.registry.model_name,
            "champion_version": str(champion.version),
            "window_start": outcome.window_start.isoformat(),
            "window_end": outcome.window_end.isoformat(),
            "decision": outcome.decision[:5000],
            "retrained": str(outcome.retrained).lower(),
            **{f"gate.{g.name}": g.status.value for g in outcome.gates},
        },
        run_name=f"monitor {outcome.window_end:%Y-%m-%d %H:%M}",
    )
    run_id = run.info.run_id
    metrics = {"rows": float(outcome.rows), **outcome.live_metrics}
    for g in outcome.gates:
        if g.name == "drift":
            metrics.update(g.metrics)
    registry.log_params_metrics(client, run_id, {}, metrics)
    registry.log_json_artifact(client, run_id, "monitoring.json", outcome.to_dict())
    if champion.version is not None and len(window):
        try:
            _log_evidently_report(client, run_id, cfg, champion, window)
        except Exception as err:  # the visual report is evidence, never a verdict
            client.set_tag(run_id, "evidently_error", str(err)[:5000])
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def _log_evidently_report(
    client: MlflowClient,
    run_id: str,
    cfg: MlgateConfig,
    champion: ChampionState,
    window: pd.DataFrame,
) -> None:
    mv = client.get_model_version(cfg.registry.model_name, str(champion.version))
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = client.download_artifacts(str(mv.run_id), registry.SAMPLE_ARTIFACT, tmp)
        reference = pd.read_parquet(ref_path)
        current = window.rename(columns={"score": SCORE_COLUMN})
        columns = [c for c in reference.columns if c in current.columns]
        html = evidently_drift_report_html(
            reference[columns], current[columns], columns, Path(tmp) / "drift_report.html"
        )
        client.log_artifact(run_id, str(html), "evidence")


@flow(name="monitoring_flow", log_prints=True)
def monitoring_flow(
    config_path: str = "mlgate.yaml", now: datetime | None = None, retrain: bool = True
) -> MonitoringOutcome:
    """One monitoring window; `now` fixes the window's end (default: the current time)."""
    logger = get_run_logger()
    cfg = load_config(config_path)
    client = registry.connect(cfg.registry)
    end = (now or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(hours=cfg.monitor.window_hours)
    champion = read_champion(client, cfg)
    outcome = MonitoringOutcome(start, end, 0, champion.version)
    if champion.version is None or champion.histograms is None or champion.profile is None:
        outcome.decision = (
            "no champion with stored reference histograms and profile: nothing to monitor"
            if champion.error is None
            else f"champion unreadable: {champion.error}"
        )
        outcome.run_id = _log_run(client, cfg, outcome, pd.DataFrame(), champion)
        return outcome

    window = cast(pd.DataFrame, read_window(cfg, start, end))
    if len(window):
        window = window[window["model_version"].astype(str) == champion.version]
    outcome.rows = len(window)
    features = list(cfg.dataset.features)
    dq = (
        run_data_gate(
            window[features], cfg.dataset, cfg.gates.data, champion.profile, with_label=False
        )
        if len(window)
        else None
    )
    drift = run_drift(
        window[features] if len(window) else pd.DataFrame(columns=features),
        champion.histograms,
        cfg.gates.drift,
        scores=window["score"].to_numpy() if len(window) else None,
    )
    outcome.gates = [g for g in (dq, drift) if g is not None]

    processed = cfg.incoming_dir() / "processed"
    batch_gates, live, _ = score_incoming(cfg, champion, processed)
    outcome.gates += batch_gates
    outcome.live_metrics = live

    lock = FileLock(str(trigger_state_path(cfg).with_suffix(".lock")), timeout=60)
    with lock:
        decision: TriggerDecision = decide(
            load_trigger_state(cfg), data_quality=dq, drift=drift, now=end, cfg=cfg.monitor
        )
        _save_trigger_state(cfg, decision.state)
    outcome.decision = decision.reason
    for alert in decision.alerts:
        logger.warning("alert: %s", alert)
        registry.notify(cfg.registry, f"mlgate: {cfg.registry.model_name} monitoring alert", alert)
    if decision.retrain and retrain:
        logger.info("retraining: %s", decision.reason)
        outcome.retrained = True
        outcome.training = start_training(config_path, _training_data(cfg, processed))
    outcome.run_id = _log_run(client, cfg, outcome, window, champion)
    return outcome


def drift_status(outcome: MonitoringOutcome) -> GateStatus | None:
    return next((g.status for g in outcome.gates if g.name == "drift"), None)
