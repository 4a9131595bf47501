"""The `mlgate` command's entry point: flow commands run forked from the project's warm process
when one listens, else cold (and the warm process is started, detached, for the next call).

A fresh Python pays about 4 s of imports (Prefect, MLflow, Great Expectations, scikit-learn,
ONNX) and about 4 s for Prefect's local API server before a flow's first step
(bench/RESULTS.md, CLI speed). The warm process is the Prefect workers' machinery
(flows/warm_start.py) pointed at the CLI: it starts the project's local Prefect server (the
one flows/prefect_server.py starts for a cold command, on the same `PREFECT_HOME` database
under `registry.store_dir`), imports the flows, and forks each call as `python -m
flows.cli`, the child taking over the caller's stdin/stdout/stderr, working directory,
environment and arguments, with `PREFECT_API_URL` naming the shared server. The caller
(flows/warm_client.py) forwards Ctrl-C and SIGTERM to the run and exits with its code.

- Only `train`, `monitor` and `score` go warm, and only in the embedded default
  (`orchestration.api_url` unset, no `PREFECT_API_URL` in the environment) with `cli.warm`
  true; every other command, and `python -m flows.cli`, runs cold in this process.
- One warm process per `registry.store_dir`: its socket and lock under `<store_dir>/cli/`
  (owner-only). It exits, stopping its server, after `cli.warm_idle_s` seconds without a run,
  when the store directory is gone, on SIGTERM, or when mlgate's code changed (that call and
  the next run cold; the next cold call starts a fresh warm process).
- This module stays light until it knows the call runs cold: the standard library and the
  config loader (pydantic, YAML).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

from flows.warm_client import connect, warm_start
from flows.warm_start import PRELOAD, SOURCES, serve

# Commands that run a Prefect flow.
FLOW_COMMANDS = frozenset({"train", "monitor", "score"})
# What a flow command imports, in the warm process before it forks.
CLI_PRELOAD = ("flows.cli", "flows.cli_score", *PRELOAD)
RUN_MODULE = "flows.cli"
STATE_DIR = "cli"
SOCKET = "warm.sock"
LOCK = "warm.lock"
LOG = "warm.log"


def state_dir(store_dir: Path) -> Path:
    """Where the project's warm process keeps its socket, lock and log."""
    return Path(store_dir) / STATE_DIR


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _config_path(argv: list[str]) -> Path:
    """The `--config`/`-c` a flow command was given, else its default (flows/cli.py)."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return Path("mlgate.yaml")


def warm_settings(argv: list[str]) -> tuple[Path, float] | None:
    """The store directory and idle time of the warm process this call may use; None when
    it runs cold (not a flow command, warm off, a configured Prefect server, a config that
    does not load: the cold command says why)."""
    if _command(argv) not in FLOW_COMMANDS or os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from models.config import load_config

        cfg = load_config(_config_path(argv))
    except Exception:
        return None
    if not cfg.cli.warm or cfg.orchestration.api_url:
        return None
    return cfg.registry.store_dir.resolve(), cfg.cli.warm_idle_s


def main() -> None:
    """`mlgate`: warm where it can be, else the CLI in this process."""
    argv = sys.argv[1:]
    settings = warm_settings(argv)
    if settings is not None:
        store_dir, idle_s = settings
        sock = connect(state_dir(store_dir) / SOCKET)
        if sock is not None:
            with sock:
                code = warm_start(sock, argv)
            if code is not None:
                _exit_as(code)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as cold
        # Started once this cold call has ended and stopped its own Prefect server.
        atexit.register(start_detached, store_dir, idle_s, dict(os.environ))
    from flows.cli import main as cold_main

    cold_main()


def _exit_as(code: int) -> None:
    """Exit as the run did; interrupted by Ctrl-C, die of SIGINT as a cold Python does."""
    if code == 128 + signal.SIGINT:
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


def start_detached(store_dir: Path, idle_s: float, env: dict[str, str]) -> None:
    """Start the project's warm process in a session of its own; it exits at once if one
    runs already (its lock)."""
    state = state_dir(store_dir)
    with contextlib.suppress(OSError):
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (state / LOG).open("ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli_warm", str(store_dir), f"{idle_s:g}"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )


def serve_project(store_dir: Path, idle_s: float, watch: tuple[Path, ...] = SOURCES) -> int:
    """The warm process: the project's Prefect server, the imports, then forked runs until
    idle, gone, stale (a Python file under `watch` changed) or stopped."""
    state = state_dir(store_dir)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (state / LOCK).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # this project's warm process runs already
        from flows.prefect_server import start_prefect_server
        from flows.runtime import use_embedded_prefect

        use_embedded_prefect(store_dir)
        server = start_prefect_server()  # before the imports, so it comes up beside them
        try:
            serve(
                state / SOCKET,
                CLI_PRELOAD,
                RUN_MODULE,
                watch,
                extra_env={"PREFECT_API_URL": server.api_url},
                idle_exit_s=idle_s,
                alive=store_dir.is_dir,
                ready=server.wait_ready,
            )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(serve_project(Path(sys.argv[1]), float(sys.argv[2])))
