"""Team mode's servers as local processes: PostgreSQL, MLflow, Prefect and Dask, by pid.

`start_stack` runs PostgreSQL (Debian's binaries), the MLflow tracking server on it (basic
auth, proxied artifacts), the Prefect server on it with a process work pool and its workers,
and a Dask scheduler with its workers, each bound to 127.0.0.1 in a session of its own, so it
outlives `mlgate stack up`. Each process's pid and /proc start time are recorded in
`<stack dir>/state.json` (pids are reused); `stack_status` checks them and asks each server
whether it answers, `stop_stack` stops them in reverse order. A part whose `start` is false
runs on another host: the stack starts nothing for it and checks the address clients use.

The databases' passwords are generated on the first start and kept owner-only in
`<stack dir>/secrets.json`; the MLflow admin's password and Prefect's auth string are the
config's (`registry.password`, `orchestration.auth_string`), which come from the environment.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from filelock import FileLock

from models.config import DaskConfig, OrchestrationConfig, RegistryConfig, StackConfig
from services.processes import pid_alive, process_start_time, signal_and_wait

HOST = "127.0.0.1"
# The admin password that MLflow's basic_auth.ini shipped before 3.x (GHSA-gq3w-7jj3-x7gr).
MLFLOW_LEGACY_PASSWORD = "password1234"
MLFLOW_MIN_PASSWORD = 12
STATE_FILE = "state.json"
SECRETS_FILE = "secrets.json"
# Roles and databases on the stack's PostgreSQL: role -> its databases.
DATABASES = {
    "mlflow": ("mlflow", "mlflow_auth"),
    "prefect": ("prefect",),
    # The alias lock's role: advisory locks need no privilege beyond connecting.
    "mlgate": ("mlgate",),
}
_CHECK_TIMEOUT_S = 10.0


class StackError(RuntimeError):
    """A part of the stack cannot be started, reached or configured; the message says why."""


@dataclass(frozen=True)
class PartStatus:
    """One part as `mlgate stack status` shows it. `expected`: it should be up (started here,
    or configured as a server elsewhere); `managed`: this stack runs it."""

    name: str
    address: str
    expected: bool
    managed: bool
    pid: int | None
    healthy: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Proc:
    pid: int
    start_time: int | None
    log: str


@dataclass(frozen=True)
class _Layout:
    """The slices the stack needs, and where its files live."""

    stack: StackConfig
    registry: RegistryConfig
    orchestration: OrchestrationConfig
    dask: DaskConfig
    dir: Path

    @property
    def pg_port(self) -> int:
        return self.stack.postgres.port

    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.stack.prefect.port}/api"


def stack_dir(stack: StackConfig, registry: RegistryConfig) -> Path:
    return Path(stack.dir or registry.store_dir / "stack").resolve()


def _layout(
    stack: StackConfig,
    registry: RegistryConfig,
    orchestration: OrchestrationConfig,
    dask: DaskConfig,
) -> _Layout:
    return _Layout(stack, registry, orchestration, dask, stack_dir(stack, registry))


# --- state and secrets -----------------------------------------------------------------


def _read_state(root: Path) -> dict[str, _Proc]:
    try:
        raw = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    return {name: _Proc(**rec) for name, rec in raw.get("processes", {}).items()}


def _write_state(root: Path, procs: dict[str, _Proc]) -> None:
    tmp = root / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"processes": {n: asdict(p) for n, p in procs.items()}}, indent=2))
    os.replace(tmp, root / STATE_FILE)


def _write_private(path: Path, text: str) -> None:
    """Owner-only from the first byte: the file holds passwords."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _secrets(root: Path) -> dict[str, str]:
    """The generated passwords: PostgreSQL's superuser, one per role, Flask's CSRF key."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SECRETS_FILE
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = ["postgres", *DATABASES, "flask_secret_key"]
    if all(k in known for k in wanted):
        return known
    known = {k: known.get(k) or secrets.token_urlsafe(24) for k in wanted}
    _write_private(path, json.dumps(known, indent=2))
    return known


def _pg_url(role: str, password: str, port: int, database: str, driver: str = "") -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{quote(role, safe='')}:{quote(password, safe='')}@{HOST}:{port}/{database}"


def client_settings(
    stack: StackConfig,
    registry: RegistryConfig,
    orchestration: OrchestrationConfig,
    dask: DaskConfig,
) -> dict[str, str]:
    """What clients on this host set to use the parts started here (`mlgate stack env`), as
    MLGATE_ overrides; the MLflow password and Prefect auth string are already theirs."""
    lay = _layout(stack, registry, orchestration, dask)
    env: dict[str, str] = {}
    if stack.mlflow.start:
        env["MLGATE_REGISTRY__TRACKING_URI"] = f"http://{HOST}:{stack.mlflow.port}"
    if stack.postgres.start:
        password = _secrets(lay.dir)["mlgate"]
        env["MLGATE_REGISTRY__LOCK_DSN"] = _pg_url("mlgate", password, lay.pg_port, "mlgate")
    if stack.prefect.start:
        env["MLGATE_ORCHESTRATION__API_URL"] = lay.prefect_api_url()
    if stack.dask.start:
        env["MLGATE_DASK__SCHEDULER_ADDRESS"] = f"tcp://{HOST}:{stack.dask.port}"
    return env


# --- processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """An unprivileged user a root caller runs PostgreSQL as."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _spawn(
    root: Path,
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    run_as: _RunAs | None = None,
    cwd: Path | None = None,
) -> _Proc:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            **(run_as.popen_kwargs() if run_as else {}),
        )
    return _Proc(process.pid, process_start_time(process.pid), str(log_path))


