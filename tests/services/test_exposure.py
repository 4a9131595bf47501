"""What a real service shows to whom, and how it treats slow and guessing clients: the
operator endpoints need a key except for this host's own unproxied processes, the API page
loads nothing from another origin, failed authentications are limited per address (also
behind the canary's real HAProxy), and connections that are slow to send their headers, or
idle, are cut.

One `bentoml serve` with tight limits set through the config's environment overrides. The
remote client of a proxy is played by sending X-Forwarded-For from loopback (loopback is a
trusted proxy by default), and once through a real HAProxy."""

from __future__ import annotations

import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.config import env_override_name
from models.model_ref import ModelRef
from models.registry_layout import CHAMPION_ALIAS
from services import haproxy
from services.launcher import ServiceProcess, start_service
from tests.services.conftest import AUTH, Registry, free_port

pytestmark = pytest.mark.integration

FAILED_AUTH_BURST = 5
HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
REQUEST_TIMEOUT_S = 3.0
# Each test plays its outside clients from addresses of its own: failures are counted per
# address, and this one has a burst of FAILED_AUTH_BURST for the whole module.
REMOTE = {"X-Forwarded-For": "203.0.113.10"}


@pytest.fixture(scope="module")
def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    overrides = {
        "docs_page": "true",
        "failed_auth_burst": str(FAILED_AUTH_BURST),
        "failed_auth_per_s": "0.01",
        "header_timeout_s": str(HEADER_TIMEOUT_S),
        "keep_alive_s": str(KEEP_ALIVE_S),
        "request_timeout_s": str(REQUEST_TIMEOUT_S),
    }
    env = {env_override_name("serving", k): v for k, v in overrides.items()}
    env["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml_home"))
    with start_service(
        registry.config_path,
        ModelRef(registry.model_name, alias=CHAMPION_ALIAS),
        port=free_port(),
        env=env,
    ) as proc:
        proc.wait_ready(timeout=300.0)
        yield proc


def row(registry: Registry) -> dict[str, object]:
    record = registry.holdout[list(registry.cfg.dataset.features)].iloc[0].to_dict()
    return {k: (None if v != v else v) for k, v in record.items()}


