"""A Prefect worker's warm process: it imports mlgate's flows and their libraries once, then
forks each flow run from that state instead of a fresh Python paying the imports again.

Why by hand: a process work pool starts `python -m prefect.engine` per run, and a fresh
interpreter importing Prefect, MLflow, Great Expectations, scikit-learn, skl2onnx and ONNX
Runtime costs more than a small training flow itself (bench/RESULTS.md, orchestration
overhead). Prefect has no pre-forking runner, and the standard library's forkserver serves
`multiprocessing` only (it cannot hand a child the worker's stdio, environment and working
directory, nor run a module as `__main__`). This server is that missing piece, kept small:

- `serve(path)` imports `PRELOAD`, refuses to go on if an import started a thread (forking
  a threaded process can inherit a held lock), and listens on a Unix socket, owner-only.
- `flows/warm_client.py` is the command the deployments give the worker: it sends its
  argv, working directory, environment and its stdin/stdout/stderr (SCM_RIGHTS), and the
  server forks a child that takes them over, reloads Prefect's settings from that
  environment, and runs `prefect.engine` as `__main__`, exactly what the cold command runs.
- The child leads a session of its own. The client forwards the signals the worker sends it
  (cancellation), and a client that vanishes (its worker SIGKILLed) gets its child's whole
  session SIGKILLed: a run dies with its worker as a cold one does, so the heartbeat
  automation (flows/deploy.py) sees it stop. A run gets SIGTERM when the warm process itself
  dies, SIGKILL included (PR_SET_PDEATHSIG): its client has then exited 1, and a run left
  going would write to the client's terminal and the registry with nobody waiting for it.
- A run forked here runs the mlgate code imported at start: once a file of mlgate's packages
  changes (a `git pull` on the workers' checkout), new runs are sent back to start cold and
  the process re-executes itself, with fresh imports, when its last run has ended (checked
  at each request, and every `_IDLE_CHECK_S` while idle).

One loop, no threads, so that the process stays safe to fork: accept, read a client's
message, fork, and every `_TICK_S` reap children and report their exit codes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.processes import die_with_parent_preexec

# What a flow run imports on its way, eagerly or inside its tasks.
PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect_dask",
    "flows.training",
    "flows.monitoring",
    "flows.score",
    "flows.reconcile",
    "flows.canary",
    "great_expectations",
    "skl2onnx",
    "onnx",
    "onnxruntime",
    "evidently",
    "matplotlib.pyplot",
    "mlflow.artifacts",
    "sklearn.calibration",
    "sklearn.metrics",
    "apprise",
    # Imported by the libraries themselves on a run's first steps (found by diffing
    # sys.modules around a first training run after the imports above).
    "prefect.utilities.visualization",
    "prefect.utilities.schema_tools",
    "prefect.locking._filelock",
    "prefect._vendor.croniter",
    "mlflow.store.analytics",
    "mlflow.tracing.otel",
    "mlflow.utils.crypto",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "pyarrow.pandas_compat",
    "narwhals",
    "skl2onnx.algebra.onnx_operator_mixin",
)
# mlgate's own packages: a change under them makes the imported copies stale.
REPO = Path(__file__).resolve().parents[1]
SOURCES = tuple(REPO / package for package in ("flows", "models", "checks", "services"))
# The client's message: a 4-byte big-endian length, then that many bytes of JSON.
HEADER = struct.Struct(">I")
# What a run executes: the module Prefect's cold command runs (`python -m prefect.engine`).
ENGINE = "prefect.engine"
MAX_MESSAGE = 4 * 1024 * 1024
STDIO_FDS = 3
_TICK_S = 0.2
_IDLE_CHECK_S = 5.0
_READ_TIMEOUT_S = 10.0


class WarmStartError(RuntimeError):
    pass


def socket_path(directory: Path, worker_name: str) -> Path:
    """Where the warm process of the worker called `worker_name` listens."""
    return Path(directory) / f"{worker_name}.sock"


@contextlib.contextmanager
def in_directory(directory: Path):
    """A Unix socket's address is at most 107 bytes: bind and connect by a name relative to
    its directory (a test's temporary directory can be longer than that)."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import each module; returns the ones that could not be imported (not fatal: the run
    imports what it needs itself)."""
    missing = []
    for name in modules:
        try:
            if name == "matplotlib.pyplot":
                # The backend the model report uses (flows/model_report.py), chosen before
                # pyplot loads it; the run choosing it again is a no-op.
                importlib.import_module("matplotlib").use("Agg")
            importlib.import_module(name)
        except Exception as err:
            missing.append(f"{name} ({type(err).__name__}: {err})")
    return missing


@dataclass
class _Run:
    pid: int
    conn: socket.socket


def source_fingerprint(roots: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    """Path, mtime and size of every Python file under `roots`: what a run would import."""
    files = []
    for root in roots:
        for source in sorted(Path(root).rglob("*.py")):
            with contextlib.suppress(OSError):
                st = source.stat()
                files.append((str(source), st.st_mtime_ns, st.st_size))
    return tuple(files)


def serve(
    path: Path,
    modules: tuple[str, ...] = PRELOAD,
    run_module: str = ENGINE,
    watch: tuple[Path, ...] = SOURCES,
    *,
    extra_env: dict[str, str] | None = None,
    idle_exit_s: float | None = None,
    alive: Callable[[], bool] | None = None,
    ready: Callable[[], None] | None = None,
) -> bool:
    """Import `modules`, then fork runs of `run_module` (as `__main__`) for clients on `path`
    until SIGTERM or SIGINT (returns False), or until a file under `watch` has changed since
    the imports and no run is left (returns True: the caller starts afresh).

    For the CLI's warm process (flows/cli_warm.py): `extra_env` is added to each run's
    environment where the client's has no such variable; with no run for `idle_exit_s`, or
    once `alive()` is false (checked while idle), it stops as on SIGTERM (returns False);
    `ready()` is called after the imports, before it listens.

    A run forked from here runs the code imported at start, not what a checkout updated
    since (a cold run would import the new one). So each client's request first compares
    `watch` with how it was: changed, the client is told to start cold, and this process
    restarts as soon as its last run has ended."""
    fingerprint = source_fingerprint(watch)  # before the imports: a change during them counts
    missing = preload(modules)
    for line in missing:
        print(f"warm start: not preloaded: {line}", file=sys.stderr, flush=True)
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        raise WarmStartError(
            f"an import started threads {threads}: forking now could copy a held lock"
        )
    if ready is not None:
        ready()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with in_directory(path.parent):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name)
        listener.bind(path.name)
        os.chmod(path.name, 0o600)
    listener.listen(16)
    listener.setblocking(False)

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"warm start: listening on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    runs: dict[int, _Run] = {}  # by child pid
    stale = False
    checked = busy = time.monotonic()
    try:
        while not stopping and not (stale and not runs):
            if runs:
                busy = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - busy > idle_exit_s:
                print("warm start: idle: stopping", file=sys.stderr, flush=True)
                stopping = True
                continue
            if not runs and time.monotonic() - checked > _IDLE_CHECK_S:
                # Idle: restart on a change now, so that the next run finds fresh imports.
                stale = stale or source_fingerprint(watch) != fingerprint
                if alive is not None and not alive():
                    print("warm start: no longer needed: stopping", file=sys.stderr, flush=True)
                    stopping = True
                checked = time.monotonic()
                continue
            for key, _ in selector.select(_TICK_S):
                if key.fileobj is listener:
                    stale = stale or source_fingerprint(watch) != fingerprint
                    run = _accept(listener, selector, runs, run_module, stale, extra_env)
                    if run is not None:
                        runs[run.pid] = run
                        selector.register(run.conn, selectors.EVENT_READ, run.pid)
                else:
                    _client_readable(runs[key.data], selector)
            _reap(runs, selector)
    finally:
        for run in runs.values():
            _kill_session(run.pid, signal.SIGTERM)
        selector.close()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if stopping:
        return False
    if stale:
        print("warm start: mlgate's code changed: restarting", file=sys.stderr, flush=True)
    return stale


def _accept(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    runs: dict[int, _Run],
    module: str,
    stale: bool,
    extra_env: dict[str, str] | None = None,
) -> _Run | None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return None
    conn.settimeout(_READ_TIMEOUT_S)
    fds: list[int] = []
    try:
        message, fds = _read_message(conn)
        if stale:
            raise WarmStartError("mlgate's code changed since this process imported it")
        on_server_death = die_with_parent_preexec(signal.SIGTERM)
        pid = os.fork()
    except Exception as err:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(f"error {type(err).__name__}: {err}\n".encode())
        conn.close()
        return None
    if pid == 0:
        inherited = [listener, conn, *(r.conn for r in runs.values())]
        _child(message, fds, inherited, selector, module, extra_env or {}, on_server_death)
    for fd in fds:
        os.close(fd)
    env = message.get("env")
    run = env.get("PREFECT__FLOW_RUN_ID", "?") if isinstance(env, dict) else "?"
    print(f"warm start: flow run {run} forked as pid {pid}", file=sys.stderr, flush=True)
    conn.setblocking(False)
    try:
        conn.sendall(f"pid {pid}\n".encode())
    except OSError:
        # The client is gone already: its run goes with it.
        _kill_session(pid, signal.SIGKILL)
    return _Run(pid, conn)


def _read_message(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, STDIO_FDS)
    if len(fds) != STDIO_FDS:
        for fd in fds:
            os.close(fd)
        raise WarmStartError(f"expected {STDIO_FDS} file descriptors, got {len(fds)}")
    if len(data) < HEADER.size:
        raise WarmStartError("message shorter than its header")
    (size,) = HEADER.unpack_from(data)
    if size > MAX_MESSAGE:
        raise WarmStartError(f"message of {size} bytes is over {MAX_MESSAGE}")
    body = bytearray(data[HEADER.size :])
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise WarmStartError("client closed before its whole message")
        body += chunk
    message = json.loads(bytes(body))
    if not isinstance(message, dict):
        raise WarmStartError("message is not a JSON object")
    return message, fds


def _client_readable(run: _Run, selector: selectors.BaseSelector) -> None:
    """A client sends nothing after its message: readable means it is gone. Its run goes:
    SIGKILL, as the cold run would have gone with its worker's process tree."""
    try:
        gone = run.conn.recv(1) == b""
    except BlockingIOError:
        return
    except OSError:
        gone = True
    if gone:
        _kill_session(run.pid, signal.SIGKILL)
        selector.unregister(run.conn)