def _alive(proc: _Proc | None) -> bool:
    return proc is not None and pid_alive(proc.pid, proc.start_time)


def _log_tail(proc: _Proc, chars: int = 3000) -> str:
    try:
        return Path(proc.log).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: _Proc, sig: int, *, group: bool, timeout: float = 30.0) -> None:
    """Stop the recorded process (and, with `group`, the session it leads: servers that
    fork workers), escalating to SIGKILL after `timeout`."""
    signal_and_wait(proc.pid, sig, timeout=timeout, group=group, start_time=proc.start_time)
    if not group:
        return
    # The leader may go before its workers; the port is free only once they have gone too.
    deadline = time.monotonic() + timeout
    while _group_members(proc.pid):
        if time.monotonic() > deadline:
            for pid in _group_members(proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            return
        time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    """Live processes of the process group (zombies are gone already)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = raw[raw.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """The servers are configured by the stack alone: MLflow and Prefect settings inherited
    from the caller (an embedded Prefect API, a client's tracking URI) are left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return env | extra


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _check_port_free(port: int, field: str) -> None:
    if port_in_use(port):
        raise StackError(
            f"{HOST}:{port} is already in use by a process the stack did not start; stop it "
            f"or choose another port ({field})"
        )


def _wait_until(
    what: str,
    ready: Callable[[], bool],
    procs: list[_Proc],
    deadline: float,
) -> None:
    """Poll `ready` until it holds; a process of `procs` that exits, or the deadline, is an
    error that quotes the log."""
    while True:
        for proc in procs:
            if not _alive(proc):
                raise StackError(
                    f"{what}: a process exited while starting; its log {proc.log} ends:\n"
                    f"{_log_tail(proc)}"
                )
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p.log}:\n{_log_tail(p, 1500)}" for p in procs)
            raise StackError(f"{what} not ready in time (stack.start_timeout_s){logs}")
        time.sleep(0.5)


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=_CHECK_TIMEOUT_S).status_code == 200


# --- PostgreSQL --------------------------------------------------------------------------


