"""The canary controller: a candidate earns `@champion` on live traffic, or is rolled back.

The target is local and real: HAProxy on the public port (`services/haproxy.py`) splits
traffic by weight between two BentoML instances (`services/canary_instances.py`), `stable`
(serving `@champion`) and `canary` (the candidate version). The controller walks the
configured steps (the canary's share in percent), and at every interval reads HAProxy's
per-server counters and both instances' `/metrics` (`services/canary_windows.py`), and
judges the window since the step began with `checks.canary.check_canary_step`.

- pass at a step: the next step; pass at the last one: the candidate is tagged with the
  canary evidence and promoted through the registry (compare-and-set against the stable's
  version), a new stable instance loads the new champion, takes the traffic, and the canary
  drains and stops.
- fail, or a step still inconclusive after `max_wait_s`, or an abort: the canary's weight
  goes to 0 first, then it drains and stops, the version is tagged with the guardrail that
  tripped and its numbers, and a notification goes out. `@champion` is never touched.

Before the first step the stable is measured alone at full traffic for an interval (the
baseline): at 100 % the stable answers nothing, and the canary is held to that window, at
the same load.

Everything the controller knows is in one state file (`services/canary_state.py`). HAProxy
and the instances run in sessions of their own and outlive the controller; a restarted
controller adopts them by pid (checked against the process start time) and resumes from the
state: a step that was being analysed is analysed again from fresh counters (a partial
window is never carried over), a decision already taken is carried out, and promotion
requires a passing analysis of every step. Only one controller runs at a time: a file lock
on this host, and in team mode (`registry.lock_dsn`) also a PostgreSQL advisory lock per
model that every host shares, so that a controller on another host waits instead of acting.

The registry is reached through `CanaryRegistry`, which `flows/` implements (and where the
verdict's tags are spelled): `services/` does not import `flows/`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from checks.canary import (
    CanaryStep,
    VariantWindow,
    analysis_gaps,
    check_canary_step,
    summarize_steps,
)
from checks.result import CheckRow, GateResult, GateStatus
from models.config import CanaryConfig, MlgateConfig
from services import haproxy, pg_lock
from services.canary_instances import instance_ok, served_version, spawn_instance, stop_instance
from services.canary_state import (
    CanaryError,
    CanaryState,
    ControllerLock,
    HAProxyRecord,
    InstanceRecord,
    Phase,
    StateStore,
    archive_state,
    canary_paths,
    controller_running,
    final_state_for,
    now_iso,
    version_key,
)
from services.canary_windows import haproxy_counts, take_snapshot, window_between
from services.launcher import ServiceStartError
from services.pg_lock import HeldLock
from services.processes import pid_alive, process_start_time, signal_and_wait

_POLL_S = 0.2
_PROBE_GRACE_S = 1.0
# Team mode's controller lock (one per model, shared by every host): see `Controller.team_lock`.
CONTROLLER_LOCK_NAMESPACE = "mlgate.canary"


class CanaryRegistry(Protocol):
    """What the controller needs from the registry; `flows/` implements it on MLflow, and
    builds the verdict's tags there from the state and result it is given."""

    def champion_version(self) -> str | None:
        """The version `@champion` points at now."""
        ...

    def record_pass(self, state: CanaryState, summary: GateResult) -> None:
        """The candidate passed every step: tag it (`gate.canary=pass` and the summary's
        numbers) and keep `summary` as its evidence."""
        ...

    def record_rollback(self, state: CanaryState, result: GateResult) -> None:
        """The candidate is rolled back for `state.decision`: tag it with the verdict, the
        guardrail and `result`'s numbers, and keep `result` as its evidence."""
        ...

    def record_superseded(self, state: CanaryState, successor: str, note: GateResult) -> None:
        """The candidate gave way to the newer `successor` before a verdict: tag it
        inconclusive and keep `note` as its evidence."""
        ...

    def promote(self, version: str, *, expected_from: str | None, reason: str) -> None:
        """Move `@champion` to `version` if it still points at `expected_from`."""
        ...

    def notify(self, title: str, body: str) -> None:
        """Best effort: never raises for a notification that could not be sent."""
        ...


# --- the controller ----------------------------------------------------------------------


class _Superseded(Exception):
    pass


class _Decided(Exception):
    pass


