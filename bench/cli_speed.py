"""CLI speed: `mlgate monitor` (600 rows) and `mlgate train` (5,000 rows) in fresh processes,
the temporary Prefect server started by Prefect on first use against started by the command
beside its imports, with and without a bytecode cache, and the floors (imports alone, the
server alone).

Setup (not timed): under a temp dir, the bundled config on a 5,000-row sample of the bundled
data; a store trained once for `train` (each timed run then trains the same challenger and
finds it identical to the champion: nothing new to register), and a second store trained
once for `monitor`, with 600 rows logged for its champion in the window it judges. A bytecode
cache of the venv, the standard library and mlgate is compiled once into a prefix
(`PYTHONPYCACHEPREFIX`): what `uv sync --compile-bytecode` leaves in the venv
(`[tool.uv] compile-bytecode`). "source" runs with an empty prefix and no bytecode writes:
every module compiled from source on each run, as in an environment with
PYTHONDONTWRITEBYTECODE set and a venv installed without bytecode.

Peers, alternated in each round, each a fresh `python` running the CLI's `main` as
`.venv/bin/mlgate` does, Prefect's variables cleared as in the orphans test:
- **lazy** (before): `use_configured_servers(cfg, start_now=False)`, as `mlgate schedule`
  still runs: Prefect starts its `SubprocessASGIServer` on the flow's first API call, after
  the command's imports, and the command imports Prefect's server module to patch it;
- **early** (after): the command starts the server first (`flows/prefect_server.py`) and
  waits for it only before the flow;
- **warm**: the `mlgate` script (flows/cli_warm.py) with the project's warm process
  listening (started once per store before the rounds, its imports and Prefect server
  ready): the call is forked from it and reports to its Prefect server. Its time includes
  the thin client's own start (a fresh Python loading the config).
Floors: `import flows.monitoring` / `import flows.training` in a fresh process; the server
alone, from `start_prefect_server` to its health check answering. After the rounds, each
store's Prefect database is read: every timed run must be there as a completed flow run.

Run: .venv/bin/python bench/cli_speed.py [--rounds 3] [--modes source,bytecode]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import write_section  # noqa: E402

SECTION = "## CLI speed (fresh processes)"
COMMAND = ".venv/bin/python bench/cli_speed.py"
TRAIN_ROWS = 5000
MONITOR_ROWS = 600
GOALS = {"monitor": 5.0, "train": 15.0}

RUN_CLI = (
    "import sys, functools\n"
    "import flows.runtime as runtime\n"
    "if sys.argv[1] == 'lazy':\n"
    "    runtime.use_configured_servers = functools.partial(\n"
    "        runtime.use_configured_servers, start_now=False)\n"
    "sys.argv = ['mlgate', *sys.argv[2:]]\n"
    "from flows.cli import main\n"
    "main()\n"
)
WARM_CLI = "import sys; sys.argv[0] = 'mlgate'\nfrom flows.cli_warm import main\nmain()\n"
SERVER_ALONE = (
    "import os, time\n"
    "from flows.runtime import use_embedded_prefect\n"
    "from flows.prefect_server import start_prefect_server\n"
    "from pathlib import Path\n"
    "use_embedded_prefect(Path(os.environ['BENCH_STORE']))\n"
    "t0 = time.perf_counter()\n"
    "server = start_prefect_server()\n"
    "server.wait_ready()\n"
    "print(time.perf_counter() - t0)\n"
)


def base_env(pycache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLGATE_"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(pycache))
    return env


def timed(args: list[str], env: dict[str, str], expect: tuple[int, ...] = (0, 3)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in expect:
        raise RuntimeError(f"{args[2:]} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return wall


def compile_bytecode(prefix: Path) -> float:
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]]
    dirs += [str(REPO / d) for d in ("flows", "models", "checks", "services")]
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def write_config(root: Path, data: Path, store: str) -> Path:
    raw = yaml.safe_load((REPO / "mlgate.yaml").read_text())
    raw["dataset"]["path"] = str(data)
    raw["registry"]["store_dir"] = str(root / store)
    path = root / f"{store}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def log_window(config: Path, data: Path, until: datetime) -> str:
    """600 rows logged for the champion five minutes before `until`; its version."""
    import mlflow
    import pandas as pd

    from models.config import load_config
    from tests.flows.test_monitoring import write_log

    cfg = load_config(config)
    client = mlflow.MlflowClient(cfg.registry.resolved_tracking_uri())
    version = client.get_model_version_by_alias(cfg.registry.model_name, "champion").version
    rows = pd.read_parquet(data).sample(MONITOR_ROWS, random_state=1)
    write_log(cfg, rows, str(version), until - timedelta(minutes=5))
    return str(version)


def completed_flow_runs(store: Path) -> dict[str, int]:
    db = store / "prefect" / "prefect.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT flow.name, count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow_run.state_type = 'COMPLETED' GROUP BY flow.name"
        ).fetchall()
    return dict(rows)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="Keep the temp dir.")
    parser.add_argument("--modes", default="source,bytecode", help="Bytecode modes to run.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlgate-cli-speed-"))
    try:
        run(root, args.rounds, tuple(args.modes.split(",")))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def start_warm(store: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The store's warm process, listening once this returns."""
    from flows.cli_warm import SOCKET, state_dir

    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli_warm", str(store), "3600"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (state_dir(store) / SOCKET).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the warm process of {store} did not start")
        time.sleep(0.2)
    return proc