def postgres_bin() -> Path:
    """Debian's newest PostgreSQL server binaries (/usr/lib/postgresql/<ver>/bin)."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise StackError(
            "PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin/initdb "
            "is missing): `make install` installs Debian's postgresql package"
        )
    return found[-1]


def _postgres_user(os_user: str) -> _RunAs | None:
    """PostgreSQL refuses to run as root: as root, an unprivileged system user (created when
    missing); as anyone else, the caller."""
    if os.geteuid() != 0:
        return None
    if not _user_exists(os_user):
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        out = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                os_user,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0 and "already exists" not in out.stderr:
            raise StackError(f"cannot create the system user {os_user!r}: {out.stderr.strip()}")
    entry = pwd.getpwnam(os_user)
    if entry.pw_uid == 0:
        raise StackError(f"stack.postgres.os_user {os_user!r} is root; PostgreSQL refuses it")
    return _RunAs(os_user, entry.pw_uid, entry.pw_gid)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _owned_dir(path: Path, run_as: _RunAs | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)
    path.chmod(0o700)
    return path


def _check_reachable(path: Path, run_as: _RunAs) -> None:
    """The server user needs to pass through every folder above its data directory."""

    def can(flag: str, p: Path) -> bool:
        return (
            subprocess.run(["test", flag, str(p)], timeout=10, **run_as.popen_kwargs()).returncode
            == 0
        )

    if can("-w", path):
        return
    blocked = next((p for p in reversed(path.parents) if not can("-x", p)), path)
    raise StackError(
        f"PostgreSQL runs as the system user {run_as.name!r}, who cannot reach {path}: "
        f"{blocked} is closed to other users. Choose stack.dir under a folder others may pass "
        f"through, or allow it with `chmod o+x {blocked}`"
    )


def _start_postgres(
    lay: _Layout, secret: dict[str, str], procs: dict[str, _Proc], deadline: float
) -> None:
    bindir = postgres_bin()
    run_as = _postgres_user(lay.stack.postgres.os_user)
    pg = _owned_dir(lay.dir / "postgres", run_as)
    data = _owned_dir(pg / "data", run_as)
    sockets = _owned_dir(pg / "run", run_as)
    if run_as is not None:
        _check_reachable(data, run_as)
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "initdb.pw"
        _write_private(pwfile, secret["postgres"] + "\n")
        if run_as is not None:
            os.chown(pwfile, run_as.uid, run_as.gid)
        try:
            out = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=pg,
                **(run_as.popen_kwargs() if run_as else {}),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            raise StackError(
                f"initdb failed for {data}: {(out.stderr or out.stdout).strip()[-2000:]}"
            )
    _check_port_free(lay.pg_port, "stack.postgres.port")
    argv = [
        str(bindir / "postgres"),
        "-D",
        str(data),
        "-h",
        HOST,
        "-p",
        str(lay.pg_port),
        "-k",
        str(sockets),
    ]
    procs["postgres"] = _spawn(lay.dir, "postgres", argv, _child_env({}), run_as=run_as, cwd=pg)
    _write_state(lay.dir, procs)
    admin = _pg_url("postgres", secret["postgres"], lay.pg_port, "postgres")
    _wait_until("PostgreSQL", lambda: _pg_ready(admin), [procs["postgres"]], deadline)


def _pg_ready(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=int(_CHECK_TIMEOUT_S)) as conn:
        conn.execute("SELECT 1")
    return True


def _ensure_databases(lay: _Layout, secret: dict[str, str]) -> None:
    """The roles and databases of MLflow, Prefect and the alias lock, each database closed to
    every role but its owner; passwords follow secrets.json."""
    import psycopg
    from psycopg import sql

    admin = _pg_url("postgres", secret["postgres"], lay.pg_port, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for role, databases in DATABASES.items():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = sql.SQL("ALTER" if exists else "CREATE")
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    verb, sql.Identifier(role), sql.Literal(secret[role])
                )
            )
            for db in databases:
                if not conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (db,)
                ).fetchone():
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(db), sql.Identifier(role)
                        )
                    )
                conn.execute(
                    sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db))
                )


# --- MLflow --------------------------------------------------------------------------------


def mlflow_admin_password(registry: RegistryConfig) -> str:
    """The tracking server's admin password: the config's, never MLflow's old default."""
    env = "MLGATE_REGISTRY__PASSWORD"
    if registry.password is None or not registry.password.get_secret_value():
        raise StackError(
            f"registry.password is not set: export {env} with the MLflow admin's password "
            f"(at least {MLFLOW_MIN_PASSWORD} characters) before starting the tracking server"
        )
    password = registry.password.get_secret_value()
    if password == MLFLOW_LEGACY_PASSWORD:
        raise StackError(
            f"registry.password is {MLFLOW_LEGACY_PASSWORD!r}, the default that older MLflow "
            f"versions shipped and everyone knows: choose another one in {env}"
        )
    if len(password) < MLFLOW_MIN_PASSWORD:
        raise StackError(
            f"registry.password has {len(password)} characters; MLflow needs at least "
            f"{MLFLOW_MIN_PASSWORD} ({env})"
        )
    return password


