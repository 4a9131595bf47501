"""Cut slow clients: a request's headers must arrive within `serving.header_timeout_s`, and an
idle keep-alive connection closes after `serving.keep_alive_s`.

uvicorn (under BentoML 1.4) closes an idle connection only after a response (its keep-alive
timer); a connection that sends nothing, or sends its headers a byte at a time, is held for
ever: 1,000 of them were held for 90 s in the hardening probe, each a socket and a protocol
object, and enough of them exhaust the worker's descriptors. uvicorn has no header-read
timeout and BentoML no setting that reaches one, so this module adds it to uvicorn's
httptools protocol (the one uvicorn picks when httptools is installed, as it is here): a
timer armed when a connection opens and when a request's first byte arrives, cancelled when
that request's headers are complete. It is a deadline, not an idle timer: bytes trickling
in do not move it. When it fires on a request that had begun, the client gets a 408 and the
connection closes; a connection that sent nothing is closed. A slow body is bounded by
`serving.request_timeout_s` (BentoML's timeout middleware, services/bentoml_fixes.py).

The patch is applied in each worker when the service is built; it replaces four methods of
`HttpToolsProtocol` with wrappers that call the originals.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED = "__mlgate_slow_clients_cut__"
_TIMER = "_mlgate_header_timer"
_BEGUN = "_mlgate_request_begun"
_METHODS = ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete")


def _timeout_response() -> bytes:
    body = b"request headers took too long to arrive\n"
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


def cut_slow_clients(header_timeout_s: float, keep_alive_s: float) -> bool:
    """Patch uvicorn's httptools protocol (once; later calls change the timeouts). False when
    the protocol is not the one this was written for: then nothing is changed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        logger.warning("uvicorn's httptools protocol is missing; slow clients are not cut")
        return False
    protocol: Any = HttpToolsProtocol
    if not all(callable(getattr(protocol, name, None)) for name in _METHODS):
        logger.warning("uvicorn's HttpToolsProtocol changed; slow clients are not cut")
        return False
    protocol._mlgate_header_timeout_s = header_timeout_s
    protocol._mlgate_keep_alive_s = keep_alive_s
    if getattr(protocol, _PATCHED, False):
        return True
    made = protocol.connection_made
    lost = protocol.connection_lost
    begin = protocol.on_message_begin
    complete = protocol.on_headers_complete

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        self.timeout_keep_alive = self._mlgate_keep_alive_s
        _arm(self, begun=False)

    def on_message_begin(self: Any) -> None:
        begin(self)
        if getattr(self, _TIMER, None) is None:
            _arm(self, begun=True)
        else:
            setattr(self, _BEGUN, True)

    def on_headers_complete(self: Any) -> None:
        _disarm(self)
        complete(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        _disarm(self)
        lost(self, exc)

    protocol.connection_made = connection_made
    protocol.on_message_begin = on_message_begin
    protocol.on_headers_complete = on_headers_complete
    protocol.connection_lost = connection_lost
    setattr(protocol, _PATCHED, True)
    return True


def _arm(protocol: Any, *, begun: bool) -> None:
    setattr(protocol, _BEGUN, begun)
    timer = protocol.loop.call_later(protocol._mlgate_header_timeout_s, _expire, protocol)
    setattr(protocol, _TIMER, timer)


def _disarm(protocol: Any) -> None:
    timer = getattr(protocol, _TIMER, None)
    if timer is not None:
        timer.cancel()
        setattr(protocol, _TIMER, None)


def _expire(protocol: Any) -> None:
    setattr(protocol, _TIMER, None)
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return
    if getattr(protocol, _BEGUN, False):
        transport.write(_timeout_response())
    transport.close()