def run(root: Path, rounds: int, modes: tuple[str, ...]) -> None:
    import pandas as pd

    started = time.perf_counter()
    load_start = load_average()
    data = root / "churn5k.parquet"
    pd.read_parquet(REPO / "data" / "churn.parquet").sample(TRAIN_ROWS, random_state=0).to_parquet(
        data
    )
    configs = {
        "train": write_config(root, data, "train"),
        "monitor": write_config(root, data, "mon"),
    }
    caches = {
        m: p
        for m, p in {"source": root / "pyc-empty", "bytecode": root / "pyc"}.items()
        if m in modes
    }
    if "source" in caches:
        caches["source"].mkdir()
    compile_s = compile_bytecode(root / "pyc")
    warm_env = base_env(root / "pyc")
    envs = {mode: base_env(cache) for mode, cache in caches.items()}
    py = sys.executable
    for config in configs.values():  # the champion each store's timed runs compare against
        timed([py, "-c", RUN_CLI, "early", "train", "--config", str(config)], warm_env)
    until = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    version = log_window(configs["monitor"], data, until)
    commands = {
        "monitor": [
            "monitor",
            "--config",
            str(configs["monitor"]),
            "--until",
            until.isoformat(),
            "--window",
            "1h",
            "--no-retrain",
        ],
        "train": ["train", "--config", str(configs["train"])],
    }
    imports = {"monitor": "import flows.monitoring", "train": "import flows.training"}
    # (mode, command, peer) -> seconds per round
    times: dict[tuple[str, str, str], list[float]] = {}
    timed_runs = {"monitor": 0, "train": 0}
    warm = [start_warm(root / store, warm_env) for store in ("train", "mon")]
    try:
        rounds_run(rounds, envs, commands, imports, times, timed_runs, root)
    finally:
        for proc in warm:
            proc.terminate()
            proc.wait(timeout=60)
    recorded = {
        "monitor": completed_flow_runs(root / "mon").get("monitoring_flow", 0),
        "train": completed_flow_runs(root / "train").get("training_flow", 0) - 1,
    }
    text = report(
        times,
        rounds,
        compile_s,
        version,
        recorded,
        timed_runs,
        load_start,
        load_average(),
        time.perf_counter() - started,
    )
    print(text)
    write_section(SECTION, text)


def rounds_run(
    rounds: int,
    envs: dict[str, dict[str, str]],
    commands: dict[str, list[str]],
    imports: dict[str, str],
    times: dict[tuple[str, str, str], list[float]],
    timed_runs: dict[str, int],
    root: Path,
) -> None:
    py = sys.executable
    for i in range(rounds):
        for mode, env in envs.items():
            for name, argv in commands.items():
                for peer in ("lazy", "early", "warm"):
                    cli = [py, "-c", WARM_CLI] if peer == "warm" else [py, "-c", RUN_CLI, peer]
                    wall = timed([*cli, *argv], env)
                    times.setdefault((mode, name, peer), []).append(wall)
                    timed_runs[name] += 1
                wall = timed([py, "-c", imports[name]], env)
                times.setdefault((mode, name, "imports"), []).append(wall)
            server_env = {**env, "BENCH_STORE": str(root / "server-alone")}
            proc = subprocess.run(
                [py, "-c", SERVER_ALONE], cwd=REPO, env=server_env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"server alone: {proc.stderr[-3000:]}")
            times.setdefault((mode, "-", "server"), []).append(float(proc.stdout.split()[-1]))
        print(f"round {i + 1}/{rounds} done", file=sys.stderr)


