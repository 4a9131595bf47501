"""`make demo`: the whole loop on the bundled churn data with the embedded defaults.

Trains a champion (or a challenger to the previous run's champion), then a deliberately
small challenger that the champion gate should turn down, serves @champion with BentoML,
sends real predictions and checks them against ONNX Runtime in-process, runs a drift
episode, and finally two canary rollouts through HAProxy with the holdout replayed as live
traffic: a healthy retrained candidate that earns @champion step by step, and a candidate
made bad on purpose (trained on shuffled labels) that is rolled back.

Every service it starts requires an API key, as `mlgate serve` does: the demo mints one
for its own clients and gives the services its sha256 in `MLGATE_API_KEYS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pandas as pd
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from checks.result import GateResult
from flows.gate_tables import gate_tables
from flows.runtime import use_embedded_prefect
from models.config import MlgateConfig, env_override_name, load_config
from models.data import load_dataset, split_data
from models.model_ref import ModelRef
from models.onnx_export import make_session, predict_proba_with_schema
from models.registry_layout import CHAMPION_ALIAS
from services.auth import API_KEYS_ENV, hash_api_key, new_api_key_token
from services.canary_state import CanaryState, StateStore, canary_paths
from services.launcher import start_service
from services.model_store import load_registered_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

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


@contextlib.contextmanager
def _environ(env: dict[str, str] | None) -> Iterator[None]:
    """`env` added to the process environment (config overrides) for the block."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_training(title: str, config: Path, env: dict[str, str] | None = None) -> TrainingOutcome:
    from flows.training import training_flow

    console.print(Rule(title))
    with _environ(env):
        t = time.perf_counter()
        outcome = training_flow(config_path=str(config))
        elapsed = time.perf_counter() - t
    console.print(gate_tables(outcome.gates))
    verdict = "[green]ACCEPTED[/]" if outcome.accepted else "[bold red]REJECTED[/]"
    console.print(
        f"{verdict} version={outcome.version} champion before={outcome.champion_before} "
        f"after={outcome.champion_after or outcome.champion_before} ({elapsed:.1f}s)"
    )
    return outcome


EPISODE_WINDOW_S = 8.0
# Holdout rows replayed through the service while a retrained version shadows @champion.
SHADOW_ROWS = 600


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


def _send_batch(
    url: str, batch: pd.DataFrame, features: list[str], headers: dict[str, str]
) -> datetime:
    rows = [
        {k: (None if v != v else v) for k, v in r.items()}
        for r in batch[features].to_dict(orient="records")
    ]
    with httpx.Client(timeout=60, headers=headers) as http:
        for i in range(0, len(rows), 50):
            http.post(url, json={"rows": rows[i : i + 50]}).raise_for_status()
    return datetime.now(UTC)


def _drift_episode(
    config: Path, cfg: MlgateConfig, window_ends: list[datetime], shifted: list[pd.DataFrame]
) -> list[MonitoringOutcome]:
    from flows.monitoring import monitoring_flow, trigger_state_path

    console.print(Rule("5. drift episode: one stable window, then three shifted ones"))
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
    outcomes = []
    with _environ(env):
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
    return outcomes


# The demo's canary: steps as configured, judged every 3 s on at least 40 requests a side
# (the defaults are 60 s and 100, for real traffic), with the holdout replayed at 120
# requests a second through HAProxy.
DEMO_CANARY = {
    "MLGATE_CANARY__INTERVAL_S": "3",
    "MLGATE_CANARY__MIN_REQUESTS": "40",
    "MLGATE_CANARY__MAX_WAIT_S": "60",
    "MLGATE_CANARY__DRAIN_TIMEOUT_S": "5",
}
REPLAY_RATE = 120.0
DEMO_KEY_RATE = 10 * REPLAY_RATE
# Retrained candidates for the canary: the bundled config's model with a few trees more or
# less, one that differs from the current champion (a model identical to it would be
# "nothing new to register").
HEALTHY_TREES = (170, 160, 140, 180)