def _mlflow_databases(lay: _Layout, secret: dict[str, str]) -> tuple[str, str]:
    cfg = lay.stack.mlflow
    if cfg.backend_store_uri is not None and cfg.auth_database_uri is not None:
        return cfg.backend_store_uri.get_secret_value(), cfg.auth_database_uri.get_secret_value()
    own = (
        _pg_url("mlflow", secret["mlflow"], lay.pg_port, "mlflow", "psycopg"),
        _pg_url("mlflow", secret["mlflow"], lay.pg_port, "mlflow_auth", "psycopg"),
    )
    backend = cfg.backend_store_uri.get_secret_value() if cfg.backend_store_uri else own[0]
    auth = cfg.auth_database_uri.get_secret_value() if cfg.auth_database_uri else own[1]
    return backend, auth


def _spawn_mlflow(lay: _Layout, secret: dict[str, str]) -> _Proc:
    cfg = lay.stack.mlflow
    password = mlflow_admin_password(lay.registry)
    _check_port_free(cfg.port, "stack.mlflow.port")
    backend, auth_db = _mlflow_databases(lay, secret)
    folder = lay.dir / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    ini = configparser.ConfigParser(interpolation=None)
    ini["mlflow"] = {
        "default_permission": "READ",
        "database_uri": auth_db,
        "admin_username": lay.registry.username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": str(cfg.auth_cache_s),
    }
    text = io.StringIO()
    ini.write(text)
    auth_ini = folder / "basic_auth.ini"
    _write_private(auth_ini, text.getvalue())
    artifacts = cfg.artifacts_destination or str(lay.dir / "mlflow-artifacts")
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(cfg.port),
        "--workers",
        str(cfg.workers),
        "--app-name",
        "basic-auth",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
    ]
    env = _child_env(
        {
            # Through the option's environment variable: a command line is visible to all users.
            "MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            # Read only when the admin user is first created.
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["flask_secret_key"],
            # GenAI job runners: nothing of mlgate's needs them.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    return _spawn(lay.dir, "mlflow", argv, env, cwd=folder)


def _mlflow_check(uri: str, registry: RegistryConfig) -> str:
    """'' when the server answers and accepts the configured user, else why not."""
    base = uri.rstrip("/")
    resp = httpx.get(f"{base}/health", timeout=_CHECK_TIMEOUT_S)
    if resp.status_code != 200:
        return f"/health answered {resp.status_code}"
    if registry.password is None:
        return ""
    resp = httpx.get(
        f"{base}/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=(registry.username, registry.password.get_secret_value()),
        timeout=_CHECK_TIMEOUT_S,
    )
    if resp.status_code in (401, 403):
        return (
            f"the server refuses {registry.username!r} with registry.password "
            f"({resp.status_code}); its admin was created with another password"
        )
    return "" if resp.status_code == 200 else f"search answered {resp.status_code}"


# --- Prefect -------------------------------------------------------------------------------


def _prefect_auth(orchestration: OrchestrationConfig) -> str:
    env = "MLGATE_ORCHESTRATION__AUTH_STRING"
    if orchestration.auth_string is None or not orchestration.auth_string.get_secret_value():
        raise StackError(
            f"orchestration.auth_string is not set: export {env}='user:password' before "
            "starting the Prefect server (its API is refused without it)"
        )
    auth = orchestration.auth_string.get_secret_value()
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise StackError(f"orchestration.auth_string must be 'user:password' ({env})")
    return auth


def _prefect_env(lay: _Layout, auth: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    home = lay.dir / "prefect" / "home"
    home.mkdir(parents=True, exist_ok=True)
    return _child_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": lay.prefect_api_url(),
            "PREFECT_API_AUTH_STRING": auth,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
            **(extra or {}),
        }
    )


def _spawn_prefect(lay: _Layout, secret: dict[str, str]) -> _Proc:
    cfg = lay.stack.prefect
    auth = _prefect_auth(lay.orchestration)
    _check_port_free(cfg.port, "stack.prefect.port")
    database = (
        cfg.database_url.get_secret_value()
        if cfg.database_url
        else _pg_url("prefect", secret["prefect"], lay.pg_port, "prefect", "asyncpg")
    )
    env = _prefect_env(
        lay,
        auth,
        {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database,
            "PREFECT_SERVER_API_AUTH_STRING": auth,
        },
    )
    argv = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(cfg.port),
    ]
    return _spawn(lay.dir, "prefect", argv, env, cwd=lay.dir / "prefect")


