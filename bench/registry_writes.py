"""Registry writes under 8 concurrent writer processes: embedded SQLite against team mode's server.

Two backends side by side in one run: (a) the embedded default, MLflow on one SQLite file
with the alias file lock, and (b) team mode, the MLflow tracking server (basic auth) on
PostgreSQL with the PostgreSQL advisory lock, started here through services/stack.py in a
temp dir on free 127.0.0.1 ports with a generated password, and stopped at the end. Eight
writer processes (not threads: SQLite's file locking and the GIL behave per process) each
write through flows/registry.py and flows/alias_moves.py, as mlgate does:

- tag: one model version tag (a gate verdict on a version);
- run: one run with 10 params and 20 metrics (ensure the experiment, create, log, finish);
- alias: one `promote` of the writer's own version over the holder it read: evidence check,
  lock, compare-and-set re-read, alias write, version tags, an audit run with its JSON.
  All writers race for the same alias, so losing the compare-and-set (AliasConflictError)
  is an expected answer, counted apart from errors;
- mix: the three kinds in turn, each writer starting on another kind.

Each phase gives every writer a fixed number of writes and a time limit. Rounds alternate
which backend goes first, because the machine is shared and noisy.

Run: .venv/bin/python bench/registry_writes.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import re
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import RESULTS, write_section  # noqa: E402
from models.config import (  # noqa: E402
    DaskConfig,
    OrchestrationConfig,
    RegistryConfig,
    StackConfig,
)

WRITERS = 8
ROUNDS = 3
KINDS = ("tag", "run", "alias", "mix")
# Writes per writer per phase; each phase also stops at PHASE_LIMIT_S.
WRITES = {"tag": 12, "run": 6, "alias": 3, "mix": 6}
PHASE_LIMIT_S = 15.0
# A writer stuck past the limit (SQLite's busy retries give up after 120 s) is waited for
# this long before the run is called broken.
GRACE_S = 150.0
MODEL = "bench-writes"
EXPERIMENT = "bench-writes"
ALIAS = "champion"
PASSING = {"gate.data": "pass", "gate.parity": "pass", "gate.champion": "pass"}
BACKENDS = ("sqlite", "pg-server")
LABELS = {
    "sqlite": "SQLite + file lock",
    "pg-server": "tracking server on PostgreSQL + advisory lock",
}
SECTION = "## Registry writes (8 writer processes)"
COMMAND = ".venv/bin/python bench/registry_writes.py"
CONNECT = "connect"


@dataclass(frozen=True)
class Phase:
    """What every writer does in one phase."""

    number: int
    backend: str
    kind: str  # one of KINDS, or CONNECT: connect only, at once, no barrier
    writes: int
    registry: RegistryConfig
    # writer index -> its two model versions (one to move to while the other holds)
    versions: dict[int, tuple[str, str]]
    limit_s: float


@dataclass
class WriterReport:
    index: int
    phase: int
    started: float = 0.0
    ended: float = 0.0
    # (kind, outcome, seconds): outcome "ok", "conflict" or an error class
    writes: list[tuple[str, str, float]] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    failure: str = ""


# --- the writers (each a process of its own) -------------------------------------------

_retries: collections.Counter[str] = collections.Counter()
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


def _count_hidden_retries() -> None:
    """Count what the clients retry without telling: SQLite's "database is locked" (retried
    by flows/registry's busy-retrying client) and HTTP 5xx/429 or connection errors (retried
    by MLflow's urllib3 session)."""
    from urllib3.util.retry import Retry

    from flows import registry

    is_busy = registry._is_sqlite_busy

    def counting_busy(err: BaseException) -> bool:
        busy = is_busy(err)
        if busy:
            _retries["sqlite busy"] += 1
        return busy

    registry._is_sqlite_busy = counting_busy
    increment = Retry.increment

    def counting_increment(self: Retry, *args: Any, **kwargs: Any) -> Retry:
        response = kwargs.get("response", args[2] if len(args) > 2 else None)
        error = kwargs.get("error", args[3] if len(args) > 3 else None)
        pool = kwargs.get("_pool", args[4] if len(args) > 4 else None)
        # Only requests to the tracking server (this host), not MLflow's telemetry.
        to_server = getattr(pool, "host", None) == "127.0.0.1"
        if to_server and response is not None and response.status in RETRIED_STATUS:
            _retries["http 5xx/429"] += 1
        elif to_server and error is not None:
            _retries["http connection"] += 1
        return increment(self, *args, **kwargs)

    Retry.increment = counting_increment  # type: ignore[method-assign]