@dataclass
class CanaryEpisode:
    healthy: TrainingOutcome
    healthy_state: CanaryState | None
    bad_version: str
    bad_state: CanaryState
    champion_before_bad: str | None
    champion_after: str | None
    clients: dict[str, object]
    outside_canary_failures: int


def _healthy_params(client: MlflowClient, cfg: MlgateConfig) -> dict[str, str]:
    from flows import registry

    mv = registry.get_alias_version(client, cfg.registry.model_name, "champion")
    trees = client.get_run(mv.run_id).data.params.get("n_estimators") if mv and mv.run_id else None
    chosen = next(n for n in HEALTHY_TREES if str(n) != trees)
    params = {**cfg.train.params, "n_estimators": chosen}
    return {"MLGATE_TRAIN__PARAMS": json.dumps(params)}


def _register_bad_candidate(client: MlflowClient, cfg: MlgateConfig) -> str:
    """The config's model trained on shuffled labels: valid probabilities that carry no
    signal, every score near the base rate. It would fail the champion gate, so it is
    registered directly (with no gate evidence) and forced onto the canary, with the reason
    recorded: only the canary stands between it and users here."""
    from flows import registry
    from models.data import split_data
    from models.onnx_export import export_onnx
    from models.train import train_model

    df = load_dataset(cfg.dataset)
    train = split_data(df, cfg.dataset, cfg.train).train.copy()
    target = cfg.dataset.target
    train[target] = np.random.default_rng(7).permutation(train[target].to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = train_model(train, cfg.dataset, cfg.train).pipeline
    mv = registry.register_onnx_model(
        client,
        cfg.registry,
        cfg.dataset,
        export_onnx(pipeline, cfg.dataset),
        run_name="demo-shuffled-labels",
        tags={"demo.made_bad": "trained on shuffled labels", "estimator": cfg.train.estimator},
        description="demo: a candidate made bad on purpose (trained on shuffled labels)",
    )
    return str(mv.version)


def _shadow_episode(
    service_url: str, cfg: MlgateConfig, version: str, headers: dict[str, str]
) -> GateResult:
    """A retrained version shadows the champion of the running service: holdout rows are
    replayed as requests (each with its id), their labels fed back by id, and the verdict
    recorded as `gate.shadow` (flows/shadow.py)."""
    from flows import registry
    from flows.shadow import shadow_report, start_shadow, stop_shadow

    client = registry.connect(cfg.registry)
    start_shadow(client, cfg.registry.model_name, version)
    try:
        deadline = time.monotonic() + 4 * cfg.serving.shadow_poll_s + 30
        while (
            httpx.get(f"{service_url}/model", headers=headers, timeout=10).json().get("shadow")
            or {}
        ).get("version") != version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service never started shadowing v{version}")
            time.sleep(0.3)
        holdout = split_data(load_dataset(cfg.dataset), cfg.dataset, cfg.train).holdout
        replay = holdout.head(SHADOW_ROWS)
        features = list(cfg.dataset.features)
        ids = [f"shadow-demo-{i}" for i in range(len(replay))]
        with httpx.Client(base_url=service_url, headers=headers, timeout=30) as http:
            for request_id, record in zip(ids, replay[features].to_dict("records"), strict=True):
                row = {k: (None if v != v else v) for k, v in record.items()}
                http.post("/predict", json={"rows": [row]}, headers={"X-Request-Id": request_id})
            while (http.get("/model").json().get("shadow") or {}).get("scored_rows", 0) < len(ids):
                if time.monotonic() > deadline + 60:
                    break
                time.sleep(0.3)
        # The inference log's writers flush every serving.inference_log_flush_s.
        time.sleep(cfg.serving.inference_log_flush_s + 1.0)
        labels = cfg.registry.store_dir / "shadow_labels.csv"
        pd.DataFrame(
            {"request_id": ids, cfg.dataset.target: replay[cfg.dataset.target].to_numpy()}
        ).to_csv(labels, index=False)
        return shadow_report(cfg, client, labels_path=labels)
    finally:
        stop_shadow(client, cfg.registry.model_name)


def _print_decision(state: CanaryState, *, summary: bool = True) -> None:
    """The verdict's guardrail table (on a promotion, the last step's: the summary lists
    every step), the decision with its numbers, and HAProxy's per-server counts per step."""
    from flows.canary import decision_result

    if summary:
        console.print(gate_tables([decision_result(state)], max_passed_rows=None))
    if state.steps_done and state.phase == "promoted":
        last = state.steps_done[-1].result
        console.print(gate_tables([last], max_passed_rows=None))
    decision = state.decision or {}
    console.print(
        f"[bold]decision[/]: {decision.get('outcome')} v{state.candidate_version}"
        + (f" at guardrail {decision['guardrail']}" if decision.get("guardrail") else "")
        + f": {decision.get('reason')}",
        highlight=False,
    )
    for step in state.steps_done:
        counts = step.haproxy or {}
        console.print(
            f"   step {step.percent:>3}%: HAProxy responses stable "
            f"{counts.get('stable', {}).get('responses')} / canary "
            f"{counts.get('canary', {}).get('responses')} in {step.seconds:.1f} s",
            highlight=False,
        )


def _canary_episode(config: Path, cfg: MlgateConfig, headers: dict[str, str]) -> CanaryEpisode:
    from bench.traffic import Replayer
    from flows import registry
    from flows.canary import MlflowCanaryRegistry, begin_canary
    from flows.cli_canary import print_canary_event
    from services.canary import run_canary, stop_target

    client = registry.connect(cfg.registry)
    public = _free_port(cfg.canary.public_port or cfg.serving.port)
    env = {**DEMO_CANARY, "MLGATE_CANARY__PUBLIC_PORT": str(public)}
    holdout = split_data(load_dataset(cfg.dataset), cfg.dataset, cfg.train).holdout
    rows = json.loads(holdout[list(cfg.dataset.features)].to_json(orient="records"))
    bodies = [json.dumps({"rows": [r]}).encode() for r in rows]
    with (
        _environ(env),
        Replayer(
            public, bodies, rate=REPLAY_RATE, wait_for_target=True, max_s=900, headers=headers
        ) as clients,
    ):
        ccfg = load_config(config)
        healthy = _run_training(
            f"6. canary, training flow with canary.enabled: a retrained candidate on live "
            f"traffic (holdout replayed at {REPLAY_RATE:g} req/s through HAProxy on :{public})",
            config,
            {"MLGATE_CANARY__ENABLED": "true", **_healthy_params(client, ccfg)},
        )
        healthy_state = StateStore(canary_paths(ccfg)).read() if healthy.version else None
        if healthy_state is not None and healthy_state.candidate_version == healthy.version:
            # The training flow printed the canary's summary with its other gates.
            _print_decision(healthy_state, summary=False)
        else:
            healthy_state = None
            console.print(f"no canary ran: {healthy.reason[:300]}")

        console.print(Rule("7. canary of a candidate made bad on purpose (shuffled labels)"))
        bad = _register_bad_candidate(client, ccfg)
        champion_before = MlflowCanaryRegistry(ccfg).champion_version()
        console.print(f"registered v{bad} without gate evidence; forcing it onto the canary")
        begin_canary(
            ccfg,
            bad,
            force=True,
            reason="demo: a candidate made bad on purpose, to show the rollback",
        )
        bad_state = run_canary(
            ccfg, config, MlflowCanaryRegistry(ccfg), on_event=print_canary_event
        )
        _print_decision(bad_state)
        champion_after = MlflowCanaryRegistry(ccfg).champion_version()
        clients.stop()
        stop_target(ccfg)
    summary = clients.summary()
    console.print(
        f"clients through HAProxy: {summary['answers']}; transport errors "
        f"{summary['transport_errors'] or 'none'}; failed outside the canary's share: "
        f"{clients.outside_canary_failures()}",
        highlight=False,
    )
    return CanaryEpisode(
        healthy,
        healthy_state,
        bad,
        bad_state,
        champion_before,
        champion_after,
        summary,
        clients.outside_canary_failures(),
    )


def main(config: Path = Path("mlgate.yaml")) -> int:
    token = new_api_key_token()
    keys = {
        API_KEYS_ENV: f"demo:{hash_api_key(token)}",
        # All of the demo's traffic comes with its one key, the canary's replay at
        # REPLAY_RATE: above the default per-key rate limit.
        env_override_name("serving", "rate_limit_per_s"): str(DEMO_KEY_RATE),
        env_override_name("serving", "rate_limit_burst"): str(int(DEMO_KEY_RATE)),
    }
    with _environ(keys):
        return _run_demo(config, {"Authorization": f"Bearer {token}"})


def _run_demo(config: Path, headers: dict[str, str]) -> int:
    cfg = load_config(config)
    use_embedded_prefect(cfg.registry.store_dir)
    from flows import model_versions, registry

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
    champion_ref = ModelRef(cfg.registry.model_name, alias=CHAMPION_ALIAS)
    champion = load_registered_model(cfg.registry.resolved_tracking_uri(), champion_ref)
    expected = predict_proba_with_schema(make_session(champion.content), rows, champion.schema)
    base = load_dataset(cfg.dataset)
    stable_batch = base.sample(600, random_state=11)
    shifted_batches = [shifted_batch(base, 600, seed) for seed in (21, 22, 23)]
    t = time.perf_counter()
    with start_service(config, champion_ref, port=port) as svc:
        svc.wait_ready(timeout=180)
        started = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/predict"
        resp = httpx.post(url, json=payload, headers=headers, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        bad = httpx.post(
            url,
            json={"rows": [{**payload["rows"][0], "tenure": "long"}]},
            headers=headers,
            timeout=30,
        )
        anonymous = httpx.post(url, json=payload, timeout=30)
        # Traffic for the drift episode, one batch per monitoring window: a window is as
        # long as one batch's sending plus a margin, and the batches are that far apart.
        window_ends = [_send_batch(url, stable_batch, features, headers)]
        for batch in shifted_batches:
            time.sleep(EPISODE_WINDOW_S)
            window_ends.append(_send_batch(url, batch, features, headers))
        shadow = _shadow_episode(svc.url, cfg, str(second.version), headers)
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
    console.print(
        f"a request without an API key got HTTP {anonymous.status_code}: {anonymous.text[:200]}"
    )

    console.print(Rule(f"4. shadow: v{second.version} scores beside @champion, judged on labels"))
    console.print(gate_tables([shadow]))
    episode = _drift_episode(config, cfg, window_ends, shifted_batches)
    canary = _canary_episode(config, cfg, headers)

    console.print(Rule("summary"))
    client = registry.connect(cfg.registry)
    versions = model_versions.list_versions(client, cfg.registry.model_name)
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
    healthy_phase = canary.healthy_state.phase if canary.healthy_state else "none"
    bad_decision = canary.bad_state.decision or {}
    console.print(
        f"canary: healthy v{canary.healthy.version} {healthy_phase}; bad v{canary.bad_version} "
        f"{canary.bad_state.phase} at {bad_decision.get('guardrail')}; @champion "
        f"v{canary.champion_before_bad} -> v{canary.champion_after}"
    )
    checks = {
        "served answers equal in-process ONNX": body["model_version"] == champion.version
        and worst < 1e-5,
        "a bad request got a 4xx": 400 <= bad.status_code < 500,
        "a request without an API key got a 401": anonymous.status_code == 401,
        "the drift episode retrained exactly once": retrains == [False, False, False, True],
        "the healthy canary was promoted": healthy_phase == "promoted",
        "the bad canary was rolled back, @champion untouched": canary.bad_state.phase
        == "rolled_back"
        and canary.champion_after == canary.champion_before_bad,
        "no client request failed outside the canary's share": canary.outside_canary_failures == 0,
        "the shadow reached a verdict on live labels": shadow.status.value in ("pass", "fail")
        and shadow.metrics.get("labelled_pairs", 0) >= SHADOW_ROWS,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        console.print(f"[bold red]demo check failed: not {'; not '.join(failed)}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