def _prefect_get(
    api_url: str, auth: str | None, path: str, json_body: Any = None
) -> httpx.Response:
    user, _, password = (auth or "").partition(":")
    kwargs: dict[str, Any] = {"timeout": _CHECK_TIMEOUT_S}
    if auth:
        kwargs["auth"] = (user, password)
    url = f"{api_url.rstrip('/')}{path}"
    if json_body is None:
        return httpx.get(url, **kwargs)
    return httpx.post(url, json=json_body, **kwargs)


def _prefect_up(api_url: str, auth: str | None) -> bool:
    return _prefect_get(api_url, auth, "/health").status_code == 200


def _prefect_check(api_url: str, auth: str | None) -> str:
    """'' when the server answers and accepts the auth string (its /health needs none)."""
    resp = _prefect_get(api_url, auth, "/health")
    if resp.status_code != 200:
        return f"/health answered {resp.status_code}"
    resp = _prefect_get(api_url, auth, "/admin/version")
    if resp.status_code == 401:
        return "the server refuses orchestration.auth_string (401)"
    return "" if resp.status_code == 200 else f"/admin/version answered {resp.status_code}"


def _worker_name(kind: str, index: int) -> str:
    return f"{socket.gethostname()}-{kind}-{index}"


def _spawn_prefect_worker(lay: _Layout, index: int, auth: str) -> _Proc:
    argv = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        lay.orchestration.work_pool,
        "--type",
        "process",
        "--name",
        _worker_name("prefect", index),
        "--install-policy",
        "never",
    ]
    workdir = lay.dir / "prefect" / f"worker-{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    # Flow runs inherit their worker's environment: this is how they reach the servers
    # started here, the alias lock's DSN included (a secret, never put in a deployment).
    clients = client_settings(lay.stack, lay.registry, lay.orchestration, lay.dask)
    env = _prefect_env(lay, auth, clients)
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(lay.stack.prefect.poll_s)
    return _spawn(lay.dir, f"prefect-worker-{index}", argv, env, cwd=workdir)


def warm_socket_dir(stack: StackConfig, registry: RegistryConfig) -> Path:
    """Where the workers' warm processes listen (flows/warm_start.py), one socket each."""
    return stack_dir(stack, registry) / "prefect" / "warm"


def _spawn_warm_start(lay: _Layout, index: int, auth: str) -> _Proc:
    """The warm process of worker `index`: its environment is the worker's, since its runs
    are the worker's runs."""
    directory = warm_socket_dir(lay.stack, lay.registry)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    sock = directory / f"{_worker_name('prefect', index)}.sock"
    argv = [sys.executable, "-m", "flows.warm_start", str(sock)]
    clients = client_settings(lay.stack, lay.registry, lay.orchestration, lay.dask)
    env = _prefect_env(lay, auth, clients)
    workdir = lay.dir / "prefect" / f"worker-{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    return _spawn(lay.dir, f"prefect-warm-{index}", argv, env, cwd=workdir)


def _warm_listening(lay: _Layout, index: int) -> bool:
    directory = warm_socket_dir(lay.stack, lay.registry)
    return (directory / f"{_worker_name('prefect', index)}.sock").exists()


