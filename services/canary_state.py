"""The canary's state machine and its file: phases, what the controller knows, where it is kept.

Everything the controller knows is in one JSON file, `<store_dir>/canary/<model>/state.json`,
written atomically under one file lock (`StateStore`); a finished canary that another one
follows is archived under `runs/`. Only one controller runs at a time: it holds a second
lock for its whole life (`ControllerLock`), which the OS releases when its process dies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from checks.canary import CanaryStep
from models.config import MlgateConfig
from services import haproxy

STATE_FORMAT = 1
_MAX_EVENTS = 300


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PROMOTING = "promoting"
    RELOADING = "reloading"
    ROLLING_BACK = "rolling_back"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


TERMINAL = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK})


class CanaryError(RuntimeError):
    """A canary that cannot be started, run or aborted; the message says why."""


class CanaryBusyError(CanaryError):
    """Another controller is running this model's canary."""


@dataclass(frozen=True)
class CanaryPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def state_lock(self) -> Path:
        return self.root / "state.json.lock"

    @property
    def controller_lock(self) -> Path:
        return self.root / "controller.lock"

    @property
    def haproxy_config(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def haproxy_log(self) -> Path:
        return self.root / "haproxy.log"

    @property
    def haproxy_socket(self) -> Path:
        return haproxy.socket_path_for(self.root)

    @property
    def instances(self) -> Path:
        return self.root / "instances"

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def canary_paths(cfg: MlgateConfig) -> CanaryPaths:
    return CanaryPaths(cfg.registry.store_dir.resolve() / "canary" / cfg.registry.model_name)


@dataclass
class InstanceRecord:
    """A BentoML instance of the target: which version it serves and how to find it."""

    variant: str
    version: str
    port: int
    pid: int
    start_time: int | None
    home: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class HAProxyRecord:
    pid: int
    start_time: int | None
    host: str
    port: int
    socket: str
    config: str


@dataclass
class CanaryState:
    """The controller's whole memory (see `services/canary.py` for how it is used).

    `baseline` is the stable's window alone at full traffic, measured before the first
    step: at 100 % the stable answers nothing, and the canary is held to it. `steps_done`
    holds one `CanaryStep` per step analysed to a pass (percent, window, HAProxy's
    per-server counts, the gate result); `current` the step being analysed (informational:
    a restarted controller analyses that step again from fresh counters); `decision` the
    outcome once taken (`promote` or `rollback`, the guardrail, the reason, the result);
    `done` the parts of carrying it out that are finished. `abort_requested` and
    `pending_candidate` are written by others and only read by the controller."""

    model_name: str
    candidate_version: str
    stable_version: str
    steps: list[int]
    phase: str = Phase.STARTING
    step_index: int = 0
    weights: dict[str, int] = field(default_factory=lambda: {"stable": 100, "canary": 0})
    public_host: str = "127.0.0.1"
    public_port: int = 3000
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    haproxy: HAProxyRecord | None = None
    stable: InstanceRecord | None = None
    canary: InstanceRecord | None = None
    retired: list[InstanceRecord] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    steps_done: list[CanaryStep] = field(default_factory=list)
    current: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    done: list[str] = field(default_factory=list)
    controller_pid: int | None = None
    resumes: int = 0
    abort_requested: dict[str, Any] | None = None
    pending_candidate: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    format: int = STATE_FORMAT

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def public_url(self) -> str:
        return f"http://{self.public_host}:{self.public_port}"

    def event(self, kind: str, **details: Any) -> None:
        self.events.append({"at": now_iso(), "event": kind, **details})
        del self.events[:-_MAX_EVENTS]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, steps_done=[]))
        d["steps_done"] = [s.to_dict() for s in self.steps_done]
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CanaryState:
        if d.get("format") != STATE_FORMAT:
            raise CanaryError(f"canary state format {d.get('format')} is not {STATE_FORMAT}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for key in ("stable", "canary"):
            if values.get(key):
                values[key] = InstanceRecord(**values[key])
        values["retired"] = [InstanceRecord(**r) for r in values.get("retired", [])]
        if values.get("haproxy"):
            values["haproxy"] = HAProxyRecord(**values["haproxy"])
        values["steps_done"] = [CanaryStep.from_dict(s) for s in values.get("steps_done", [])]
        return cls(**values)


def jsonable(obj: Any) -> Any:
    """Strict JSON: non-finite floats become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def version_key(version: str) -> tuple[int, str]:
    """Registry versions in order: numbers numerically, anything else before them."""
    return (int(version), "") if version.isdigit() else (-1, version)


class StateStore:
    """`state.json` under `state.json.lock`. Reads without the lock are safe (writes are
    atomic renames); every write merges the fields other processes own."""

    def __init__(self, paths: CanaryPaths) -> None:
        self.paths = paths

    def lock(self) -> FileLock:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.paths.state_lock), timeout=30)

    def read(self) -> CanaryState | None:
        try:
            raw = json.loads(self.paths.state.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise CanaryError(f"canary state {self.paths.state} is not valid JSON: {err}") from None
        return CanaryState.from_dict(raw)

    def write_locked(self, state: CanaryState) -> None:
        """Write with the lock already held."""
        state.updated_at = time.time()
        tmp = self.paths.state.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_dict(), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.paths.state)

    def save(self, state: CanaryState) -> None:
        """The controller's write: the requests others made meanwhile are kept."""
        with self.lock():
            on_disk = self.read()
            if on_disk is not None and on_disk.started_at == state.started_at:
                state.abort_requested = on_disk.abort_requested or state.abort_requested
                state.pending_candidate = on_disk.pending_candidate or state.pending_candidate
            self.write_locked(state)


def archive_state(paths: CanaryPaths, state: CanaryState) -> None:
    """Keep a finished canary under `runs/` before its successor replaces it."""
    paths.runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(state.started_at))
    target = paths.runs / f"{stamp}-v{state.candidate_version}-{state.phase}.json"
    target.write_text(json.dumps(state.to_dict(), indent=1))


def final_state_for(cfg: MlgateConfig, version: str, not_before: float = 0.0) -> CanaryState | None:
    """The finished canary of `version` that started at or after `not_before`: the current
    state when it is that one, else the newest archived one (a controller goes on with a
    successor canary after it). None while it runs, or when it was superseded."""
    paths = canary_paths(cfg)
    current = StateStore(paths).read()
    if (
        current is not None
        and current.candidate_version == version
        and current.terminal
        and current.started_at >= not_before
    ):
        return current
    for path in sorted(paths.runs.glob(f"*-v{version}-*.json"), reverse=True):
        with contextlib.suppress(CanaryError, ValueError, KeyError, TypeError):
            archived = CanaryState.from_dict(json.loads(path.read_text()))
            if archived.terminal and archived.started_at >= not_before:
                return archived
    return None


class ControllerLock:
    """Held for a controller's whole life; the OS releases it when the process dies."""

    def __init__(self, paths: CanaryPaths, timeout: float = 0.0) -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(paths.controller_lock), timeout=timeout)

    def __enter__(self) -> ControllerLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise CanaryBusyError(
                f"another canary controller holds {self._lock.lock_file}"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def controller_running(cfg: MlgateConfig) -> bool:
    try:
        with ControllerLock(canary_paths(cfg)):
            return False
    except CanaryBusyError:
        return True
