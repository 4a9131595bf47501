"""The local canary target: HAProxy on the public port, one backend, two servers.

`stable` and `canary` are the two BentoML instances. Traffic moves between them only
through HAProxy's runtime API on its admin socket (`set weight`, `set server ... addr`), so a
change never reloads the proxy and never drops a client connection. Its per-server
statistics (`show stat`) are what clients saw, a canary that crashed included.

HAProxy runs in the foreground (`-db`) in a session of its own, its output appended to a
log file rather than a pipe: it outlives the controller that started it, and a restarted
controller adopts it by pid.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.processes import pid_alive, signal_and_wait

BACKEND = "model"
FRONTEND = "public"
SERVERS = ("stable", "canary")
VARIANT_HEADER = "X-Mlgate-Variant"
DEFAULT_BINARY = "haproxy"
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
# A server with no instance behind it yet points here, in maintenance, never checked.
_PARKED_PORT = 9
_ERROR_MARKERS = ("unknown", "no such", "require", "invalid", "not found", "cannot", "error")


class HAProxyError(RuntimeError):
    """HAProxy would not start, or its admin socket refused or failed a command."""


@dataclass(frozen=True)
class ServerStats:
    """One server's line of `show stat`: cumulative counters since HAProxy started."""

    name: str
    status: str
    weight: int
    current_sessions: int
    responses: dict[str, int]
    connection_errors: int
    response_errors: int
    selected: int

    @property
    def responses_total(self) -> int:
        return sum(self.responses.values())

    @property
    def server_errors(self) -> int:
        return self.responses.get("5xx", 0)


def counts_between(before: ServerStats, after: ServerStats) -> dict[str, int]:
    """What one server did between two reads of its cumulative counters (a negative count
    means HAProxy restarted in between)."""
    return {
        "responses": after.responses_total - before.responses_total,
        **{
            status: after.responses.get(status, 0) - before.responses.get(status, 0)
            for status in ("2xx", "4xx", "5xx")
        },
        "connection_errors": after.connection_errors - before.connection_errors,
        "response_errors": after.response_errors - before.response_errors,
        "selected": after.selected - before.selected,
    }


def find_haproxy() -> str:
    """The haproxy binary: on PATH, else Debian's /usr/sbin (not on a user's PATH)."""
    found = shutil.which(DEFAULT_BINARY) or shutil.which(f"/usr/sbin/{DEFAULT_BINARY}")
    if not found:
        raise HAProxyError(
            "haproxy is not installed; on Debian or Ubuntu: apt-get install -y haproxy"
        )
    return found


def socket_path_for(directory: Path) -> Path:
    """`<directory>/haproxy.sock`, or a short path under the temp directory when that one is
    too long for a unix socket (deep project paths are common)."""
    wanted = Path(directory).resolve() / "haproxy.sock"
    if len(str(wanted)) <= _MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mlgate-{digest}.sock"


def render_config(
    *,
    host: str,
    public_port: int,
    socket_path: Path,
    stable_port: int | None,
    stable_weight: int,
    canary_port: int | None,
    canary_weight: int,
    check_interval_ms: int = 1000,
    server_timeout_s: float = 30.0,
) -> str:
    """The whole configuration. A server whose port is None is parked in maintenance.

    - `balance random(1)`: each request goes to one server drawn by weight, and a runtime
      weight change applies to the next request. Round-robin keeps a position per server,
      and after a change one server can take nearly all requests for a second or more
      until the positions even out (measured here: 6 of 141 requests to the stable just
      after 75/25 became 50/50); `static-rr` ignores runtime changes. The draw is over
      HAProxy's consistent-hash ring, so a share is within a couple of points of its
      weight (4,000 requests measured: 4.1 % at 5, 27.5 % at 25, 52.5 % at 50).
    - `option http-server-close`: each request opens its own connection to the instance,
      so stopping a drained instance can never break a pooled idle connection that HAProxy
      was about to reuse; clients keep their keep-alive connections to HAProxy.
    - `retries` with `option redispatch`: a connection refused by a crashed instance is
      retried on the other server. The refusal still counts in that server's `wredis` (or
      `wretr`, `econ`), so the guardrails see it although the client does not. Responses
      are never retried: a 5xx from the canary reaches the client and its statistics alike.
    """
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        raise HAProxyError(f"admin socket path {socket_path} is too long for a unix socket")

    def server(name: str, port: int | None, weight: int) -> str:
        where = f"127.0.0.1:{port}" if port is not None else f"127.0.0.1:{_PARKED_PORT}"
        parked = " disabled" if port is None else ""
        return f"    server {name} {where} weight {int(weight)} check{parked}"

    return "\n".join(
        [
            "global",
            # Only abnormal transactions reach the log (its file), with HAProxy's
            # termination flags saying where each one ended.
            "    log stdout format raw local0",
            f"    stats socket {socket_path} mode 600 level admin",
            # A second HAProxy (one whose controller died before recording it) must fail
            # to bind the public port rather than silently share it.
            "    noreuseport",
            "    stats timeout 30s",
            "    maxconn 2000",
            "",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    option dontlog-normal",
            "    timeout connect 2s",
            "    timeout client 60s",
            f"    timeout server {int(server_timeout_s * 1000)}ms",
            "    timeout http-keep-alive 30s",
            "    timeout queue 10s",
            "    retries 2",
            "    option redispatch 1",
            "    option http-server-close",
            # The instances count failed authentications per client address, and treat a
            # request without this header from loopback as one of this host's own.
            "    option forwardfor",
            "",
            f"frontend {FRONTEND}",
            f"    bind {host}:{public_port}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            "    balance random(1)",
            "    option httpchk GET /readyz",
            "    http-check expect status 200",
            f"    default-server inter {check_interval_ms}ms fall 2 rise 1",
            # Which variant answered: clients and load tests attribute failures with it.
            f"    http-response set-header {VARIANT_HEADER} %s",
            server("stable", stable_port, stable_weight),
            server("canary", canary_port, canary_weight),
            "",
        ]
    )


