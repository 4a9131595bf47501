"""BentoML's timeout middleware, patched: no timer outlives its request, and a request that
takes too long still gets the 504."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from services.bentoml_fixes import cancel_timeout_timers

pytestmark = pytest.mark.fast


async def _call(app: Any, timeout: float) -> tuple[list[dict[str, Any]], int]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = TimeoutMiddleware(app, timeout=timeout)
    loop = asyncio.get_running_loop()
    await middleware({"type": "http", "path": "/"}, receive, send)
    return sent, len(loop._scheduled)  # type: ignore[attr-defined]


def test_timer_is_cancelled_when_the_request_ends() -> None:
    assert cancel_timeout_timers()
    assert cancel_timeout_timers()  # idempotent

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        for _ in range(20):
            sent, _ = await _call(quick, timeout=60.0)
            assert sent[0]["status"] == 200
        loop = asyncio.get_running_loop()
        live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert live == []

    asyncio.run(main())


def test_a_slow_request_still_gets_a_504() -> None:
    cancel_timeout_timers()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(5)

    sent, _ = asyncio.run(_call(slow, timeout=0.05))
    assert sent[0]["status"] == 504


def test_a_timeout_raised_by_the_app_itself_is_not_taken_for_ours() -> None:
    cancel_timeout_timers()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("the app's own")

    import pytest

    with pytest.raises(TimeoutError, match="the app's own"):
        asyncio.run(_call(broken, timeout=60.0))