def test_probes_answer_everyone_and_operator_endpoints_need_a_key_from_outside(
    server: ServiceProcess,
) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        for probe in ("/livez", "/healthz", "/readyz"):
            assert client.get(probe, headers=REMOTE).status_code == 200, probe
        for path in ("/metrics", "/model", "/docs.json"):
            # This host's own process, unproxied (the canary controller, a local Prometheus).
            assert client.get(path).status_code == 200, path
            # Anyone else: a key, as for /predict.
            refused = client.get(path, headers=REMOTE)
            assert refused.status_code == 401, (path, refused.text)
            assert "Authorization" in refused.json()["error"]
            assert client.get(path, headers={**REMOTE, **AUTH}).status_code == 200, path
        wrong = client.get("/metrics", headers={**REMOTE, "Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "unknown API key" in wrong.text


def test_the_api_page_loads_nothing_from_another_origin(server: ServiceProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "googletagmanager" not in page.text
        links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert links and all(link.startswith("./static_content/") for link in links), links
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        for link in links:
            assert client.get(link.removeprefix(".")).status_code == 200, link
        # The page is an operator endpoint too: from outside, a key.
        outside = {"X-Forwarded-For": "203.0.113.11"}
        assert client.get("/", headers=outside).status_code == 401
        assert client.get("/static_content/swagger-ui.css", headers=outside).status_code == 401


def test_failed_authentications_are_limited_per_client_address(
    registry: Registry, server: ServiceProcess
) -> None:
    guesser = {"X-Forwarded-For": "203.0.113.77"}
    body = {"rows": [row(registry)]}
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        statuses = Counter(
            client.post(
                "/predict", json=body, headers={**guesser, "Authorization": f"Bearer guess-{i}"}
            ).status_code
            for i in range(300)
        )
        assert statuses == Counter({403: FAILED_AUTH_BURST, 429: 300 - FAILED_AUTH_BURST})
        limited = client.post("/predict", json=body, headers={**guesser, **AUTH})
        assert limited.status_code == 429
        assert "203.0.113.77" in limited.json()["error"] and "retry-after" in limited.headers
        # Another address, and this host's own processes, are not held back.
        other = {"X-Forwarded-For": "203.0.113.78"}
        assert client.post("/predict", json=body, headers={**other, **AUTH}).status_code == 200
        for _ in range(2 * FAILED_AUTH_BURST):
            bad = client.post("/predict", json=body, headers={"Authorization": "Bearer x"})
            assert bad.status_code == 403
        assert client.post("/predict", json=body, headers=AUTH).status_code == 200


def test_through_the_canarys_haproxy_the_client_is_remote(
    registry: Registry, server: ServiceProcess, tmp_path: Path
) -> None:
    """HAProxy (on loopback, a trusted proxy) adds X-Forwarded-For: the instance sees a
    proxied client that needs a key for /metrics and whose failed tries are counted."""
    port = free_port()
    sock = haproxy.socket_path_for(tmp_path)
    config = tmp_path / "haproxy.cfg"
    haproxy.write_config(
        config,
        haproxy.render_config(
            host="127.0.0.1",
            public_port=port,
            socket_path=sock,
            stable_port=server.port,
            stable_weight=100,
            canary_port=None,
            canary_weight=0,
            check_interval_ms=200,
        ),
    )
    pid = haproxy.start_haproxy(config, sock, tmp_path / "haproxy.log")
    try:
        haproxy.wait_server_status(sock, "stable", "UP", timeout=10)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers=AUTH).status_code == 200
            body = {"rows": [row(registry)]}
            # 127.0.0.1 through the proxy is an address of its own; the keyless /metrics
            # above was its first failure.
            statuses = [
                client.post("/predict", json=body, headers={"Authorization": "Bearer g"})
                for _ in range(FAILED_AUTH_BURST)
            ]
            assert [r.status_code for r in statuses] == [403] * (FAILED_AUTH_BURST - 1) + [429]
    finally:
        haproxy.stop_haproxy(pid, timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within `seconds`, what it sent)."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def connect(server: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5.0)


def test_a_connection_that_sends_nothing_is_closed(server: ServiceProcess) -> None:
    with connect(server) as sock:
        closed, received = closed_within(sock, HEADER_TIMEOUT_S + 4.0)
    assert closed and received == b""


def test_headers_a_byte_at_a_time_get_a_408_at_the_deadline(server: ServiceProcess) -> None:
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()
    with connect(server) as sock:
        sock.settimeout(0.2)
        received = b""
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            try:
                chunk = sock.recv(4096)
                if not chunk:
                    closed = True
                    break
                received += chunk
            except TimeoutError:
                pass
            if time.monotonic() - started > HEADER_TIMEOUT_S + 5.0:
                break
    # Bytes kept arriving every 0.2 s; the deadline held anyway.
    assert closed, "a client trickling its headers was never cut"
    assert received.startswith(b"HTTP/1.1 408"), received[:80]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5.0


def test_an_idle_keep_alive_connection_is_closed_and_a_normal_client_is_served(
    server: ServiceProcess,
) -> None:
    silent = [connect(server) for _ in range(200)]
    try:
        with connect(server) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5.0)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            closed, _ = closed_within(sock, KEEP_ALIVE_S + 4.0)
            assert closed, "an idle keep-alive connection was never closed"
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            assert client.get("/livez").status_code == 200
        time.sleep(HEADER_TIMEOUT_S)
        assert all(closed_within(s, 3.0)[0] for s in silent)
    finally:
        for s in silent:
            s.close()


def test_a_body_that_never_finishes_is_cut_at_the_request_timeout(
    server: ServiceProcess,
) -> None:
    token = AUTH["Authorization"].encode()
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + token + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(head + b'{"rows": [')
        closed, received = closed_within(sock, REQUEST_TIMEOUT_S + 5.0)
    assert received.startswith(b"HTTP/1.1 504"), received[:80]
    assert closed and time.monotonic() - started < REQUEST_TIMEOUT_S + 5.0