def classify(err: BaseException) -> str:
    """An exception as "sqlite locked", "http 5xx/429", "lock timeout" or "other", or as
    "conflict" for a lost compare-and-set (an answer, not an error)."""
    from filelock import Timeout
    from mlflow.exceptions import RestException

    from flows.alias_lock import AliasLockError
    from flows.alias_moves import AliasConflictError

    text = f"{type(err).__name__}: {err}"
    if isinstance(err, AliasConflictError):
        return "conflict"
    if isinstance(err, Timeout) or (isinstance(err, AliasLockError) and "held the lock" in text):
        return "lock timeout"
    if "database is locked" in text or "database table is locked" in text:
        return "sqlite locked"
    if re.search(r"too many (5\d\d|429) error responses", text):
        return "http 5xx/429"
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", 0) or 0
    if status >= 500 or status == 429:
        return "http 5xx/429"
    if isinstance(err, RestException):  # the tracking server's answer, not a local store's
        with contextlib.suppress(Exception):
            status = err.get_http_status_code()
            if status >= 500 or status == 429:
                return "http 5xx/429"
    return "other"


def _write_tag(client: Any, phase: Phase, index: int, n: int) -> None:
    client.set_model_version_tag(MODEL, phase.versions[index][0], f"bench.writer{index}", str(n))


def _write_run(client: Any, phase: Phase, index: int, n: int) -> None:
    from flows import registry

    exp_id = registry.ensure_experiment(client, phase.registry, EXPERIMENT)
    run = client.create_run(exp_id, tags={"bench.writer": str(index)}, run_name=f"w{index}-{n}")
    registry.log_params_metrics(
        client,
        run.info.run_id,
        {f"param_{k}": f"value-{index}-{n}-{k}" for k in range(10)},
        {f"metric_{k}": index + n / (k + 1) for k in range(20)},
    )
    client.set_terminated(run.info.run_id, "FINISHED")


def _write_alias(client: Any, phase: Phase, index: int, n: int) -> None:
    from flows import alias_moves, registry

    holder = registry.get_alias_version(client, MODEL, ALIAS)
    expected = str(holder.version) if holder else None
    mine = phase.versions[index]
    alias_moves.promote(
        client,
        phase.registry,
        MODEL,
        mine[1] if expected == mine[0] else mine[0],
        reason=f"bench write {n} of writer {index}",
        alias=ALIAS,
        expected_from=expected,
        actor=f"bench-writer-{index}",
    )


WRITE = {"tag": _write_tag, "run": _write_run, "alias": _write_alias}


def _run_phase(client: Any, phase: Phase, index: int, report: WriterReport) -> None:
    deadline = report.started + phase.limit_s
    cycle = ("tag", "run", "alias")
    for n in range(phase.writes):
        if time.monotonic() >= deadline:
            break
        kind = cycle[(index + n) % 3] if phase.kind == "mix" else phase.kind
        t0 = time.monotonic()
        try:
            WRITE[kind](client, phase, index, n)
        except Exception as err:
            outcome = classify(err)
            if outcome != "conflict":
                report.samples.setdefault(outcome, f"{type(err).__name__}: {err}"[:300])
        else:
            outcome = "ok"
        report.writes.append((kind, outcome, time.monotonic() - t0))


