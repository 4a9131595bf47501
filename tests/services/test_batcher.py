"""The adaptive batcher on its own: coalescing, order, splitting, shedding, isolation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from services.batcher import AdaptiveBatcher, Overloaded

pytestmark = pytest.mark.fast


@dataclass(frozen=True)
class Ids:
    """Rows that are just numbers; a row's score is its number."""

    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.values)

    @staticmethod
    def concat(parts: Sequence[Ids]) -> Ids:
        return Ids(tuple(v for p in parts for v in p.values))


def ids(*values: float) -> Ids:
    return Ids(tuple(values))


class Recorder:
    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, rows: Ids) -> np.ndarray:
        self.calls.append(len(rows))
        if self.fail_on is not None and self.fail_on in rows.values:
            raise ValueError(f"cannot score {self.fail_on}")
        return np.array(rows.values, dtype=float)


def batcher(score: Recorder, **kw: object) -> AdaptiveBatcher[Ids]:
    options: dict[str, object] = {
        "max_batch_rows": 8,
        "max_queued_rows": 1000,
        "max_wait_s": 5.0,
        "thread_min_rows": 4,
    }
    options.update(kw)
    return AdaptiveBatcher(score, Ids.concat, **options)  # type: ignore[arg-type]


def test_concurrent_requests_share_calls_and_each_gets_its_own_scores() -> None:
    score = Recorder()

    async def main() -> list[np.ndarray]:
        b = batcher(score)
        out = await asyncio.gather(*(b.score(ids(i, i + 0.5)) for i in range(10)))
        await b.close()
        return out

    results = asyncio.run(main())
    assert [r.tolist() for r in results] == [[i, i + 0.5] for i in range(10)]
    assert sum(score.calls) == 20
    assert len(score.calls) < 10
    assert max(score.calls) <= 8


def test_requests_are_never_split_and_a_large_one_is_scored_alone() -> None:
    score = Recorder()

    async def main() -> list[np.ndarray]:
        b = batcher(score, max_batch_rows=3)
        out = await asyncio.gather(b.score(ids(*range(10))), b.score(ids(1, 2)), b.score(ids(3)))
        await b.close()
        return out

    big, two, one = asyncio.run(main())
    assert big.tolist() == list(range(10))
    assert (two.tolist(), one.tolist()) == ([1, 2], [3])
    assert score.calls == [10, 3]


def test_the_scoring_thread_gets_its_next_batch_without_the_event_loop() -> None:
    """While the thread scores one batch, the next is already handed to it: a second call
    starts even when the event loop is blocked (busy decoding other requests, say)."""
    first_started, loop_blocked, second_started = (threading.Event() for _ in range(3))
    score = Recorder()

    def recording(rows: Ids) -> np.ndarray:
        if not score.calls:
            first_started.set()
            loop_blocked.wait(timeout=5.0)  # ends while the event loop is blocked
        else:
            second_started.set()
        return score(rows)

    async def busy_loop() -> bool:
        while not first_started.is_set():
            await asyncio.sleep(0.001)
        loop_blocked.set()
        # Blocks the event loop: nothing the loop would do can start the second call.
        return second_started.wait(timeout=2.0)

    async def main() -> list[object]:
        b = AdaptiveBatcher(
            recording,
            Ids.concat,
            max_batch_rows=8,
            max_queued_rows=100,
            max_wait_s=5.0,
            thread_min_rows=4,
        )
        out = await asyncio.gather(
            b.score(ids(*range(8))), b.score(ids(*range(8, 12))), b.score(ids(20)), busy_loop()
        )
        await b.close()
        return out

    first, second, small, started_while_blocked = asyncio.run(main())
    assert started_while_blocked
    assert first.tolist() == list(range(8))  # type: ignore[attr-defined]
    assert second.tolist() == [8, 9, 10, 11]  # type: ignore[attr-defined]
    assert small.tolist() == [20]  # type: ignore[attr-defined]
    # The second call took what was queued when the first started: the two requests behind it.
    assert score.calls == [8, 5]


def test_a_failing_request_fails_alone() -> None:
    score = Recorder(fail_on=13.0)

    async def main() -> list[object]:
        b = batcher(score)
        out = await asyncio.gather(
            b.score(ids(1.0)), b.score(ids(13.0)), b.score(ids(2.0)), return_exceptions=True
        )
        await b.close()
        return out

    first, bad, last = asyncio.run(main())
    assert isinstance(first, np.ndarray) and first.tolist() == [1.0]
    assert isinstance(bad, ValueError)
    assert isinstance(last, np.ndarray) and last.tolist() == [2.0]


def test_a_full_queue_sheds_the_request_instead_of_queueing_it() -> None:
    score = Recorder()

    async def main() -> None:
        b = batcher(score, max_queued_rows=5)
        first = asyncio.ensure_future(b.score(ids(*range(5))))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="already waiting"):
            await b.score(ids(9.0))
        assert (await first).tolist() == list(range(5))
        await b.close()

    asyncio.run(main())


def test_a_request_that_waited_too_long_is_shed() -> None:
    def slow(rows: Ids) -> np.ndarray:
        import time

        time.sleep(0.2)
        return np.array(rows.values, dtype=float)

    async def main() -> None:
        b = AdaptiveBatcher(slow, Ids.concat, max_batch_rows=1, max_queued_rows=100, max_wait_s=0.1)
        results = await asyncio.gather(
            *(b.score(ids(float(i))) for i in range(3)), return_exceptions=True
        )
        await b.close()
        assert isinstance(results[0], np.ndarray)
        assert any(isinstance(r, Overloaded) for r in results[1:])

    asyncio.run(main())
