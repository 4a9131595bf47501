"""Running the prediction service as a `bentoml serve` child process.

`mlgate serve` blocks on it; tests and the canary controller start one per variant. The
child reads the same config file (found through `MLGATE_CONFIG`, see
`services/bento_service.py`); what differs per instance, the model and the variant, reaches
it as config overrides (`MLGATE_SERVING__MODEL`, `MLGATE_SERVING__VARIANT`).

Each instance gets a BentoML home of its own (unless the caller gives one): BentoML empties
its Prometheus multiprocess directory, which lives in that home, when a server starts, so
two services sharing one would report each other's counters. `mlgate serve`'s child dies
with it (`die_with_parent`: Linux's PR_SET_PDEATHSIG, see `services.processes`); the
canary's instances do not, on purpose: they outlive their controller.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from models.config import CONFIG_PATH_ENV, env_override_name
from models.model_ref import ModelRef
from services.processes import die_with_parent_preexec

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_IMPORT = "services.bento_service:MlgateService"
_TAIL_LINES = 200
# BentoML's arbiter restarts a worker whose start-up failed, forever, and never exits; the
# worker's ASGI server prints this line each time, so it is what tells a failed start apart
# from a slow one.
_STARTUP_FAILED = "Application startup failed"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready; the message ends with its output."""


class ServiceProcess:
    """A running `bentoml serve`; its merged stdout and stderr are kept (the last lines),
    optionally echoed to our stderr and appended to a log file, so that the child never
    blocks on a full pipe."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        host: str,
        port: int,
        echo: bool = False,
        log_path: Path | None = None,
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._log: IO[str] | None = open(log_path, "a") if log_path else None  # noqa: SIM115
        self._echo = echo
        self._startup_failed = threading.Event()
        self._pump = threading.Thread(target=self._read_output, daemon=True)
        self._pump.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._tail)[-lines:])

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            if _STARTUP_FAILED in line:
                self._startup_failed.set()
            if self._echo:
                print(line, file=sys.stderr, flush=True)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def _failure_cause(self) -> str:
        causes = [line for line in self._tail if _EXCEPTION_LINE.match(line)]
        return f" ({causes[-1]})" if causes else ""

    def is_running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll `/readyz` until it answers 200. Fail early, with the output, when the process
        exits or a worker's start-up fails (a model that is missing or fails its checks)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    self._pump.join(timeout=2)
                    raise ServiceStartError(
                        f"service on {self.url} exited with status {code} before it was "
                        f"ready{self._failure_cause()}; its last output:\n{self.output_tail()}"
                    )
                if self._startup_failed.is_set():
                    raise ServiceStartError(
                        f"service on {self.url} failed to start{self._failure_cause()}; "
                        f"its last output:\n{self.output_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceStartError(
                        f"service on {self.url} was not ready after {timeout:.0f} s; "
                        f"its last output:\n{self.output_tail()}"
                    )
                time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, so BentoML drains and stops its workers; SIGKILL to the whole process
        group if that takes longer than `timeout`. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The child leads its own session, so its group is exactly the server and
                # the workers it spawned.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self._pump.join(timeout=2)
        # A reader still alive means something else holds the pipe; it keeps the file.
        if self._log is not None and not self._pump.is_alive():
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_service(
    config_path: Path,
    ref: ModelRef,
    *,
    port: int,
    variant: str | None = None,
    host: str = "127.0.0.1",
    echo: bool = False,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> ServiceProcess:
    """Start `bentoml serve` for the model `ref` on host:port, as `variant` (None: the
    config's `serving.variant`). Returns at once; call `wait_ready()` before sending
    traffic. `env` adds to (and overrides) the inherited environment; without a
    `BENTOML_HOME` there the instance gets its own (`instance_home`). With
    `die_with_parent` the server gets SIGTERM when this process dies, however it dies."""
    child_env = dict(os.environ)
    child_env.update(
        {
            CONFIG_PATH_ENV: str(Path(config_path).resolve()),
            env_override_name("serving", "model"): str(ref),
            "PYTHONUNBUFFERED": "1",
            "BENTOML_DO_NOT_TRACK": "True",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    if variant is not None:
        child_env[env_override_name("serving", "variant")] = variant
    if env:
        child_env.update(env)
    if not env or "BENTOML_HOME" not in env:
        child_env["BENTOML_HOME"] = str(instance_home(host, port))
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE_IMPORT,
        "--working-dir",
        str(REPO_ROOT),
        "--host",
        host,
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent_preexec() if die_with_parent else None,
    )
    return ServiceProcess(process, host=host, port=port, echo=echo, log_path=log_path)


def instance_home(host: str, port: int) -> Path:
    """A BentoML home for the instance on host:port: one address has one running server at
    a time, so no two running servers share it."""
    tag = re.sub(r"[^\w.-]", "_", host)
    root = Path(tempfile.gettempdir()) / f"mlgate-bentoml-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    # A predictable name in a shared /tmp: another user could have made it first.
    info = root.lstat()
    if root.is_symlink() or info.st_uid != os.getuid():
        raise ServiceStartError(
            f"{root} is not a directory of this user (owner {info.st_uid}): remove it, or "
            "give the instance a BENTOML_HOME"
        )
    if info.st_mode & 0o077:
        root.chmod(0o700)
    home = root / f"{tag}-{port}"
    home.mkdir(exist_ok=True)
    return home