def writer(index: int, commands: Any, results: Any, barrier: Any) -> None:
    """One writer process: connects once per backend, then plays the phases it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    from flows import registry

    _count_hidden_retries()
    clients: dict[str, Any] = {}
    while True:
        phase: Phase | None = commands.get()
        if phase is None:
            return
        report = WriterReport(index, phase.number)
        try:
            if phase.backend not in clients:
                clients[phase.backend] = registry.connect(phase.registry)
            client = clients[phase.backend]
        except Exception as err:
            report.failure = f"connect: {type(err).__name__}: {err}"
        if phase.kind == CONNECT:
            results.put(report)
            continue
        try:
            barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            report.failure = report.failure or "the start barrier broke"
        if not report.failure:
            _retries.clear()
            report.started = time.monotonic()
            _run_phase(client, phase, index, report)
            report.ended = time.monotonic()
            report.retries = dict(_retries)
        results.put(report)


# --- the parent: stack, set-up, phases ---------------------------------------------------


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def team_slices(root: Path) -> tuple[StackConfig, RegistryConfig, OrchestrationConfig, DaskConfig]:
    """PostgreSQL and the MLflow tracking server only (no Prefect, no Dask), with the
    stack's default of 2 MLflow workers."""
    pg, mlflow = free_ports(2)
    stack = StackConfig(
        dir=root / "stack",
        start_timeout_s=420,
        postgres=StackConfig.Postgres(port=pg),
        mlflow=StackConfig.Mlflow(port=mlflow),
        prefect=StackConfig.Prefect(start=False),
        dask=StackConfig.Dask(start=False),
    )
    registry = RegistryConfig(
        store_dir=root / "pg-host",
        tracking_uri=f"http://127.0.0.1:{mlflow}",
        password=secrets.token_urlsafe(16),
    )
    return stack, registry, OrchestrationConfig(), DaskConfig()


def prepare_backend(registry_cfg: RegistryConfig) -> dict[int, tuple[str, str]]:
    """The model with two passing versions per writer, the experiment, and a first holder of
    the alias; the writers then find a store that is already migrated."""
    from flows import alias_moves, registry

    client = registry.connect(registry_cfg)
    registry.ensure_registered_model(client, MODEL)
    exp_id = registry.ensure_experiment(client, registry_cfg, EXPERIMENT)
    versions: list[str] = []
    for _ in range(2 * WRITERS):
        run = client.create_run(exp_id)
        mv = client.create_model_version(
            MODEL,
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags=PASSING,
            await_creation_for=0,
        )
        versions.append(str(mv.version))
    alias_moves.promote(
        client, registry_cfg, MODEL, versions[0], reason="bench set-up", expected_from=None
    )
    return {i: (versions[2 * i], versions[2 * i + 1]) for i in range(WRITERS)}


def connect_writers(backend: str, registry_cfg: RegistryConfig, commands: list[Any]) -> None:
    """Each writer connects to the backend now, outside any timed phase."""
    phase = Phase(0, backend, CONNECT, 0, registry_cfg, {}, 0)
    for q in commands:
        q.put(phase)


def await_connected(results: Any, expected: int) -> None:
    for _ in range(expected):
        try:
            report: WriterReport = results.get(timeout=900)
        except queue.Empty:
            raise RuntimeError("the writers did not connect in 15 min") from None
        if report.failure:
            raise RuntimeError(f"writer {report.index}: {report.failure}")