def _reap(runs: dict[int, _Run], selector: selectors.BaseSelector) -> None:
    while runs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        run = runs.pop(pid, None)
        if run is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        # A child killed by a signal exits as a shell reports it: 128 + the signal.
        code = 128 - code if code < 0 else code
        with contextlib.suppress(OSError):
            run.conn.setblocking(True)
            run.conn.sendall(f"exit {code}\n".encode())
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(run.conn)
        run.conn.close()


def _kill_session(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _child(
    message: dict[str, object],
    fds: list[int],
    inherited: list[socket.socket],
    selector: selectors.BaseSelector,
    module: str,
    extra_env: dict[str, str],
    on_server_death: Callable[[], None] | None = None,
) -> None:
    """The forked run: never returns to the server's loop."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if on_server_death is not None:
            on_server_death()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        selector.close()
        for sock in inherited:
            sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(str(message["cwd"]))
        env = message["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        for key, value in extra_env.items():
            os.environ.setdefault(key, value)
        _reload_prefect_settings()
        argv = message.get("argv") or []
        assert isinstance(argv, list)
        sys.argv = [module, *(str(a) for a in argv)]
        with warnings.catch_warnings():
            # runpy warns that the module is imported already: that is the point.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        # A cold Python interrupted by Ctrl-C prints the traceback and dies of SIGINT.
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # What a normal interpreter exit runs (Prefect ships its last logs from atexit).
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _reload_prefect_settings() -> None:
    """Prefect reads its settings into a root context when it is imported: that was this
    server's environment. The run's own (PREFECT__FLOW_RUN_ID and whatever its deployment
    adds) must win, as in a fresh interpreter."""
    import prefect.context

    prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.root_settings_context()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.warm_start", description=__doc__.splitlines()[0]
    )
    parser.add_argument("socket", type=Path, help="the Unix socket to listen on")
    parser.add_argument("--run-module", default=ENGINE, help="what each run executes")
    parser.add_argument(
        "--preload", help="comma-separated modules to import first (default: PRELOAD)"
    )
    parser.add_argument(
        "--watch",
        type=Path,
        action="append",
        help="a directory whose Python files the runs import (default: mlgate's packages)",
    )
    args = parser.parse_args(argv)
    modules = tuple(m for m in args.preload.split(",") if m) if args.preload else PRELOAD
    watch = tuple(args.watch) if args.watch else SOURCES
    try:
        restart = serve(args.socket, modules, args.run_module, watch)
    except WarmStartError as err:
        print(f"warm start: {err}", file=sys.stderr)
        return 1
    if restart:
        # Same pid (the stack's record of this process stays true), fresh imports.
        own = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "flows.warm_start", *own])
    return 0


if __name__ == "__main__":
    sys.exit(main())
