"""Orchestration overhead: the training flow in-process against through the Prefect server
and a worker, the worker's runs forked warm and started cold, on the same team servers.

Starts a throwaway team stack (PostgreSQL, MLflow, Prefect server with two process workers
and their warm processes, Dask) on free ports under a temp dir, or uses a running one
(`--config`), applies mlgate's deployments (`flows/deploy.py`, schedules paused), trains
once to make a champion (not timed), then alternates three peers: the training flow called
in this process (its Prefect API and MLflow the same servers); the training deployment
submitted with `run_deployment` as deployed (each run forked from its worker's warm process,
flows/warm_start.py); and the same deployment with the `command` job variable set to
Prefect's own `python -m prefect.engine` (a fresh interpreter per run, the cold start).
Each deployment run is split by its state history: submit to Pending (a worker polls and
takes it), Pending to Running (the worker starts the run's process, which loads the flow),
Running to Completed (the flow itself), and Completed until this client saw it. Overhead is
a deployment's submit-to-completion minus the median in-process wall time, as a share of
that median. After each round, a fresh Python process times importing what a training run's
process needs (what a cold start pays per run).

Run: .venv/bin/python bench/orchestration.py [--runs 3] [--config RUNNING_STACK.yaml]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import RESULTS, write_section  # noqa: E402
from flows.deploy import deploy_team, team_prefect  # noqa: E402
from flows.deployments import TRAINING_DEPLOYMENT  # noqa: E402
from models.config import MlgateConfig, config_from_dict  # noqa: E402
from services import stack as st  # noqa: E402

SECTION = "## Orchestration (Prefect server + worker)"
COMMAND = ".venv/bin/python bench/orchestration.py --runs 3"
MODEL = "churn-bench"
GOAL = 0.05


@dataclass(frozen=True)
class DeploymentRun:
    total_s: float  # submit until this client saw Completed
    to_pending_s: float  # a worker took it
    to_running_s: float  # its process started and loaded the flow
    flow_s: float  # Running to Completed on the worker
    seen_s: float  # Completed until this client saw it


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack_config(root: Path) -> dict[str, Any]:
    """The bundled config on a stack of its own under `root` (as the stack tier's)."""
    import secrets

    pg, mlflow, prefect, dask, dashboard = free_ports(5)
    raw = yaml.safe_load((REPO / "mlgate.yaml").read_text())
    raw["dataset"]["path"] = str(REPO / "data" / "churn.parquet")
    raw["registry"].update(
        store_dir=str(root / "host"),
        model_name=MODEL,
        tracking_uri=f"http://127.0.0.1:{mlflow}",
        password=secrets.token_urlsafe(16),
    )
    raw["orchestration"] = {
        "api_url": f"http://127.0.0.1:{prefect}/api",
        "auth_string": f"mlgate:{secrets.token_urlsafe(16)}",
    }
    raw["dask"] = {"scheduler_address": f"tcp://127.0.0.1:{dask}"}
    raw["stack"] = {
        "dir": str(root / "stack"),
        "start_timeout_s": 600,
        "postgres": {"port": pg},
        "mlflow": {"port": mlflow, "workers": 1},
        "prefect": {"port": prefect, "workers": 2},
        "dask": {"port": dask, "dashboard_port": dashboard, "workers": 1},
    }
    return raw


def run_in_process(cfg: MlgateConfig, config_path: Path) -> float:
    from flows.training import training_flow

    with team_prefect(cfg.orchestration):
        started = time.perf_counter()
        outcome = training_flow(config_path=str(config_path))
        took = time.perf_counter() - started
    assert outcome.accepted, outcome.reason
    return took


# The cold peer: Prefect's default command for a process worker's run.
COLD_COMMAND = {"command": f"{sys.executable} -m prefect.engine"}


def run_deployment_once(
    cfg: MlgateConfig, config_path: Path, job_variables: dict[str, Any] | None = None
) -> DeploymentRun:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with team_prefect(cfg.orchestration), get_client(sync_client=True) as client:
        submitted = time.time()
        run: Any = run_deployment(
            TRAINING_DEPLOYMENT,
            parameters={"config_path": str(config_path)},
            timeout=0,
            as_subflow=False,
            job_variables=job_variables,
        )
        run_id = UUID(str(run.id))
        while True:
            current = client.read_flow_run(run_id)
            if current.state and current.state.is_final():
                seen = time.time()
                break
            time.sleep(0.25)
        assert current.state_name == "Completed", current.state
        at = {s.type.value: s.timestamp.timestamp() for s in client.read_flow_run_states(run_id)}
    return DeploymentRun(
        total_s=seen - submitted,
        to_pending_s=at["PENDING"] - submitted,
        to_running_s=at["RUNNING"] - at["PENDING"],
        flow_s=at["COMPLETED"] - at["RUNNING"],
        seen_s=seen - at["COMPLETED"],
    )


# What a worker's fresh process imports for a training run: Prefect's engine and the flow's
# module at start, then the libraries its tasks import when first called.
COLD_IMPORT = (
    "import time; t = time.perf_counter(); "
    "import prefect.engine, flows.training, great_expectations, skl2onnx, onnxruntime; "
    "print(time.perf_counter() - t)"
)


def cold_import_s() -> float:
    """Seconds a fresh Python process takes to import what a training run's process needs:
    the fixed cost a process work pool pays on every run."""
    out = subprocess.run(
        [sys.executable, "-c", COLD_IMPORT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", type=Path, help="a running stack's config (team mode)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mlgate-bench-orch-"))
    root.chmod(0o711)
    own_stack = args.config is None
    if own_stack:
        raw = stack_config(root)
    else:
        raw = yaml.safe_load(args.config.read_text())
        raw["registry"].update(model_name=MODEL, store_dir=str(root / "host"))
    cfg = config_from_dict(raw)
    slices = (cfg.stack, cfg.registry, cfg.orchestration, cfg.dask)
    try:
        if own_stack:
            started = time.monotonic()
            parts = st.start_stack(*slices)
            assert all(p.healthy for p in parts), parts
            raw["registry"]["lock_dsn"] = st.client_settings(*slices)["MLGATE_REGISTRY__LOCK_DSN"]
            print(f"stack up in {time.monotonic() - started:.0f} s")
        config_path = root / "mlgate.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        cfg = config_from_dict(raw)
        # MLflow's client reads its credentials from the environment (registry.connect).
        started = time.monotonic()
        deploy_team(cfg, config_path, schedules_active=False)
        print(f"deployed in {time.monotonic() - started:.0f} s")
        warm = run_in_process(cfg, config_path)
        print(f"warm-up (first model, not timed): {warm:.1f} s")
        inproc: list[float] = []
        warm_runs: list[DeploymentRun] = []
        cold_runs: list[DeploymentRun] = []
        imports: list[float] = []
        loads: list[float] = []
        for i in range(args.runs):
            loads.append(os.getloadavg()[0])
            inproc.append(run_in_process(cfg, config_path))
            warm_runs.append(run_deployment_once(cfg, config_path))
            cold_runs.append(run_deployment_once(cfg, config_path, COLD_COMMAND))
            imports.append(cold_import_s())
            print(
                f"run {i + 1}: in-process {inproc[-1]:.1f} s, warm {warm_runs[-1]}, "
                f"cold {cold_runs[-1]}, cold import {imports[-1]:.1f} s"
            )
        loads.append(os.getloadavg()[0])
        write_section(SECTION, report(inproc, warm_runs, cold_runs, imports, loads, args.runs))
        print(f"written to {RESULTS.relative_to(REPO)}")
    finally:
        if own_stack:
            st.stop_stack(cfg.stack, cfg.registry)
        shutil.rmtree(root, ignore_errors=True)


def report(
    inproc: list[float],
    warm_runs: list[DeploymentRun],
    cold_runs: list[DeploymentRun],
    imports: list[float],
    loads: list[float],
    runs: int,
) -> str:
    base = statistics.median(inproc)
    rows = [
        "| run | peer | wall s | submit→Pending | Pending→Running | flow on worker | "
        "Completed→seen | overhead s | overhead share |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (own, w, c) in enumerate(zip(inproc, warm_runs, cold_runs, strict=True), start=1):
        rows.append(f"| {i} | in-process | {own:.1f} | | | | | | |")
        for peer, d in (("worker, warm", w), ("worker, cold", c)):
            over = d.total_s - base
            rows.append(
                f"| {i} | {peer} | {d.total_s:.1f} | {d.to_pending_s:.1f} | "
                f"{d.to_running_s:.1f} | {d.flow_s:.1f} | {d.seen_s:.1f} | {over:.1f} | "
                f"{over / base:.0%} |"
            )

    def share(deployed: list[DeploymentRun]) -> tuple[float, float]:
        total = statistics.median(d.total_s for d in deployed)
        return total, (total - base) / base

    warm_total, warm_share = share(warm_runs)
    cold_total, cold_share = share(cold_runs)
    verdict = "meets" if warm_share <= GOAL else "misses"
    cold = statistics.median(imports)
    scheduling = statistics.median(d.to_pending_s + d.seen_s for d in warm_runs)
    warm_start = statistics.median(d.to_running_s for d in warm_runs)
    cold_start = statistics.median(d.to_running_s for d in cold_runs)
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{COMMAND}` ({platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; a throwaway stack on this host: PostgreSQL, MLflow "
            "with basic auth, Prefect server with two process workers and their warm "
            "processes).",
            "",
            f"The bundled config's training flow (gradient boosting, 150 trees, 1,000 "
            f"bootstrap resamples), {runs} rounds of three peers, alternating, after an "
            "untimed first run that made the champion; every timed run trains the same model "
            "and goes through all gates. In-process: `training_flow(...)` called here against "
            "the same Prefect and MLflow servers. Worker, warm: `run_deployment` to the "
            "`mlgate-training` deployment as `mlgate stack deploy` applies it (the run forked "
            "from its worker's warm process, `flows/warm_start.py`). Worker, cold: the same "
            "deployment with the job variable `command` set to Prefect's default, `python -m "
            "prefect.engine` (a fresh interpreter per run). Both until the server says "
            "Completed; phases from the run's state history. Overhead: wall time minus the "
            "median in-process time, as a share of it.",
            "",
            *rows,
            "",
            f"Median: in-process {base:.1f} s; through the server and a worker, warm "
            f"{warm_total:.1f} s (overhead {warm_total - base:.1f} s, **{warm_share:.0%}**), "
            f"cold {cold_total:.1f} s (overhead {cold_total - base:.1f} s, {cold_share:.0%}). "
            f"The goal is ≤ {GOAL:.0%}: the warm path {verdict} it for this flow; its "
            f"overhead is about fixed per run, so it holds for flows of "
            f"{(warm_total - base) / GOAL:.0f} s or more on this host.",
            "",
            f"Where it goes: Prefect's scheduling, a worker taking the run and this client "
            f"seeing the end, is {scheduling:.1f} s (median, warm runs). Pending→Running, the "
            f"run's process starting and loading the flow: warm {warm_start:.1f} s, cold "
            f"{cold_start:.1f} s. A cold run also imports the libraries its tasks load "
            f"(Great Expectations, skl2onnx, ONNX Runtime) inside its first steps; importing "
            f"all of it in a fresh process took {cold:.1f} s (median of {len(imports)}, after "
            "each round).",
            "",
            f"Host load (1-minute average, before each round and at the end): "
            f"{', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} CPUs; other work "
            "shares this host, so single runs vary.",
        ]
    )


if __name__ == "__main__":
    main()
