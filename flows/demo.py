"""`make demo`: the whole loop on the bundled churn data with the embedded defaults.

Trains a champion (or a challenger to the previous run's champion), then a deliberately
small challenger that the champion gate should turn down, serves @champion with BentoML,
sends real predictions and checks them against ONNX Runtime in-process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pandas as pd
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from flows.report import gate_tables
from flows.runtime import use_embedded_prefect
from models.config import MlgateConfig, load_config
from models.data import load_dataset
from models.onnx_export import make_session, predict_proba_with_schema
from services.launcher import start_service
from services.model_store import load_registered_model

if TYPE_CHECKING:
    from flows.monitoring import MonitoringOutcome
    from flows.training import TrainingOutcome

console = Console(width=140)

# A gradient-boosting model with five stumps: a plausible but underpowered challenger.
SMALL_CHALLENGER = {
    "MLGATE_TRAIN__ESTIMATOR": "gradient_boosting",
    "MLGATE_TRAIN__PARAMS": json.dumps({"n_estimators": 5, "max_depth": 1}),
}


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _run_training(title: str, config: Path, env: dict[str, str] | None = None) -> TrainingOutcome:
    from flows.training import training_flow

    console.print(Rule(title))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        t = time.perf_counter()
        outcome = training_flow(config_path=str(config))
        elapsed = time.perf_counter() - t
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    console.print(gate_tables(outcome.gates))
    verdict = "[green]ACCEPTED[/]" if outcome.accepted else "[bold red]REJECTED[/]"
    console.print(
        f"{verdict} version={outcome.version} champion before={outcome.champion_before} "
        f"after={outcome.champion_after or outcome.champion_before} ({elapsed:.1f}s)"
    )
    return outcome


EPISODE_WINDOW_S = 8.0


def shifted_batch(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """New customers, as the world drifts: mostly month-to-month contracts and monthly
    charges 5-12% higher than the reference's. Labels are kept, so the batch can also be
    dropped into the incoming folder as labelled data."""
    rng = np.random.default_rng(seed)
    m2m = df[df["contract"] == "Month-to-month"]
    k = int(n * 0.9)
    out = pd.concat(
        [m2m.sample(k, random_state=seed), df.sample(n - k, random_state=seed)]
    ).reset_index(drop=True)
    out["monthly_charges"] = (out["monthly_charges"] * rng.uniform(1.05, 1.12, n)).round(2)
    if "customer_id" in out.columns:
        out["customer_id"] = 100_000 * seed + np.arange(n)
    return out


def _send_batch(url: str, batch: pd.DataFrame, features: list[str]) -> datetime:
    rows = [
        {k: (None if v != v else v) for k, v in r.items()}
        for r in batch[features].to_dict(orient="records")
    ]
    with httpx.Client(timeout=60) as http:
        for i in range(0, len(rows), 50):
            http.post(url, json={"rows": rows[i : i + 50]}).raise_for_status()
    return datetime.now(UTC)


def _drift_episode(
    config: Path, cfg: MlgateConfig, window_ends: list[datetime], shifted: list[pd.DataFrame]
) -> list[MonitoringOutcome]:
    from flows.monitoring import monitoring_flow, trigger_state_path

    console.print(Rule("4. drift episode: one stable window, then three shifted ones"))
    state = trigger_state_path(cfg)
    if state.exists():
        # Each demo run starts its own episode; the cooldown of an earlier run's retrain
        # would otherwise (correctly) hold this one back.
        state.unlink()
        console.print(f"fresh trigger state for this episode ({state} removed)")
    incoming = cfg.incoming_dir()
    incoming.mkdir(parents=True, exist_ok=True)
    labelled = pd.concat(shifted, ignore_index=True)
    labelled.to_parquet(incoming / f"labelled-{datetime.now(UTC):%Y%m%dT%H%M%S}.parquet")
    console.print(f"dropped {len(labelled)} labelled rows of the shifted period into {incoming}")
    env = {"MLGATE_MONITOR__WINDOW_HOURS": str(EPISODE_WINDOW_S / 3600)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    outcomes = []
    try:
        labels = ["stable", "shifted 1", "shifted 2", "shifted 3"]
        for label, end in zip(labels, window_ends, strict=True):
            out = monitoring_flow(config_path=str(config), now=end + timedelta(seconds=1))
            drift = next((g for g in out.gates if g.name == "drift"), None)
            console.print(
                f"[bold]{label}[/] window: {out.rows} rows, drift "
                f"{drift.status.value if drift else 'n/a'}: {drift.reason if drift else ''}"
            )
            console.print(f"   decision: {out.decision}")
            if out.training:
                console.print(f"   training: {out.training[:400]}")
            outcomes.append(out)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return outcomes


def main(config: Path = Path("mlgate.yaml")) -> int:
    cfg = load_config(config)
    use_embedded_prefect(cfg.registry.store_dir)
    from flows import registry

    first = _run_training("1. training flow on the bundled data", config)
    second = _run_training(
        "2. a second, smaller challenger (5 stumps) against the champion", config, SMALL_CHALLENGER
    )

    console.print(Rule("3. serving @champion (BentoML + ONNX Runtime)"))
    port = _free_port(cfg.serving.port)
    rows = load_dataset(cfg.dataset).sample(5, random_state=1)
    features = list(cfg.dataset.features)
    payload = {
        "rows": [
            {k: (None if v != v else v) for k, v in r.items()}
            for r in rows[features].to_dict(orient="records")
        ]
    }
    champion = load_registered_model(
        cfg.registry.resolved_tracking_uri(), cfg.registry.model_name, alias="champion"
    )
    expected = predict_proba_with_schema(make_session(champion.content), rows, champion.schema)
    base = load_dataset(cfg.dataset)
    stable_batch = base.sample(600, random_state=11)
    shifted_batches = [shifted_batch(base, 600, seed) for seed in (21, 22, 23)]
    t = time.perf_counter()
    with start_service(config, alias="champion", version=None, port=port) as svc:
        svc.wait_ready(timeout=180)
        started = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/predict"
        resp = httpx.post(url, json=payload, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        bad = httpx.post(url, json={"rows": [{**payload["rows"][0], "tenure": "long"}]}, timeout=30)
        # Traffic for the drift episode, one batch per monitoring window: a window is as
        # long as one batch's sending plus a margin, and the batches are that far apart.
        window_ends = [_send_batch(url, stable_batch, features)]
        for batch in shifted_batches:
            time.sleep(EPISODE_WINDOW_S)
            window_ends.append(_send_batch(url, batch, features))
    scores = [p["score"] for p in body["predictions"]]
    worst = max(abs(a - b) for a, b in zip(scores, expected, strict=True))
    console.print(f"service ready in {started:.1f}s on {url}")
    table = Table(title=f"predictions from {body['model_name']} v{body['model_version']}")
    for col in ("customer", "contract", "tenure", "monthly_charges", "served score", "in-process"):
        table.add_column(col)
    for (_, r), s, e in zip(rows.iterrows(), scores, expected, strict=True):
        table.add_row(
            str(r.get(cfg.dataset.id_column or "", "")),
            str(r["contract"]),
            str(r["tenure"]),
            str(r["monthly_charges"]),
            f"{s:.6f}",
            f"{e:.6f}",
        )
    console.print(table)
    console.print(f"max |served - in-process| = {worst:.2e}")
    console.print(f"a bad request (tenure='long') got HTTP {bad.status_code}: {bad.text[:200]}")

    episode = _drift_episode(config, cfg, window_ends, shifted_batches)

    console.print(Rule("summary"))
    client = registry.connect(cfg.registry)
    versions = registry.list_versions(client, cfg.registry.model_name)
    summary = Table(title=f"{cfg.registry.model_name}: newest versions")
    for col in ("version", "aliases", "outcome", "estimator", "metric", "gates"):
        summary.add_column(col)
    for v in versions[:6]:
        summary.add_row(
            v["version"],
            ", ".join("@" + a for a in v["aliases"]),
            v["outcome"],
            v["estimator"],
            f"{v['primary_metric']}={v['primary_metric_value']}",
            " ".join(f"{k}={s}" for k, s in sorted(v["gates"].items())),
        )
    console.print(summary)
    for label, out in (("bundled-config challenger", first), ("small challenger", second)):
        verdict = "accepted" if out.accepted else f"rejected at the {out.stopped_at} gate"
        console.print(f"{label}: {verdict}: {out.reason[:300]}")
    console.print(
        "MLflow UI: .venv/bin/mlflow ui --backend-store-uri "
        f"{cfg.registry.resolved_tracking_uri()} --port 5000"
    )
    retrains = [o.retrained for o in episode]
    console.print(
        f"drift episode: stable window retrained={retrains[0]}, shifted windows "
        f"retrained={retrains[1:]} -> {sum(retrains)} retraining(s)"
    )
    ok = (
        body["model_version"] == champion.version
        and worst < 1e-5
        and 400 <= bad.status_code < 500
        and retrains == [False, False, False, True]
    )
    if not ok:
        console.print(
            "[bold red]demo check failed: served answers differ from in-process ONNX, or the "
            "drift episode did not retrain exactly once[/]"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