class Controller:
    """One run of the state machine; `run_canary` is its entry point."""

    def __init__(
        self,
        cfg: MlgateConfig,
        config_path: Path | None,
        registry: CanaryRegistry,
        *,
        env: Mapping[str, str] | None = None,
        on_event: Callable[[CanaryState, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.canary_cfg: CanaryConfig = cfg.canary
        self.config_path = Path(config_path).resolve() if config_path else None
        self.registry = registry
        self.env = dict(env or {})
        self.paths = canary_paths(cfg)
        self.store = StateStore(self.paths)
        self.on_event = on_event
        self.team: HeldLock | bool | None = None

    # persistence --------------------------------------------------------------------

    def save(self, state: CanaryState, event: str | None = None, **details: Any) -> None:
        if event:
            state.event(event, **details)
        self.store.save(state)
        if event and self.on_event is not None:
            self.on_event(state, event)

    @property
    def socket(self) -> Path:
        return self.paths.haproxy_socket

    # target -------------------------------------------------------------------------

    def ensure_haproxy(self, state: CanaryState) -> None:
        rec = state.haproxy
        if (
            rec is not None
            and rec.port == state.public_port
            and rec.host == state.public_host
            and pid_alive(rec.pid, rec.start_time)
            and haproxy.haproxy_alive(rec.pid, Path(rec.socket))
        ):
            return
        if rec is not None:
            signal_and_wait(rec.pid, signal.SIGTERM, timeout=5, start_time=rec.start_time)
        stable_ok = state.stable is not None and pid_alive(
            state.stable.pid, state.stable.start_time
        )
        canary_ok = state.canary is not None and pid_alive(
            state.canary.pid, state.canary.start_time
        )
        text = haproxy.render_config(
            host=state.public_host,
            public_port=state.public_port,
            socket_path=self.socket,
            stable_port=state.stable.port if stable_ok and state.stable else None,
            stable_weight=state.weights.get("stable", 100),
            canary_port=state.canary.port if canary_ok and state.canary else None,
            canary_weight=state.weights.get("canary", 0),
        )
        haproxy.write_config(self.paths.haproxy_config, text)

        def record(pid: int) -> None:
            # Before waiting for it: a controller that dies meanwhile leaves no orphan.
            state.haproxy = HAProxyRecord(
                pid=pid,
                start_time=process_start_time(pid),
                host=state.public_host,
                port=state.public_port,
                socket=str(self.socket),
                config=str(self.paths.haproxy_config),
            )
            self.save(state)

        pid = haproxy.start_haproxy(
            self.paths.haproxy_config, self.socket, self.paths.haproxy_log, on_spawn=record
        )
        self.save(state, "haproxy_started", pid=pid, port=state.public_port)

    def launch(self, state: CanaryState, variant: str, *, version: str | None) -> InstanceRecord:
        """Start an instance of `version` (None: `@champion`), record it before waiting for
        it (so that a controller that dies meanwhile leaves no orphan), wait until ready."""
        if self.config_path is None:
            raise CanaryError("launching an instance needs the config file's path")
        proc, record = spawn_instance(
            self.config_path,
            self.paths.instances,
            variant,
            model_name=self.cfg.registry.model_name,
            version=version,
            env=self.env,
        )
        state.retired.append(record)
        self.save(state, "instance_launching", variant=variant, version=version, port=record.port)
        try:
            proc.wait_ready(timeout=self.canary_cfg.start_timeout_s)
        except ServiceStartError:
            stop_instance(record, timeout=5)
            state.retired.remove(record)
            self.save(state)
            raise
        served = served_version(record.url)
        if served is None:
            stop_instance(record, timeout=5)
            state.retired.remove(record)
            self.save(state)
            raise ServiceStartError(f"{variant} instance on {record.url} does not name its model")
        record.version = served
        state.retired.remove(record)
        return record

    def stable_instance(self, state: CanaryState) -> InstanceRecord:
        """The stable instance serving `@champion`, launched when none runs. It comes up
        before HAProxy does on a fresh target, so that HAProxy never listens on the public
        port without a server to answer (clients would get 503s from HAProxy itself)."""
        old = state.stable
        if old is None or not instance_ok(old) or old.version != state.stable_version:
            rec = self.launch(state, "stable", version=None)
            if old is not None and old not in state.retired:
                # Stopped once HAProxy points at the new one (`stop_retired`).
                state.retired.append(old)
            state.stable = rec
            self.save(state, "stable_started", version=rec.version, port=rec.port)
            return rec
        return old

    def ensure_stable(self, state: CanaryState) -> None:
        rec = self.stable_instance(state)
        haproxy.point_server(self.socket, "stable", rec.port, state.weights["stable"])
        haproxy.wait_server_status(self.socket, "stable", "UP", timeout=30)

    def ensure_canary(self, state: CanaryState) -> None:
        rec = state.canary
        if rec is not None and rec.version == state.candidate_version and instance_ok(rec):
            haproxy.point_server(self.socket, "canary", rec.port, state.weights["canary"])
        else:
            if rec is not None:
                haproxy.park_server(self.socket, "canary")
                state.weights["canary"] = 0
                state.canary = None
                self.retire(state, rec)
            try:
                rec = self.launch(state, "canary", version=state.candidate_version)
            except ServiceStartError as err:
                raise self.decide_rollback(
                    state, "startup", f"the canary instance did not start: {err}"
                ) from None
            state.canary = rec
            self.save(state, "canary_started", version=rec.version, port=rec.port)
            haproxy.point_server(self.socket, "canary", rec.port, 0)
        try:
            haproxy.wait_server_status(self.socket, "canary", "UP", timeout=30)
        except haproxy.HAProxyError as err:
            raise self.decide_rollback(state, "startup", str(err)) from None

    def retire(self, state: CanaryState, rec: InstanceRecord) -> None:
        """Stop an instance that no longer has a role; recorded first, so that a controller
        that dies in between stops it on its next start."""
        if rec not in state.retired:
            state.retired.append(rec)
        self.save(state)
        stop_instance(rec, timeout=self.canary_cfg.drain_timeout_s)
        state.retired.remove(rec)
        self.save(state, "instance_stopped", variant=rec.variant, version=rec.version)

    def retire_canary(self, state: CanaryState) -> None:
        """The canary, already at weight 0, drains, leaves HAProxy's rotation and stops;
        so does any instance left retired by a controller that died mid-way. HAProxy being
        gone does not keep an instance running."""
        if state.canary is not None:
            with contextlib.suppress(haproxy.HAProxyError):
                haproxy.wait_drained(self.socket, "canary", timeout=self.canary_cfg.drain_timeout_s)
                haproxy.park_server(self.socket, "canary")
            rec, state.canary = state.canary, None
            self.retire(state, rec)
        self.stop_retired(state)

    def stop_retired(self, state: CanaryState) -> None:
        live = {r.pid for r in (state.stable, state.canary) if r is not None}
        for rec in list(state.retired):
            if rec.pid in live:
                # Never stop an instance that still has a role (a record kept twice).
                state.retired.remove(rec)
                self.save(state)
                continue
            self.retire(state, rec)

    def set_weights(self, state: CanaryState, stable: int, canary: int) -> None:
        haproxy.set_weights(self.socket, {"stable": stable, "canary": canary})
        state.weights = {"stable": stable, "canary": canary}
        self.save(state, "weights", stable=stable, canary=canary)

    # the walk -----------------------------------------------------------------------

    def run(self) -> CanaryState:
        # A moment's wait: `controller_running` probes by taking this lock briefly.
        with ControllerLock(self.paths, timeout=_PROBE_GRACE_S), self.team_lock() as team:
            if team is None:
                # Stopped waiting for another host's controller: aborted here meanwhile.
                return self.abort_while_waiting()
            self.team = team
            while True:
                state = self.store.read()
                if state is None:
                    raise CanaryError(f"no canary recorded in {self.paths.state}; start one first")
                if state.terminal:
                    if self.start_successor(state):
                        continue
                    return state
                if state.controller_pid is not None and state.controller_pid != os.getpid():
                    state.resumes += 1
                    self.save(state, "resumed", phase=state.phase, step_index=state.step_index)
                state.controller_pid = os.getpid()
                self.save(state)
                try:
                    self.advance(state)
                except (_Superseded, _Decided):
                    continue
                except BaseException as err:
                    self.park_after_error(state, err)
                    raise

    @contextlib.contextmanager
    def team_lock(self) -> Iterator[HeldLock | bool | None]:
        """Team mode (`registry.lock_dsn`): this model's controller lock that every host
        shares, a PostgreSQL advisory lock held for the controller's life. A controller on
        another host holding it is waited for (named in the state's events), not raced; an
        abort here ends the wait (None). Embedded mode has only the local lock (True)."""
        if self.cfg.registry.lock_dsn is None:
            yield True
            return

        def keep_waiting() -> bool:
            state = self.store.read()
            return state is not None and not state.terminal and not state.abort_requested

        def on_wait(holder: str) -> None:
            state = self.store.read()
            if state is not None:
                self.save(state, "waiting_for_controller", holder=holder)

        try:
            with pg_lock.wait_for_lock(
                self.cfg.registry.lock_dsn.get_secret_value(),
                CONTROLLER_LOCK_NAMESPACE,
                self.cfg.registry.model_name,
                application_name=(
                    f"mlgate canary {self.cfg.registry.model_name} "
                    f"{socket.gethostname()} pid {os.getpid()}"
                ),
                keep_waiting=keep_waiting,
                on_wait=on_wait,
            ) as held:
                yield held
        except pg_lock.PgLockError as err:
            raise CanaryError(f"{err} (registry.lock_dsn)") from None

    def check_team_lock(self) -> None:
        """The shared lock is still held: a controller that lost it (its connection broke)
        stops, parking the canary at weight 0, since another host's may act now."""
        if isinstance(self.team, pg_lock.HeldLock):
            try:
                self.team.check()
            except pg_lock.PgLockError as err:
                raise CanaryError(f"{err}; this controller stops (registry.lock_dsn)") from None

    def abort_while_waiting(self) -> CanaryState:
        """An abort that arrived while this controller waited for another host's: carried
        out here (nothing of this canary took traffic yet), as `abort_canary` would."""
        state = self.store.read()
        if state is None:
            raise CanaryError(f"the canary's state {self.paths.state} vanished while waiting")
        if not state.terminal and state.abort_requested:
            with contextlib.suppress(_Decided):
                raise self.decide_rollback(
                    state,
                    "abort",
                    f"aborted by {state.abort_requested.get('by', '')}: "
                    f"{state.abort_requested.get('reason', '')}",
                )
        return self.store.read() or state

    def start_successor(self, state: CanaryState) -> bool:
        """A newer candidate that arrived while this canary was being promoted or rolled
        back gets its own canary now, against whatever `@champion` is after this one."""
        if self.newer_candidate(self.store.read() or state) is None:
            return False
        # The registry is asked before the state lock is taken: other processes wait on
        # that lock, and must not wait on MLflow.
        champion = self.registry.champion_version()
        with self.store.lock():
            on_disk = self.store.read()
            if on_disk is None or on_disk.started_at != state.started_at:
                return False
            nxt = self.newer_candidate(on_disk)
            if nxt is None:
                return False
            if champion is None or version_key(nxt) <= version_key(champion):
                on_disk.pending_candidate = None
                on_disk.event("successor_dropped", version=nxt, champion=champion)
                self.store.write_locked(on_disk)
                return False
            successor = _next_state(self.cfg, nxt, champion, on_disk, public_port=None)
            archive_state(self.paths, on_disk)
            self.store.write_locked(successor)
        if self.on_event is not None:
            self.on_event(successor, "started")
        return True

    def park_after_error(self, state: CanaryState, err: BaseException) -> None:
        """A controller that fails (or is interrupted) while the canary takes traffic takes
        it out first, as far as it still can; a restart resumes from the state, with the
        step analysed again. A SIGKILL gives no such chance, and needs none: the canary
        keeps the weight it was being judged at until the next controller resumes."""
        with contextlib.suppress(Exception):
            if state.phase in (Phase.STARTING, Phase.RUNNING) and state.canary is not None:
                self.set_weights(state, 100, 0)
            self.save(state, "controller_error", error=f"{type(err).__name__}: {err}"[:500])

    def advance(self, state: CanaryState) -> None:
        if self.newer_candidate(state) is not None and state.phase in (
            Phase.STARTING,
            Phase.RUNNING,
        ):
            self.supersede(state)
        phase = Phase(state.phase)
        if phase in (Phase.STARTING, Phase.RUNNING):
            self.walk(state)
        elif phase is Phase.PROMOTING:
            self.promote(state)
        elif phase is Phase.RELOADING:
            self.reload_stable(state)
        elif phase is Phase.ROLLING_BACK:
            self.rollback(state)

    def newer_candidate(self, state: CanaryState) -> str | None:
        pending = state.pending_candidate
        if pending is None or pending == state.candidate_version:
            return None
        return pending if version_key(pending) > version_key(state.candidate_version) else None

    def check_requests(self, state: CanaryState) -> None:
        """Between ticks: an abort or a newer candidate written by another process."""
        on_disk = self.store.read()
        if on_disk is None or on_disk.started_at != state.started_at:
            return
        state.abort_requested = on_disk.abort_requested
        state.pending_candidate = on_disk.pending_candidate
        if state.abort_requested:
            reason = state.abort_requested.get("reason", "")
            by = state.abort_requested.get("by", "")
            raise self.decide_rollback(state, "abort", f"aborted by {by}: {reason}")
        if self.newer_candidate(state) is not None:
            raise _Superseded()

    def sleep(self, state: CanaryState, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self.check_team_lock()
        while True:
            self.check_requests(state)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(_POLL_S, left))

    def walk(self, state: CanaryState) -> None:
        champion = self.registry.champion_version()
        if champion == state.candidate_version and not (state.canary or state.stable):
            raise self.already_champion(state)
        if champion != state.stable_version:
            raise self.decide_rollback(
                state,
                "champion_moved",
                f"@champion is v{champion}, not v{state.stable_version} as when the canary "
                "started: the analysis compares against a stable that is no longer champion",
            )
        self.stable_instance(state)
        self.ensure_haproxy(state)
        self.ensure_stable(state)
        self.stop_retired(state)
        self.ensure_canary(state)
        if state.phase == Phase.STARTING:
            state.phase = Phase.RUNNING
            self.save(state, "running", candidate=state.candidate_version)
        cfg = self.canary_cfg
        if state.baseline is None:
            self.measure_baseline(state)
        while state.step_index < len(state.steps):
            percent = state.steps[state.step_index]
            self.set_weights(state, 100 - percent, percent)
            instances = {"stable": state.stable, "canary": state.canary}
            baseline = take_snapshot(self.socket, instances, cfg.metrics_timeout_s)
            started_wall, started = time.time(), time.monotonic()
            state.current = {
                "percent": percent,
                "started_at": started_wall,
                "ticks": 0,
                "last_result": None,
            }
            self.save(state, "step_started", percent=percent)
            while True:
                self.sleep(state, cfg.interval_s)
                snap = take_snapshot(self.socket, instances, cfg.metrics_timeout_s)
                canary_w = window_between(
                    baseline, snap, "canary", state.candidate_version, percent
                )
                stable_w = window_between(
                    baseline, snap, "stable", state.stable_version, 100 - percent
                )
                if percent == 100 and stable_w.problem is None and state.baseline:
                    stable_w = VariantWindow.from_dict(state.baseline["window"])
                result = check_canary_step(
                    stable_w, canary_w, cfg, step_percent=percent, cost=self.cfg.cost
                )
                state.current["ticks"] += 1
                state.current["last_result"] = result.to_dict()
                self.save(state)
                if result.status is GateStatus.FAIL:
                    guardrail = result.evidence.get("failed_guardrail") or "metrics"
                    # Only the stable's numbers unreadable (it crashed, say): roll back to
                    # be safe, but the candidate's evidence is missing, not bad.
                    stable_only = (
                        guardrail == "metrics"
                        and stable_w.problem is not None
                        and canary_w.problem is None
                    )
                    raise self.decide_rollback(
                        state,
                        guardrail,
                        result.reason,
                        result,
                        verdict=GateStatus.INCONCLUSIVE if stable_only else GateStatus.FAIL,
                    )
                if result.status is GateStatus.PASS:
                    state.steps_done.append(
                        CanaryStep(
                            percent=percent,
                            result=result,
                            candidate_version=state.candidate_version,
                            started_at=started_wall,
                            ended_at=time.time(),
                            seconds=round(time.monotonic() - started, 3),
                            haproxy=haproxy_counts(baseline, snap),
                        )
                    )
                    state.step_index += 1
                    state.current = None
                    self.save(state, "step_passed", percent=percent)
                    break
                if time.monotonic() - started >= cfg.max_wait_s:
                    raise self.decide_rollback(
                        state,
                        "min_requests",
                        f"step {percent}% still inconclusive after {cfg.max_wait_s:g} s: "
                        f"{result.reason}",
                        result,
                    )
        self.enter_promoting(state)
        self.promote(state)

    def already_champion(self, state: CanaryState) -> _Decided:
        """The candidate got `@champion` before this canary sent it any traffic (another
        host's controller promoted it while this one waited, or a person did): nothing is
        left to judge, and the registry is not written (its verdict is someone else's)."""
        reason = (
            f"v{state.candidate_version} already holds @champion (moved while this canary "
            "waited to start); nothing to analyse"
        )
        state.decision = {
            "outcome": "promote",
            "guardrail": None,
            "reason": reason,
            "at": now_iso(),
            "result": GateResult(
                name="canary",
                status=GateStatus.INCONCLUSIVE,
                reason=reason,
                checks=(CheckRow("champion", GateStatus.INCONCLUSIVE, "already", "-", reason),),
            ).to_dict(),
        }
        state.phase = Phase.PROMOTED
        self.save(state, "already_champion", version=state.candidate_version)
        return _Decided()

    def enter_promoting(self, state: CanaryState) -> None:
        """RUNNING -> PROMOTING as a check-and-set under the state lock: an abort that was
        written before it wins (and `abort_canary` refuses once PROMOTING is on disk)."""
        with self.store.lock():
            on_disk = self.store.read()
            if on_disk is not None and on_disk.started_at == state.started_at:
                state.abort_requested = on_disk.abort_requested or state.abort_requested
                state.pending_candidate = on_disk.pending_candidate or state.pending_candidate
            if not state.abort_requested:
                state.phase = Phase.PROMOTING
                state.event("analysis_complete", steps=[s.percent for s in state.steps_done])
                self.store.write_locked(state)
        if state.phase != Phase.PROMOTING:
            assert state.abort_requested is not None
            raise self.decide_rollback(
                state,
                "abort",
                f"aborted by {state.abort_requested.get('by', '')}: "
                f"{state.abort_requested.get('reason', '')}",
            )
        if self.on_event is not None:
            self.on_event(state, "analysis_complete")

    def measure_baseline(self, state: CanaryState) -> None:
        """The stable alone at full traffic for at least one interval, with the canary up
        and idle: what the canary at 100 % is compared with, at the same load (a window of
        the stable at 50 % would have half the load, and no window exists at 100 %)."""
        cfg = self.canary_cfg
        self.set_weights(state, 100, 0)
        instances = {"stable": state.stable}
        first = take_snapshot(self.socket, instances, cfg.metrics_timeout_s)
        started_wall, started = time.time(), time.monotonic()
        state.current = {"percent": 0, "started_at": started_wall, "ticks": 0, "last_result": None}
        self.save(state, "baseline_started")
        while True:
            self.sleep(state, cfg.interval_s)
            snap = take_snapshot(self.socket, instances, cfg.metrics_timeout_s)
            window = window_between(first, snap, "stable", state.stable_version, 100)
            state.current["ticks"] += 1
            if window.problem is not None:
                raise self.decide_rollback(
                    state,
                    "metrics",
                    f"baseline of the stable unreadable: {window.problem}",
                    verdict=GateStatus.INCONCLUSIVE,
                )
            if window.requests >= cfg.min_requests:
                state.baseline = {
                    "started_at": started_wall,
                    "ended_at": time.time(),
                    "haproxy": haproxy_counts(first, snap),
                    "window": window.to_dict(),
                }
                state.current = None
                self.save(state, "baseline_measured", requests=window.requests)
                return
            self.save(state)
            if time.monotonic() - started >= cfg.max_wait_s:
                raise self.decide_rollback(
                    state,
                    "min_requests",
                    f"the stable answered {window.requests:,} requests in "
                    f"{cfg.max_wait_s:g} s, fewer than the {cfg.min_requests:,} a baseline "
                    "needs",
                )

    def decide_rollback(
        self,
        state: CanaryState,
        guardrail: str,
        reason: str,
        result: GateResult | None = None,
        *,
        verdict: GateStatus = GateStatus.FAIL,
    ) -> _Decided:
        """Record the decision first, then carry it out: a controller that dies in between
        finishes the rollback on restart. `verdict` is the `gate.canary` tag the candidate
        gets: INCONCLUSIVE when the stable, not the candidate, could not be judged."""
        if result is None:
            percent = int((state.current or {}).get("percent", 0))
            result = GateResult(
                name="canary",
                status=GateStatus.FAIL,
                reason=reason,
                metrics={"step_percent": float(percent)},
                evidence={"failed_guardrail": guardrail, "step_percent": percent},
                checks=(CheckRow(guardrail, GateStatus.FAIL, "tripped", "-", reason),),
            )
        state.decision = {
            "outcome": "rollback",
            "guardrail": guardrail,
            "reason": reason,
            "verdict": verdict.value,
            "at": now_iso(),
            # Wall-clock, so that a controller resuming a rollback measures the whole wait.
            "at_epoch_s": time.time(),
            "result": result.to_dict(),
        }
        state.phase = Phase.ROLLING_BACK
        self.save(state, "rollback_decided", guardrail=guardrail, reason=reason[:500])
        self.rollback(state)
        return _Decided()

    # outcomes -----------------------------------------------------------------------

    def rollback(self, state: CanaryState) -> None:
        assert state.decision is not None
        decision = state.decision
        if "weight_zero" not in state.done:
            # A canary that never got a target (an abort before the first run) has no
            # traffic to take away.
            if state.haproxy is not None or state.canary is not None:
                self.ensure_haproxy(state)
                stable = state.stable
                if stable is None or not pid_alive(stable.pid, stable.start_time):
                    # At 100/0 nobody would answer: a stable comes up first.
                    with contextlib.suppress(Exception):
                        self.ensure_stable(state)
                self.set_weights(state, 100, 0)
            state.done.append("weight_zero")
            record_weight_zero_time(decision)
            self.save(state, "canary_weight_zero", seconds=decision.get("weight_zero_s"))
        if "canary_stopped" not in state.done:
            self.retire_canary(state)
            state.done.append("canary_stopped")
            self.save(state)
        if "tagged_fail" not in state.done:
            self.registry.record_rollback(state, GateResult.from_dict(decision["result"]))
            state.done.append("tagged_fail")
            self.save(state, "tagged", status="fail")
        if "notified" not in state.done:
            self.registry.notify(
                f"mlgate: canary of {state.model_name} v{state.candidate_version} rolled back",
                f"guardrail {decision['guardrail']}: {decision['reason']}\n"
                f"@champion stays v{state.stable_version}.",
            )
            state.done.append("notified")
        if state.haproxy is not None:
            # The public port keeps answering with the stable, even if HAProxy died after
            # the canary's weight went to 0.
            with contextlib.suppress(Exception):
                self.ensure_haproxy(state)
        state.phase = Phase.ROLLED_BACK
        state.current = None
        self.save(state, "rolled_back", guardrail=decision["guardrail"])

    def promote(self, state: CanaryState) -> None:
        incomplete = analysis_gaps(
            state.steps_done, candidate_version=state.candidate_version, steps=state.steps
        )
        if incomplete:
            # Never reached by the walk; a state edited or damaged by hand could.
            raise self.decide_rollback(
                state, "incomplete_analysis", f"refusing to promote: {incomplete}"
            )
        summary = _summary(state)
        if "promoted" not in state.done:
            champion = self.registry.champion_version()
            if champion != state.candidate_version:
                if champion != state.stable_version:
                    raise self.decide_rollback(
                        state,
                        "champion_moved",
                        f"@champion moved to v{champion} during the canary "
                        f"(the analysis was against v{state.stable_version})",
                    )
                if "tagged_pass" not in state.done:
                    self.registry.record_pass(state, summary)
                    state.done.append("tagged_pass")
                    self.save(state, "tagged", status="pass")
                try:
                    self.registry.promote(
                        state.candidate_version,
                        expected_from=state.stable_version,
                        reason=f"canary passed: {summary.reason}",
                    )
                except Exception as err:
                    # The move may have happened before a later part of it (the audit
                    # record) failed: the registry, not the exception, says which.
                    if self.registry.champion_version() != state.candidate_version:
                        raise self.decide_rollback(
                            state,
                            "promotion",
                            f"promotion refused: {type(err).__name__}: {err}",
                        ) from None
                    state.event("promotion_error_after_move", error=str(err)[:500])
            state.decision = {
                "outcome": "promote",
                "guardrail": None,
                "reason": summary.reason,
                "at": now_iso(),
                "result": summary.to_dict(),
            }
            state.done.append("promoted")
            state.phase = Phase.RELOADING
            self.save(state, "promoted", version=state.candidate_version)
        self.reload_stable(state)

    def reload_stable(self, state: CanaryState) -> None:
        """The stable instance loads the new champion (a fresh instance beside the old one),
        takes all the traffic, and the canary drains and stops."""
        self.ensure_haproxy(state)
        old = state.stable
        if old is None or old.version != state.candidate_version or not instance_ok(old):
            new = self.launch(state, "stable", version=None)
            if old is not None and old not in state.retired:
                state.retired.append(old)
            state.stable = new
            self.save(state, "stable_reloaded", version=new.version, port=new.port)
        assert state.stable is not None
        haproxy.point_server(self.socket, "stable", state.stable.port, state.weights["stable"])
        haproxy.wait_server_status(self.socket, "stable", "UP", timeout=30)
        self.set_weights(state, 100, 0)
        self.retire_canary(state)
        state.stable_version = state.stable.version
        if "notified" not in state.done:
            self.registry.notify(
                f"mlgate: canary of {state.model_name} v{state.candidate_version} promoted",
                f"{_summary(state).reason}\n@champion is now v{state.candidate_version}.",
            )
            state.done.append("notified")
        state.phase = Phase.PROMOTED
        self.save(state, "done", champion=state.candidate_version)

    def supersede(self, state: CanaryState) -> None:
        """A newer candidate restarts the analysis from its first step."""
        new = self.newer_candidate(state)
        assert new is not None
        old = state.candidate_version
        if state.canary is not None:
            self.ensure_haproxy(state)
            self.set_weights(state, 100, 0)
            self.retire_canary(state)
        note = GateResult(
            name="canary",
            status=GateStatus.INCONCLUSIVE,
            reason=f"superseded by v{new} after {len(state.steps_done)} step(s)",
            evidence={"steps": [s.to_dict() for s in state.steps_done]},
        )
        self.registry.record_superseded(state, new, note)
        state.candidate_version = new
        state.step_index = 0
        state.baseline = None
        state.steps_done = []
        state.current = None
        state.decision = None
        state.done = []
        state.phase = Phase.STARTING
        self.save(state, "superseded", old=old, new=new)


def record_weight_zero_time(decision: dict[str, Any]) -> None:
    """Rollback speed as a number: the seconds from the verdict to HAProxy holding the
    canary at weight 0, in the decision and in its gate result's metrics (so in the
    candidate's evidence and tags as `canary.weight_zero_s`)."""
    decided = decision.get("at_epoch_s")
    if not isinstance(decided, int | float):
        return
    seconds = round(max(0.0, time.time() - float(decided)), 4)
    decision["weight_zero_s"] = seconds
    decision["result"].setdefault("metrics", {})["weight_zero_s"] = seconds


def _summary(state: CanaryState) -> GateResult:
    return summarize_steps(
        state.steps_done,
        candidate_version=state.candidate_version,
        stable_version=state.stable_version,
        steps=state.steps,
    )


# --- the public API -----------------------------------------------------------------------


def start_canary(
    cfg: MlgateConfig,
    candidate_version: str,
    registry: CanaryRegistry,
    *,
    public_port: int | None = None,
) -> CanaryState:
    """Record a canary of `candidate_version` against the current `@champion`; nothing is
    launched here (`run_canary` brings up HAProxy and the instances, or adopts those that
    run). While a canary of an older candidate is under way, the newer one replaces it: the
    running controller restarts its analysis with it at its next tick, or the next
    `run_canary` does. Returns the recorded state."""
    candidate = str(candidate_version)
    store = StateStore(canary_paths(cfg))
    with store.lock():
        existing = store.read()
        if existing is not None and not existing.terminal:
            if candidate in (existing.candidate_version, existing.pending_candidate):
                return existing
            newest = max(
                [v for v in (existing.candidate_version, existing.pending_candidate) if v],
                key=version_key,
            )
            if version_key(candidate) < version_key(newest):
                raise CanaryError(
                    f"a canary of v{existing.candidate_version} is under way"
                    + (f" (v{newest} waiting)" if newest != existing.candidate_version else "")
                    + f"; v{candidate} is older and does not replace it"
                )
            existing.pending_candidate = candidate
            existing.event("newer_candidate", version=candidate)
            store.write_locked(existing)
            return existing
        champion = registry.champion_version()
        if champion is None:
            raise CanaryError(
                f"{cfg.registry.model_name} has no @champion to compare a canary with; "
                "promote the first version directly"
            )
        if champion == candidate:
            raise CanaryError(f"v{candidate} already holds @champion")
        state = _next_state(cfg, candidate, champion, existing, public_port=public_port)
        if existing is not None:
            archive_state(store.paths, existing)
        store.write_locked(state)
        return state


def _next_state(
    cfg: MlgateConfig,
    candidate: str,
    champion: str,
    existing: CanaryState | None,
    *,
    public_port: int | None,
) -> CanaryState:
    """A fresh canary of `candidate` against `champion`; the target of a finished one
    (HAProxy and the stable instance) is reused."""
    state = CanaryState(
        model_name=cfg.registry.model_name,
        candidate_version=candidate,
        stable_version=champion,
        steps=list(cfg.canary.steps),
        public_host=cfg.serving.host,
        public_port=public_port or cfg.canary.public_port or cfg.serving.port,
    )
    if existing is not None:
        state.haproxy, state.stable = existing.haproxy, existing.stable
        state.retired = list(existing.retired)
        if existing.canary is not None:
            state.retired.append(existing.canary)
        if public_port is None and existing.haproxy is not None:
            state.public_host = existing.public_host
            state.public_port = existing.public_port
    state.event("started", candidate=candidate, stable=champion)
    return state


def run_canary(
    cfg: MlgateConfig,
    config_path: Path | str,
    registry: CanaryRegistry,
    *,
    env: Mapping[str, str] | None = None,
    on_event: Callable[[CanaryState, str], None] | None = None,
) -> CanaryState:
    """Walk the recorded canary to its end (promoted or rolled back) and return the final
    state; resumes whatever a previous controller left. `env` is added to the instances'
    environment; `on_event(state, event)` is called after each recorded event. Raises
    `CanaryBusyError` while another controller runs it."""
    return Controller(cfg, Path(config_path), registry, env=env, on_event=on_event).run()


def abort_canary(
    cfg: MlgateConfig,
    reason: str,
    registry: CanaryRegistry,
    *,
    by: str | None = None,
    wait_s: float = 60.0,
    config_path: Path | str | None = None,
) -> CanaryState:
    """Roll the canary back now. A running controller does it at its next poll (within
    a fraction of a second); with none running, this call does it. Too late once the
    candidate was promoted: use `mlgate rollback` then."""
    if not reason.strip():
        raise CanaryError("an abort needs a reason")
    store = StateStore(canary_paths(cfg))
    with store.lock():
        state = store.read()
        if state is None or state.terminal:
            raise CanaryError("no canary under way")
        if state.phase in (Phase.PROMOTING, Phase.RELOADING):
            raise CanaryError(
                f"v{state.candidate_version} passed every step and is being promoted; "
                "roll back with `mlgate rollback` afterwards"
            )
        state.abort_requested = {
            "reason": reason,
            "by": by or f"pid {os.getpid()}",
            "at": now_iso(),
        }
        state.event("abort_requested", reason=reason)
        store.write_locked(state)
    deadline = time.monotonic() + wait_s
    while controller_running(cfg):
        current = store.read()
        if current is not None and (current.terminal or current.started_at != state.started_at):
            # Finished, or finished and followed by a successor canary of a newer candidate.
            return final_state_for(cfg, state.candidate_version, state.started_at) or current
        if time.monotonic() > deadline:
            raise CanaryError(f"the running controller did not roll back within {wait_s:g} s")
        time.sleep(_POLL_S)
    controller = Controller(cfg, Path(config_path) if config_path else None, registry)
    with ControllerLock(controller.paths, timeout=_PROBE_GRACE_S):
        current = store.read()
        assert current is not None
        if not current.terminal:
            if current.phase != Phase.ROLLING_BACK:
                with contextlib.suppress(_Decided):
                    raise controller.decide_rollback(
                        current, "abort", f"aborted by {state.abort_requested['by']}: {reason}"
                    )
            else:
                controller.rollback(current)
        final = store.read()
    assert final is not None
    return final


def stop_target(cfg: MlgateConfig, *, force: bool = False) -> None:
    """Stop HAProxy and every instance of the target (the demo's and the tests' teardown).
    Refuses while a controller runs, and while a canary is under way unless `force` (the
    candidate is then left untagged: abort it instead to record why)."""
    paths = canary_paths(cfg)
    store = StateStore(paths)
    with ControllerLock(paths, timeout=_PROBE_GRACE_S):
        state = store.read()
        if state is None:
            return
        if not state.terminal and not force:
            raise CanaryError(
                f"the canary of v{state.candidate_version} is {state.phase}; abort it first"
            )
        for rec in [state.canary, state.stable, *state.retired]:
            if rec is not None:
                stop_instance(rec, timeout=cfg.canary.drain_timeout_s)
        if state.haproxy is not None:
            haproxy.stop_haproxy(state.haproxy.pid, start_time=state.haproxy.start_time)
        state.canary = state.stable = state.haproxy = None
        state.retired = []
        if not state.terminal:
            state.phase = Phase.ROLLED_BACK
            state.decision = state.decision or {
                "outcome": "rollback",
                "guardrail": "stopped",
                "reason": "the target was stopped",
                "at": now_iso(),
            }
        state.event("target_stopped")
        with store.lock():
            store.write_locked(state)
