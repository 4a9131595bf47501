"""Warm-up before traffic, through a real HAProxy (the Debian package): a new instance put
behind the proxy while it still warms up gets no request until its `/readyz` answers 200.

The instance is a tiny HTTP server standing in for a service whose warm-up is slow (a real
`bentoml serve` warms up in well under a health-check interval, too fast to observe): its
`/readyz` answers 503, as the service's does until `ModelRuntime.warm_up` has passed and
`mark_ready` ran (services/app.py, services/service.py), and 200 once the test says so."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from services import haproxy
from services.processes import process_start_time
from tests.services.conftest import free_port

pytestmark = pytest.mark.integration

haproxy.find_haproxy()  # `make install` installs it; without it this module errors

# Long enough that a server HAProxy took for UP before its first check (as it does with one
# leaving maintenance) would be sent requests every run, not once in a while.
CHECK_MS = 400


class _Instance(BaseHTTPRequestHandler):
    name = "?"
    ready: threading.Event
    seen: Counter[str]

    def do_GET(self) -> None:
        self.seen[self.path] += 1
        status = 503 if self.path == "/readyz" and not self.ready.is_set() else 200
        body = self.name.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(name: str, ready: bool) -> tuple[ThreadingHTTPServer, threading.Event, Counter[str]]:
    event, seen = threading.Event(), Counter[str]()
    if ready:
        event.set()
    handler = type(f"{name}Instance", (_Instance,), {"name": name, "ready": event, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, event, seen


@pytest.fixture
def instances() -> Iterator[dict[str, tuple[int, threading.Event, Counter[str]]]]:
    stable = _serve("stable", ready=True)
    warming = _serve("canary", ready=False)
    yield {
        name: (int(s.server_address[1]), event, seen)
        for name, (s, event, seen) in (("stable", stable), ("canary", warming))
    }
    for s, _, _ in (stable, warming):
        s.shutdown()
        s.server_close()


def test_a_warming_instance_gets_no_traffic_until_readyz_answers_200(
    tmp_path: Path, instances: dict[str, tuple[int, threading.Event, Counter[str]]]
) -> None:
    stable_port, _, _ = instances["stable"]
    canary_port, canary_ready, canary_seen = instances["canary"]
    public = free_port()
    sock = haproxy.socket_path_for(tmp_path)
    text = haproxy.render_config(
        host="127.0.0.1",
        public_port=public,
        socket_path=sock,
        stable_port=stable_port,
        stable_weight=100,
        canary_port=None,
        canary_weight=0,
        check_interval_ms=CHECK_MS,
    )
    assert "option httpchk GET /readyz" in text and "http-check expect status 200" in text
    config = tmp_path / "haproxy.cfg"
    haproxy.write_config(config, text)
    pid = haproxy.start_haproxy(config, sock, tmp_path / "haproxy.log")
    started = process_start_time(pid)
    try:
        haproxy.wait_server_status(sock, "stable", "UP", timeout=10)
        # The new instance goes behind the proxy at full weight while it warms up.
        haproxy.point_server(sock, "canary", canary_port, 100)
        answered: Counter[str] = Counter()
        with httpx.Client(timeout=5.0) as client:
            until = time.monotonic() + 10 * CHECK_MS / 1000
            while time.monotonic() < until:
                r = client.get(f"http://127.0.0.1:{public}/")
                answered[r.headers.get(haproxy.VARIANT_HEADER, "?")] += 1
            assert canary_seen["/readyz"] >= 3  # checked, with /readyz, and refused
            assert canary_seen["/"] == 0, "a warming instance was sent traffic"
            assert answered == Counter({"stable": answered["stable"]}) and answered["stable"] > 0
            assert not haproxy.server_stats(sock)["canary"].status.startswith("UP")

            canary_ready.set()  # warm-up done: /readyz answers 200
            haproxy.wait_server_status(sock, "canary", "UP", timeout=10)
            for _ in range(200):
                r = client.get(f"http://127.0.0.1:{public}/")
                answered[r.headers.get(haproxy.VARIANT_HEADER, "?")] += 1
        assert canary_seen["/"] > 0 and answered["canary"] > 0
    finally:
        haproxy.stop_haproxy(pid, timeout=5, start_time=started)