def _warm_check(lay: _Layout, index: int) -> Callable[[], str]:
    return lambda: "" if _warm_listening(lay, index) else "not listening yet"


def _prefect_workers_online(lay: _Layout, auth: str | None) -> set[str]:
    resp = _prefect_get(
        lay.prefect_api_url(), auth, f"/work_pools/{lay.orchestration.work_pool}/workers/filter", {}
    )
    resp.raise_for_status()
    return {w["name"] for w in resp.json() if w.get("status") == "ONLINE"}


# --- Dask ----------------------------------------------------------------------------------


def _spawn_dask_scheduler(lay: _Layout) -> _Proc:
    cfg = lay.stack.dask
    _check_port_free(cfg.port, "stack.dask.port")
    _check_port_free(cfg.dashboard_port, "stack.dask.dashboard_port")
    argv = [
        sys.executable,
        "-m",
        "dask",
        "scheduler",
        "--host",
        HOST,
        "--port",
        str(cfg.port),
        "--dashboard-address",
        f"{HOST}:{cfg.dashboard_port}",
        "--no-show",
    ]
    folder = lay.dir / "dask"
    folder.mkdir(parents=True, exist_ok=True)
    return _spawn(lay.dir, "dask-scheduler", argv, _child_env({}), cwd=folder)


def _spawn_dask_worker(lay: _Layout, index: int) -> _Proc:
    cfg = lay.stack.dask
    workdir = lay.dir / "dask" / f"worker-{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "dask",
        "worker",
        f"tcp://{HOST}:{cfg.port}",
        "--host",
        HOST,
        "--nthreads",
        str(cfg.nthreads),
        "--nworkers",
        "1",
        "--name",
        _worker_name("dask", index),
        "--no-dashboard",
        "--local-directory",
        str(workdir),
    ]
    return _spawn(lay.dir, f"dask-worker-{index}", argv, _child_env({}), cwd=workdir)


def _dask_identity(lay: _Layout) -> dict[str, Any]:
    url = f"http://{HOST}:{lay.stack.dask.dashboard_port}/json/identity.json"
    resp = httpx.get(url, timeout=_CHECK_TIMEOUT_S)
    resp.raise_for_status()
    return dict(resp.json())


def _dask_workers(lay: _Layout) -> set[str]:
    return {str(w.get("name")) for w in _dask_identity(lay).get("workers", {}).values()}


def _tcp_check(address: str) -> str:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        return f"{address!r} names no host and port"
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=_CHECK_TIMEOUT_S):
            return ""
    except OSError as err:
        return f"no answer: {err}"


# --- the stack -----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    # Others may pass through (PostgreSQL's user must reach its data directory), not list it.
    root.chmod(0o711)
    with FileLock(str(root / "stack.lock"), timeout=600):
        yield