def play(
    phase: Phase, commands: list[Any], results: Any, barrier: Any
) -> tuple[float, list[WriterReport]]:
    """Every writer plays the phase; returns the phase's wall time and their reports."""
    for q in commands:
        q.put(phase)
    barrier.wait(timeout=600)
    reports = []
    wait_until = time.monotonic() + phase.limit_s + GRACE_S + 300
    while len(reports) < WRITERS:
        try:
            reports.append(results.get(timeout=max(1.0, wait_until - time.monotonic())))
        except queue.Empty:
            raise RuntimeError(
                f"phase {phase.number} ({phase.backend}, {phase.kind}): only {len(reports)} of "
                f"{WRITERS} writers reported in time"
            ) from None
    failed = [r.failure for r in reports if r.failure]
    if failed:
        raise RuntimeError(f"phase {phase.number} ({phase.backend}, {phase.kind}): {failed[0]}")
    wall = max(r.ended for r in reports) - min(r.started for r in reports)
    return wall, reports


@dataclass
class Cell:
    """One (backend, kind) over all rounds."""

    rates: list[float] = field(default_factory=list)  # successful writes/s per round
    # completed attempts (successful or a lost compare-and-set)/s per round
    attempt_rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, completed attempts
    ok: int = 0
    conflicts: int = 0
    cut: int = 0  # writes not started because the time limit passed
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, str] = field(default_factory=dict)


def tally(cell: Cell, wall: float, reports: list[WriterReport], writes: int) -> tuple[int, int]:
    ok = conflicts = errors = 0
    for r in reports:
        cell.cut += writes - len(r.writes)
        cell.retries.update(r.retries)
        for key, text in r.samples.items():
            cell.samples.setdefault(key, text)
        for _kind, outcome, seconds in r.writes:
            if outcome in ("ok", "conflict"):
                cell.latencies.append(seconds)
            if outcome == "ok":
                ok += 1
            elif outcome == "conflict":
                conflicts += 1
            else:
                errors += 1
                cell.errors[outcome] += 1
    cell.ok += ok
    cell.conflicts += conflicts
    cell.rates.append(ok / wall if wall > 0 else 0.0)
    cell.attempt_rates.append((ok + conflicts) / wall if wall > 0 else 0.0)
    return ok, errors


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_benchmark(
    root: Path, rounds: int, scale: float
) -> tuple[dict[tuple[str, str], Cell], dict[str, Any]]:
    from services import stack as st

    facts: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    clock = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - clock:5.0f} s] {message}", flush=True)

    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(WRITERS)]
    results = ctx.Queue()
    barrier = ctx.Barrier(WRITERS + 1)
    procs = [
        ctx.Process(target=writer, args=(i, commands[i], results, barrier), daemon=True)
        for i in range(WRITERS)
    ]
    for p in procs:
        p.start()
    log(f"{WRITERS} writer processes started")
    stack, team_registry, orchestration, dask = team_slices(root)
    outcome: dict[str, Any] = {}

    def start_stack() -> None:
        started = time.monotonic()
        try:
            outcome["parts"] = st.start_stack(stack, team_registry, orchestration, dask)
        except BaseException as err:
            outcome["error"] = err
        facts["stack_start_s"] = time.monotonic() - started

    # The stack starts while the SQLite store is prepared and the writers import MLflow and
    # connect to it: the fixed costs overlap.
    starter = threading.Thread(target=start_stack, name="stack-start", daemon=True)
    starter.start()
    try:
        registries = {"sqlite": RegistryConfig(store_dir=root / "sqlite-host")}
        versions = {"sqlite": prepare_backend(registries["sqlite"])}
        connect_writers("sqlite", registries["sqlite"], commands)
        log("SQLite store prepared")
        starter.join()
        if "error" in outcome:
            raise outcome["error"]
        bad = [p for p in outcome["parts"] if p.expected and not p.healthy]
        if bad:
            raise RuntimeError(f"the stack is not healthy: {bad}")
        log(f"stack (PostgreSQL, MLflow server) up in {facts['stack_start_s']:.0f} s")
        lock_dsn = st.client_settings(stack, team_registry, orchestration, dask)[
            "MLGATE_REGISTRY__LOCK_DSN"
        ]
        assert team_registry.password is not None
        registries["pg-server"] = RegistryConfig(
            store_dir=team_registry.store_dir,
            tracking_uri=team_registry.tracking_uri,
            password=team_registry.password.get_secret_value(),
            lock_dsn=lock_dsn,
        )
        versions["pg-server"] = prepare_backend(registries["pg-server"])
        connect_writers("pg-server", registries["pg-server"], commands)
        facts["lock_timeout_s"] = registries["sqlite"].lock_timeout_s
        await_connected(results, 2 * WRITERS)
        log("tracking server prepared, every writer connected to both")
        writes = {k: max(1, round(v * scale)) for k, v in WRITES.items()}
        facts["writes"] = writes
        cells = {(b, k): Cell() for b in BACKENDS for k in KINDS}
        pairs: dict[str, list[float]] = {k: [] for k in KINDS}
        attempt_pairs: dict[str, list[float]] = {k: [] for k in KINDS}
        number = 0
        for rnd in range(rounds):
            order = BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]
            for kind in KINDS:
                rate: dict[str, float] = {}
                attempts: dict[str, float] = {}
                for backend in order:
                    number += 1
                    phase = Phase(
                        number,
                        backend,
                        kind,
                        writes[kind],
                        registries[backend],
                        versions[backend],
                        PHASE_LIMIT_S,
                    )
                    wall, reports = play(phase, commands, results, barrier)
                    cell = cells[(backend, kind)]
                    conflicts_before = cell.conflicts
                    ok, errors = tally(cell, wall, reports, writes[kind])
                    rate[backend] = cell.rates[-1]
                    log(
                        f"round {rnd + 1} {kind:5} {backend:9} {ok:4} ok, "
                        f"{cell.conflicts - conflicts_before:3} conflicts in {wall:6.2f} s "
                        f"= {rate[backend]:7.1f}/s, errors {errors}"
                    )
                    attempts[backend] = cell.attempt_rates[-1]
                if rate["sqlite"] > 0:
                    pairs[kind].append(rate["pg-server"] / rate["sqlite"])
                if attempts["sqlite"] > 0:
                    attempt_pairs[kind].append(attempts["pg-server"] / attempts["sqlite"])
        facts["pairs"] = pairs
        facts["attempt_pairs"] = attempt_pairs
        facts["load_end"] = os.getloadavg()[0]
        return cells, facts
    finally:
        for q in commands:
            with contextlib.suppress(Exception):
                q.put(None)
        # Their work is reported; one slow to exit is killed.
        deadline = time.monotonic() + 15
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        log("writers stopped")
        # Stop only once the start has returned, so that nothing it starts is left behind.
        starter.join()
        stopped = st.stop_stack(stack, team_registry)
        left = [port for port in (stack.postgres.port, stack.mlflow.port) if st.port_in_use(port)]
        log(f"stack stopped ({', '.join(stopped) or 'nothing was running'})")
        if left:
            print(f"WARNING: ports still in use after the stack stopped: {left}")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}" if seconds == seconds else "-"