def admin_command(
    socket_path: Path, command: str, timeout: float = 5.0, *, check: bool = False
) -> str:
    """One command (or several joined by `;`) on the admin socket; HAProxy answers and
    closes. With `check`, a reply in which HAProxy reports an error in words (unknown
    server, bad weight) raises; a successful `set` answers nothing or a confirmation."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as err:
        raise HAProxyError(f"HAProxy admin socket {socket_path}: {command!r}: {err}") from None
    reply = b"".join(chunks).decode("utf-8", "replace")
    lowered = reply.lower()
    if check and any(marker in lowered for marker in _ERROR_MARKERS):
        raise HAProxyError(f"HAProxy refused {command!r}: {reply.strip()}")
    return reply


def parse_stat_csv(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """`show stat` CSV (header line starting `# `) keyed by (proxy, server)."""
    lines = text.lstrip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected `show stat` output: {text[:200]!r}")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    return {(row["pxname"], row["svname"]): row for row in reader if row.get("pxname")}


def _int(row: dict[str, str], key: str) -> int:
    value = row.get(key, "") or "0"
    return int(value) if value.lstrip("-").isdigit() else 0


def server_stats(socket_path: Path) -> dict[str, ServerStats]:
    """Per-server counters of the backend, keyed by server name."""
    rows = parse_stat_csv(admin_command(socket_path, "show stat"))
    out = {}
    for (proxy, name), row in rows.items():
        if proxy != BACKEND or name in ("FRONTEND", "BACKEND"):
            continue
        out[name] = ServerStats(
            name=name,
            status=row.get("status", ""),
            weight=_int(row, "weight"),
            current_sessions=_int(row, "scur"),
            responses={k: _int(row, f"hrsp_{k}") for k in ("1xx", "2xx", "3xx", "4xx", "5xx")}
            | {"other": _int(row, "hrsp_other")},
            # Refused or failed connections: `econ` once retries are exhausted, `wretr` for
            # a retry on the same server, `wredis` for a request redispatched to the other
            # one (with two servers and `redispatch 1`, where a refusal usually shows).
            connection_errors=_int(row, "econ") + _int(row, "wretr") + _int(row, "wredis"),
            response_errors=_int(row, "eresp"),
            selected=_int(row, "lbtot"),
        )
    missing = [s for s in SERVERS if s not in out]
    if missing:
        raise HAProxyError(f"HAProxy's backend {BACKEND!r} lacks server(s) {missing}")
    return out


def set_weights(socket_path: Path, weights: dict[str, int]) -> None:
    """Weights of several servers in one admin command. Raised weights are applied first,
    so that no instant exists where every server is at 0 (HAProxy would answer 503)."""
    ordered = sorted(weights.items(), key=lambda kv: -kv[1])
    for _, weight in ordered:
        if not 0 <= int(weight) <= 256:
            raise HAProxyError(f"HAProxy weights are 0..256, got {weight}")
    command = "; ".join(f"set weight {BACKEND}/{name} {int(w)}" for name, w in ordered)
    admin_command(socket_path, command, check=True)


def point_server(socket_path: Path, server: str, port: int, weight: int) -> None:
    """Send `server`'s traffic to 127.0.0.1:`port` at `weight` and take it out of
    maintenance; the health check decides when it is UP (a server out of maintenance gets
    no request before a check passes)."""
    if not 0 <= int(weight) <= 256:
        raise HAProxyError(f"HAProxy weights are 0..256, got {weight}")
    name = f"{BACKEND}/{server}"
    if server_stats(socket_path)[server].status.startswith("MAINT"):
        # HAProxy takes a server leaving maintenance as UP until its first check fails, so
        # a warming instance would get requests for up to a check interval: it leaves at
        # weight 0, is marked DOWN, and only then gets its weight; the next passing check
        # (`rise 1`) makes it UP.
        admin_command(
            socket_path,
            f"set weight {name} 0; set server {name} addr 127.0.0.1 port {int(port)}; "
            f"set server {name} state ready; set server {name} health down; "
            f"set weight {name} {int(weight)}",
            check=True,
        )
        return
    admin_command(
        socket_path,
        f"set server {name} addr 127.0.0.1 port {int(port)}; "
        f"set weight {name} {int(weight)}; "
        f"set server {name} state ready",
        check=True,
    )


def park_server(socket_path: Path, server: str) -> None:
    """Weight 0 and maintenance: no new request, no health check."""
    admin_command(
        socket_path,
        f"set weight {BACKEND}/{server} 0; set server {BACKEND}/{server} state maint",
        check=True,
    )


def wait_server_status(
    socket_path: Path, server: str, wanted: str = "UP", timeout: float = 30.0
) -> ServerStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = server_stats(socket_path)[server]
        if stats.status.startswith(wanted):
            return stats
        if time.monotonic() > deadline:
            raise HAProxyError(
                f"server {server} is {stats.status}, not {wanted}, after {timeout:.0f} s"
            )
        time.sleep(0.2)


def wait_drained(socket_path: Path, server: str, timeout: float = 30.0) -> bool:
    """Wait until the server has no request in flight; False when `timeout` passed first."""
    deadline = time.monotonic() + timeout
    while server_stats(socket_path)[server].current_sessions > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def check_config(binary: str, config_path: Path) -> None:
    out = subprocess.run(
        [binary, "-c", "-q", "-f", str(config_path)], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise HAProxyError(
            f"HAProxy rejected {config_path}: {(out.stderr or out.stdout).strip()[-2000:]}"
        )


def start_haproxy(
    config_path: Path,
    socket_path: Path,
    log_path: Path,
    timeout: float = 15.0,
    on_spawn: Callable[[int], None] | None = None,
) -> int:
    """Validate the configuration, start HAProxy in the foreground of a new session and
    wait until its admin socket answers. Returns its pid; `on_spawn(pid)` is called as soon
    as the process exists, so that the caller can record it before waiting."""
    binary = find_haproxy()
    check_config(binary, config_path)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [binary, "-db", "-f", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if on_spawn is not None:
        try:
            on_spawn(process.pid)
        except BaseException:
            # Unrecorded, it would hold the public port for good (noreuseport).
            process.kill()
            process.wait(timeout=5)
            raise
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise HAProxyError(f"HAProxy exited with status {process.returncode}: {tail}")
        try:
            admin_command(socket_path, "show info", timeout=1.0)
            return process.pid
        except HAProxyError:
            if time.monotonic() > deadline:
                process.kill()
                raise HAProxyError(
                    f"HAProxy's admin socket {socket_path} did not answer in {timeout:.0f} s"
                ) from None
            time.sleep(0.1)


def stop_haproxy(pid: int, timeout: float = 10.0, start_time: int | None = None) -> None:
    """SIGUSR1 is HAProxy's soft stop: it stops listening and finishes what is in flight.
    With `start_time`, only the process recorded at launch (pids are reused)."""
    signal_and_wait(pid, signal.SIGUSR1, timeout=timeout, start_time=start_time)


def haproxy_alive(pid: int | None, socket_path: Path) -> bool:
    """The pid is a live process and the admin socket answers."""
    if pid is None or not pid_alive(pid):
        return False
    try:
        admin_command(socket_path, "show info", timeout=1.0)
    except HAProxyError:
        return False
    return True


def write_config(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