def start_stack(
    stack: StackConfig,
    registry: RegistryConfig,
    orchestration: OrchestrationConfig,
    dask: DaskConfig,
) -> list[PartStatus]:
    """Start every part that should run here and is not running yet, wait until each answers,
    and return the status of all. Parts already running (same pid and start time) are kept.
    The servers start side by side once PostgreSQL is up; workers join their server."""
    lay = _layout(stack, registry, orchestration, dask)
    deadline = time.monotonic() + stack.start_timeout_s
    with _locked(lay.dir):
        procs = {n: p for n, p in _read_state(lay.dir).items() if _alive(p)}
        _write_state(lay.dir, procs)
        secret = _secrets(lay.dir)
        # A bad password or auth string is refused before anything starts.
        if stack.mlflow.start:
            mlflow_admin_password(registry)
        auth = _prefect_auth(orchestration) if stack.prefect.start else ""
        if stack.postgres.start:
            if "postgres" not in procs:
                _start_postgres(lay, secret, procs, deadline)
            _ensure_databases(lay, secret)

        def ensure(name: str, spawn: Callable[[], _Proc]) -> _Proc:
            if name not in procs:
                procs[name] = spawn()
                _write_state(lay.dir, procs)
            return procs[name]

        prefect_workers = {
            f"prefect-worker-{i}": _worker_name("prefect", i)
            for i in range(1, stack.prefect.workers + 1)
        }
        dask_workers = {
            f"dask-worker-{i}": _worker_name("dask", i) for i in range(1, stack.dask.workers + 1)
        }
        if stack.prefect.start:
            prefect = ensure("prefect", lambda: _spawn_prefect(lay, secret))
        if stack.mlflow.start:
            mlflow = ensure("mlflow", lambda: _spawn_mlflow(lay, secret))
        if stack.dask.start:
            scheduler = ensure("dask-scheduler", lambda: _spawn_dask_scheduler(lay))
            # Dask workers wait for their scheduler by themselves.
            for i, name in enumerate(dask_workers, start=1):
                ensure(name, functools.partial(_spawn_dask_worker, lay, i))

        if stack.prefect.start:
            api_url = lay.prefect_api_url()
            _wait_until(
                "the Prefect server", lambda: _prefect_up(api_url, auth), [prefect], deadline
            )
            # A worker creates the process work pool when it is missing (concurrent creators
            # are fine) and fills in its default job template.
            for i, name in enumerate(prefect_workers, start=1):
                if stack.prefect.warm_start:
                    ensure(f"prefect-warm-{i}", functools.partial(_spawn_warm_start, lay, i, auth))
                ensure(name, functools.partial(_spawn_prefect_worker, lay, i, auth))
        if stack.mlflow.start:
            uri = f"http://{HOST}:{stack.mlflow.port}"
            _wait_until(
                "the MLflow tracking server", lambda: _http_ok(f"{uri}/health"), [mlflow], deadline
            )
        if stack.dask.start:
            _wait_until(
                f"the Dask scheduler and {len(dask_workers)} workers",
                lambda: set(dask_workers.values()) <= _dask_workers(lay),
                [scheduler, *(procs[n] for n in dask_workers)],
                deadline,
            )
        if stack.prefect.start and prefect_workers:
            _wait_until(
                f"{len(prefect_workers)} Prefect workers polling {orchestration.work_pool!r}",
                lambda: set(prefect_workers.values()) <= _prefect_workers_online(lay, auth),
                [procs[n] for n in prefect_workers],
                deadline,
            )
        if stack.prefect.start and stack.prefect.warm_start:
            warm = range(1, stack.prefect.workers + 1)
            _wait_until(
                f"{len(warm)} warm processes importing mlgate's flows",
                lambda: all(_warm_listening(lay, i) for i in warm),
                [procs[f"prefect-warm-{i}"] for i in warm],
                deadline,
            )
    return stack_status(stack, registry, orchestration, dask)


