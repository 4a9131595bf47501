"""The canary target's proxy, for real: HAProxy (the Debian package) on 127.0.0.1 in front
of two tiny HTTP backends standing in for the stable and canary instances. Its config is
rendered and checked, traffic moves only through the admin socket (weights, pointing and
parking servers, never a reload), its per-server counters say who answered what, and a
stop reaches only the process that was recorded."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from services import haproxy
from services.processes import pid_alive, process_start_time
from tests.services.conftest import free_port

pytestmark = pytest.mark.integration

haproxy.find_haproxy()  # `make install` installs it; without it this module errors

CHECK_MS = 200


class _Backend(BaseHTTPRequestHandler):
    """`/readyz` and `/` answer 200 with the backend's name, `/fail` answers 500."""

    name = "?"

    def do_GET(self) -> None:
        status = 500 if self.path == "/fail" else 200
        body = self.name.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, int]]:
    servers = {}
    for name in haproxy.SERVERS:
        handler = type(f"{name.title()}Backend", (_Backend,), {"name": name})
        servers[name] = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=servers[name].serve_forever, daemon=True).start()
    yield {name: int(s.server_address[1]) for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@dataclass(frozen=True)
class Proxy:
    pid: int
    start_time: int
    socket: Path
    port: int
    config: Path
    log: Path

    def get(self, client: httpx.Client, path: str = "/") -> tuple[str, int]:
        """Which server answered, and with what status."""
        response = client.get(f"http://127.0.0.1:{self.port}{path}")
        return response.headers.get(haproxy.VARIANT_HEADER, "?"), response.status_code

    def answers(self, n: int, path: str = "/") -> Counter[tuple[str, int]]:
        with httpx.Client(timeout=5.0) as client:
            return Counter(self.get(client, path) for _ in range(n))


def render(
    tmp_path: Path, backends: dict[str, int], public_port: int, *, canary: bool = False
) -> tuple[Path, Path]:
    sock = haproxy.socket_path_for(tmp_path)
    text = haproxy.render_config(
        host="127.0.0.1",
        public_port=public_port,
        socket_path=sock,
        stable_port=backends["stable"],
        stable_weight=100,
        canary_port=backends["canary"] if canary else None,
        canary_weight=0,
        check_interval_ms=CHECK_MS,
    )
    config = tmp_path / "haproxy.cfg"
    haproxy.write_config(config, text)
    return config, sock


@pytest.fixture
def proxy(tmp_path: Path, backends: dict[str, int]) -> Iterator[Proxy]:
    """HAProxy with the stable at full weight and the canary parked, as a fresh target."""
    port = free_port()
    config, sock = render(tmp_path, backends, port)
    log = tmp_path / "haproxy.log"
    spawned: list[int] = []
    pid = haproxy.start_haproxy(config, sock, log, on_spawn=spawned.append)
    # Recorded at once: a stop with it can never reach another process given the same pid.
    started = process_start_time(pid)
    assert spawned == [pid] and started is not None
    try:
        haproxy.wait_server_status(sock, "stable", "UP", timeout=10)
        yield Proxy(pid, started, sock, port, config, log)
    finally:
        haproxy.stop_haproxy(pid, timeout=5, start_time=started)


def test_the_rendered_config_passes_haproxys_own_check(
    tmp_path: Path, backends: dict[str, int]
) -> None:
    binary = haproxy.find_haproxy()
    for canary in (False, True):
        config, _ = render(tmp_path, backends, free_port(), canary=canary)
        haproxy.check_config(binary, config)
        text = config.read_text()
        assert "balance random(1)" in text and "noreuseport" in text
        parked = [line.strip() for line in text.splitlines() if line.endswith(" disabled")]
        if canary:
            assert parked == []
        else:
            assert len(parked) == 1 and parked[0].startswith("server canary 127.0.0.1:9 weight 0")
    config.write_text(config.read_text().replace("balance random(1)", "balance nonsense"))
    with pytest.raises(haproxy.HAProxyError, match="rejected"):
        haproxy.check_config(binary, config)
    with pytest.raises(haproxy.HAProxyError, match="too long"):
        haproxy.render_config(
            host="127.0.0.1",
            public_port=1,
            socket_path=Path("/" + "d" * 120) / "haproxy.sock",
            stable_port=None,
            stable_weight=100,
            canary_port=None,
            canary_weight=0,
        )


def test_a_deep_directory_gets_a_short_socket_path(tmp_path: Path) -> None:
    assert haproxy.socket_path_for(tmp_path) == tmp_path.resolve() / "haproxy.sock"
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = haproxy.socket_path_for(deep)
    assert len(str(path)) <= 107 and path.name.startswith("mlgate-")
    assert path == haproxy.socket_path_for(deep)  # the same directory, the same socket


def test_a_fresh_target_serves_the_stable_with_the_canary_parked(proxy: Proxy) -> None:
    assert pid_alive(proxy.pid) and haproxy.haproxy_alive(proxy.pid, proxy.socket)
    stats = haproxy.server_stats(proxy.socket)
    assert set(stats) == set(haproxy.SERVERS)
    assert (stats["stable"].weight, stats["canary"].weight) == (100, 0)
    assert stats["canary"].status.startswith("MAINT")
    assert proxy.answers(20) == {("stable", 200): 20}


def test_weights_move_traffic_over_the_admin_socket_without_a_reload(
    proxy: Proxy, backends: dict[str, int]
) -> None:
    haproxy.point_server(proxy.socket, "canary", backends["canary"], 0)
    haproxy.wait_server_status(proxy.socket, "canary", "UP", timeout=10)
    assert proxy.answers(10) == {("stable", 200): 10}

    haproxy.set_weights(proxy.socket, {"stable": 0, "canary": 100})
    assert proxy.answers(10) == {("canary", 200): 10}
    haproxy.set_weights(proxy.socket, {"stable": 50, "canary": 50})
    split = proxy.answers(60)
    assert split[("stable", 200)] > 0 and split[("canary", 200)] > 0
    assert sum(split.values()) == 60
    stats = haproxy.server_stats(proxy.socket)
    assert (stats["stable"].weight, stats["canary"].weight) == (50, 50)
    # The same process all along: no reload.
    assert haproxy.haproxy_alive(proxy.pid, proxy.socket)

    with pytest.raises(haproxy.HAProxyError, match=r"0\.\.256"):
        haproxy.set_weights(proxy.socket, {"stable": 300, "canary": 0})
    with pytest.raises(haproxy.HAProxyError, match="refused"):
        haproxy.set_weights(proxy.socket, {"nobody": 10})


def test_counts_between_two_reads_are_what_each_server_answered(proxy: Proxy) -> None:
    before = haproxy.server_stats(proxy.socket)
    assert proxy.answers(10) == {("stable", 200): 10}
    assert proxy.answers(3, "/fail") == {("stable", 500): 3}
    after = haproxy.server_stats(proxy.socket)

    stable = haproxy.counts_between(before["stable"], after["stable"])
    assert (stable["responses"], stable["2xx"], stable["5xx"]) == (13, 10, 3)
    assert stable["selected"] == 13
    assert stable["connection_errors"] == stable["response_errors"] == 0
    assert set(haproxy.counts_between(before["canary"], after["canary"]).values()) == {0}
    assert after["stable"].server_errors - before["stable"].server_errors == 3
    assert after["stable"].responses_total - before["stable"].responses_total == 13


def test_a_parked_server_takes_no_traffic(proxy: Proxy, backends: dict[str, int]) -> None:
    haproxy.point_server(proxy.socket, "canary", backends["canary"], 100)
    haproxy.wait_server_status(proxy.socket, "canary", "UP", timeout=10)
    haproxy.set_weights(proxy.socket, {"stable": 0})
    assert proxy.answers(5) == {("canary", 200): 5}

    haproxy.set_weights(proxy.socket, {"stable": 100})
    haproxy.park_server(proxy.socket, "canary")
    canary = haproxy.server_stats(proxy.socket)["canary"]
    assert canary.status.startswith("MAINT") and canary.weight == 0
    assert haproxy.wait_drained(proxy.socket, "canary", timeout=5)
    assert proxy.answers(10) == {("stable", 200): 10}
    with pytest.raises(haproxy.HAProxyError, match=r"0\.\.256"):
        haproxy.point_server(proxy.socket, "canary", backends["canary"], 1000)


def test_a_second_haproxy_cannot_share_the_public_port(proxy: Proxy, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    sock = haproxy.socket_path_for(other)
    config = other / "haproxy.cfg"
    haproxy.write_config(config, proxy.config.read_text().replace(str(proxy.socket), str(sock)))
    with pytest.raises(haproxy.HAProxyError, match="exited"):
        haproxy.start_haproxy(config, sock, other / "haproxy.log", timeout=10)
    assert proxy.answers(3) == {("stable", 200): 3}


def test_a_stop_reaches_only_the_recorded_process(proxy: Proxy) -> None:
    assert process_start_time(proxy.pid) == proxy.start_time
    # A reused pid (another start time) is left alone.
    haproxy.stop_haproxy(proxy.pid, timeout=5, start_time=proxy.start_time + 1)
    assert haproxy.haproxy_alive(proxy.pid, proxy.socket)

    haproxy.stop_haproxy(proxy.pid, timeout=5, start_time=proxy.start_time)
    assert not pid_alive(proxy.pid)
    assert not haproxy.haproxy_alive(proxy.pid, proxy.socket)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{proxy.port}/", timeout=2.0)