def fmt_range(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def fmt_ratio(values: list[float]) -> str:
    if not values:
        return "-"
    return f"**{statistics.median(values):.2f}x** ({min(values):.2f}-{max(values):.2f})"


def fmt_counter(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if v) or "0"


def report(cells: dict[tuple[str, str], Cell], facts: dict[str, Any], rounds: int) -> str:
    writes = facts["writes"]
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND}` ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, one run of the script, "
        f"{facts['total_s'] / 60:.1f} min in all; 1-minute load average "
        f"{facts['load_start']:.2f} at the start, {facts['load_end']:.2f} at the end: the "
        "machine was shared).",
        "",
        f"{WRITERS} writer processes write through flows/registry.py at once against (a) "
        f"**{LABELS['sqlite']}** (the embedded default: one SQLite file, the client retrying "
        f'"database is locked") and (b) **{LABELS["pg-server"]}** (team mode: the MLflow '
        "tracking server with basic auth and its 2 workers, and PostgreSQL, started by the "
        f"script through services/stack.py on free ports and stopped at the end; the stack "
        f"took {facts['stack_start_s']:.0f} s to start, not counted). All run on the same "
        "cores as the writers. Writes: **tag** one model-version tag; **run** one run with 10 "
        "params and 20 metrics (ensure experiment, create, log_batch, finish); **alias** one "
        "`promote` (evidence check, lock, compare-and-set re-read, alias write, version tags, "
        "audit run with its JSON artifact), all writers racing for the same alias; **mix** the "
        f"three in turn. Per phase each writer has {writes['tag']} tag / {writes['run']} run / "
        f"{writes['alias']} alias / {writes['mix']} mix writes and {PHASE_LIMIT_S:.0f} s; "
        f"{rounds} rounds, each running every kind on both backends, the first backend "
        "alternating. Lock timeout: mlgate's default "
        f"{facts['lock_timeout_s']:.0f} s.",
        "",
        "writes/s: successful writes of the 8 writers over the phase's wall time, median of "
        "the rounds (range). A lost compare-and-set (AliasConflictError) is a correct answer, "
        "not an error: counted apart, and with the successes in attempts/s. The writers of a "
        "phase start together, so an alias phase goes in waves where all read the same "
        "holder and one wins. p50/p99: one completed attempt (success or lost "
        "compare-and-set), all rounds pooled. Errors: SQLite database is locked, HTTP "
        "5xx/429, lock timeouts (file lock or advisory lock), other. Hidden retries: SQLite "
        "busy errors retried by the registry client, HTTP 5xx/429 and connection errors "
        "retried by MLflow's session; they show as latency, not errors.",
        "",
        "| backend | write | writes/s | attempts/s | p50 ms | p99 ms | ok | CAS conflicts "
        "| errors | hidden retries | not started (time limit) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for kind in KINDS:
        for backend in BACKENDS:
            c = cells[(backend, kind)]
            lines.append(
                f"| {LABELS[backend]} | {kind} | {fmt_range(c.rates)} | "
                f"{fmt_range(c.attempt_rates)} | {fmt_ms(percentile(c.latencies, 0.5))} | "
                f"{fmt_ms(percentile(c.latencies, 0.99))} | {c.ok} | {c.conflicts} | "
                f"{fmt_counter(c.errors)} | {fmt_counter(c.retries)} | {c.cut} |"
            )
    lines += [
        "",
        "Ratio, tracking server on PostgreSQL / SQLite (median of the per-round ratios of "
        "back-to-back phases, range):",
        "",
        "| write | writes/s | attempts/s |",
        "| --- | ---: | ---: |",
    ]
    for kind in KINDS:
        pairs, attempts = facts["pairs"][kind], facts["attempt_pairs"][kind]
        lines.append(f"| {kind} | {fmt_ratio(pairs)} | {fmt_ratio(attempts)} |")
    samples = {
        (backend, kind, key): text
        for (backend, kind), c in cells.items()
        for key, text in c.samples.items()
    }
    if samples:
        lines += ["", "First error of each class:", ""]
        for (backend, kind, key), text in sorted(samples.items()):
            quoted = text.replace("`", "'")
            lines.append(f"- {LABELS[backend]}, {kind}, {key}: `{quoted}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--scale", type=float, default=1.0, help="writes per phase x this")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    args = parser.parse_args()

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # The writers inherit these: no telemetry posts (this host has no network; their retries
    # would load the clients) and no "View run" line per finished run.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    started = time.monotonic()
    # Under /tmp with o+x: PostgreSQL's system user (when run as root) must pass through it.
    root = Path(tempfile.mkdtemp(prefix="mlgate-bench-registry-"))
    root.chmod(0o711)
    try:
        cells, facts = run_benchmark(root, args.rounds, args.scale)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    facts["total_s"] = time.monotonic() - started
    text = report(cells, facts, args.rounds)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