def stack_status(
    stack: StackConfig,
    registry: RegistryConfig,
    orchestration: OrchestrationConfig,
    dask: DaskConfig,
) -> list[PartStatus]:
    """Each part: where it is, its pid when it runs here, and whether it answers."""
    lay = _layout(stack, registry, orchestration, dask)
    procs = _read_state(lay.dir)
    out: list[PartStatus] = []

    def part(name: str, address: str, expected: bool, managed: bool, check: _Check) -> None:
        proc = procs.get(name)
        if managed and not _alive(proc):
            why = "not running" if proc is None else f"pid {proc.pid} is gone (log: {proc.log})"
            out.append(PartStatus(name, address, expected, managed, None, False, why))
            return
        if not expected:
            out.append(PartStatus(name, address, False, False, None, False, "off"))
            return
        try:
            problem = check()
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        pid = proc.pid if managed and proc else None
        out.append(PartStatus(name, address, expected, managed, pid, not problem, problem or "ok"))

    if stack.postgres.start:
        # Read, never created here: before the first `up` PostgreSQL is simply not running.
        known = lay.dir / SECRETS_FILE
        password = json.loads(known.read_text())["postgres"] if known.exists() else ""
        admin = _pg_url("postgres", password, stack.postgres.port, "postgres")
        part("postgres", f"{HOST}:{stack.postgres.port}", True, True, lambda: _pg_check(admin))
    else:
        dsn = registry.lock_dsn.get_secret_value() if registry.lock_dsn else ""
        address = _dsn_address(dsn) if dsn else "-"
        part("postgres", address, bool(dsn), False, lambda: _pg_check(dsn))

    mlflow_uri = (
        f"http://{HOST}:{stack.mlflow.port}" if stack.mlflow.start else registry.tracking_uri or ""
    )
    mlflow_expected = stack.mlflow.start or mlflow_uri.startswith(("http://", "https://"))
    part(
        "mlflow",
        mlflow_uri or "-",
        mlflow_expected,
        stack.mlflow.start,
        lambda: _mlflow_check(mlflow_uri, registry),
    )

    auth = orchestration.auth_string.get_secret_value() if orchestration.auth_string else None
    api_url = lay.prefect_api_url() if stack.prefect.start else orchestration.api_url or ""
    part(
        "prefect",
        api_url or "-",
        bool(api_url),
        stack.prefect.start,
        lambda: _prefect_check(api_url, auth),
    )
    if stack.prefect.start:
        online = _Once(lambda: _prefect_workers_online(lay, auth))
        for i in range(1, stack.prefect.workers + 1):
            wname = _worker_name("prefect", i)
            absent = f"not ONLINE in work pool {orchestration.work_pool!r}"
            part(f"prefect-worker-{i}", wname, True, True, online.check_has(wname, absent))
            if stack.prefect.warm_start:
                part(f"prefect-warm-{i}", wname, True, True, _warm_check(lay, i))

    if stack.dask.start:
        address = f"tcp://{HOST}:{stack.dask.port}"
        part("dask-scheduler", address, True, True, lambda: "" if _dask_identity(lay) else "no")
        connected = _Once(lambda: _dask_workers(lay))
        for i in range(1, stack.dask.workers + 1):
            wname = _worker_name("dask", i)
            absent = "not connected to the scheduler"
            part(f"dask-worker-{i}", wname, True, True, connected.check_has(wname, absent))
    else:
        address = dask.scheduler_address or ""
        part("dask-scheduler", address or "-", bool(address), False, lambda: _tcp_check(address))
    return out


_Check = Callable[[], str]


class _Once:
    """One server answer (which workers it knows) shared by the checks of all its workers."""

    def __init__(self, fetch: Callable[[], set[str]]):
        self._fetch = fetch
        self._names: set[str] | None = None

    def check_has(self, name: str, absent: str) -> _Check:
        def check() -> str:
            if self._names is None:
                self._names = self._fetch()
            return "" if name in self._names else absent

        return check


def _pg_check(dsn: str) -> str:
    return "" if _pg_ready(dsn) else "no answer"


def _dsn_address(dsn: str) -> str:
    """host:port/database of a DSN, without its credentials."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable DSN)"
    return f"{info.get('host', '?')}:{info.get('port', 5432)}/{info.get('dbname', '?')}"


# Stop order is the reverse of start; PostgreSQL last. SIGINT is its fast shutdown (SIGTERM
# would wait for every client, other hosts' included, to disconnect).
_STOP_SIGNALS = {"postgres": signal.SIGINT}


def stop_stack(stack: StackConfig, registry: RegistryConfig) -> list[str]:
    """Stop every process the stack recorded; returns the names of those that were running."""
    root = stack_dir(stack, registry)
    if not (root / STATE_FILE).exists():
        return []
    stopped: list[str] = []
    with _locked(root):
        procs = _read_state(root)
        for name in sorted(procs, key=_stop_rank):
            proc = procs[name]
            if _alive(proc):
                stopped.append(name)
                # PostgreSQL's postmaster stops its backends itself; signalling them would
                # cancel their queries instead.
                _stop(proc, _STOP_SIGNALS.get(name, signal.SIGTERM), group=name != "postgres")
            del procs[name]
            _write_state(root, procs)
    return stopped


def _stop_rank(name: str) -> int:
    order = [
        "prefect-worker",
        "prefect-warm",
        "dask-worker",
        "prefect",
        "mlflow",
        "dask-scheduler",
        "postgres",
    ]
    return next(i for i, prefix in enumerate(order) if name.startswith(prefix))