def report(
    times: dict[tuple[str, str, str], list[float]],
    rounds: int,
    compile_s: float,
    version: str,
    recorded: dict[str, int],
    timed_runs: dict[str, int],
    load_start: str,
    load_end: str,
    total_s: float,
) -> str:
    med = {key: statistics.median(values) for key, values in times.items()}
    modes_arg = "" if ("source", "-", "server") in times else " --modes bytecode"
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND} --rounds {rounds}{modes_arg}` ({platform.machine()}, "
        f"{os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {total_s / 60:.1f} min in all; load average "
        f"{load_start} before and {load_end} after: other work shared the host).",
        "",
        f"`mlgate monitor` judges a one-hour window of {MONITOR_ROWS} logged rows (champion "
        f"v{version}, `--no-retrain`); `mlgate train` runs the training flow on a "
        f"{TRAIN_ROWS:,}-row sample of the bundled data with a champion in place. Each a fresh "
        "process, wall time from start to exit. **lazy** (before): Prefect starts its temporary "
        "server on the flow's first API call; **early** (after): the command starts it first "
        "and the server starts while the command imports. **source**: no bytecode cache, "
        "every module compiled on each run; **bytecode**: the venv, the standard library and "
        f"mlgate precompiled (compiling took {compile_s:.0f} s, once). Rounds alternate all "
        "peers; medians of the rounds, the ratio per round paired. **warm**: the `mlgate` "
        "script with the project's warm process listening (flows/cli_warm.py; one per store, "
        "started before the rounds from the bytecode cache), the call forked from it.",
        "",
        "| bytecode | command | lazy s | early s | warm s | early / lazy (paired, median) | "
        "warm / early (paired, median) | imports alone s | goal s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    modes = [m for m in ("source", "bytecode") if (m, "-", "server") in times]
    for mode in modes:
        for name in ("monitor", "train"):
            lazy, early = times[(mode, name, "lazy")], times[(mode, name, "early")]
            warm = times[(mode, name, "warm")]
            ratio = statistics.median(e / lz for e, lz in zip(early, lazy, strict=True))
            warm_ratio = statistics.median(w / e for w, e in zip(warm, early, strict=True))
            lines.append(
                f"| {mode} | {name} | {med[(mode, name, 'lazy')]:.1f} | "
                f"{med[(mode, name, 'early')]:.1f} | {med[(mode, name, 'warm')]:.1f} | "
                f"{ratio:.2f} | {warm_ratio:.2f} | "
                f"{med[(mode, name, 'imports')]:.1f} | {GOALS[name]:g} |"
            )
    lines += [
        "",
        "Server alone (start to first healthy answer, a fresh process, the migrated database "
        "of an earlier run): "
        + ", ".join(f"{m} {med[(m, '-', 'server')]:.1f} s" for m in modes)
        + ".",
        "",
        "Every round:",
        "",
        "| round | bytecode | command | lazy s | early s | warm s | imports alone s |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for i in range(rounds):
        for mode in modes:
            for name in ("monitor", "train"):
                lines.append(
                    f"| {i + 1} | {mode} | {name} | {times[(mode, name, 'lazy')][i]:.1f} | "
                    f"{times[(mode, name, 'early')][i]:.1f} | "
                    f"{times[(mode, name, 'warm')][i]:.1f} | "
                    f"{times[(mode, name, 'imports')][i]:.1f} |"
                )
    lines += [
        "",
        "Completed flow runs in each store's Prefect database after the rounds (the setup "
        f"run not counted): monitor {recorded['monitor']} of {timed_runs['monitor']}, train "
        f"{recorded['train']} of {timed_runs['train']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
