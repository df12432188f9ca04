"""The adaptive micro-batcher, without a broker: who shares a batch, and when it flushes."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.query.batching import AdaptiveBatcher


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int], first_at: float) -> list[int]:
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot score {self.fail_on}")
        return [i * 10 for i in items]


async def test_concurrent_requests_share_one_call_and_get_their_own_results() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(model, max_size=64, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(10)))
    assert len(model.calls) == 1 and len(model.calls[0]) == 20
    assert results == [[i * 10, (i + 100) * 10] for i in range(10)]


async def test_a_lone_request_does_not_wait_for_the_max_wait() -> None:
    batcher = AdaptiveBatcher(Recorder(), max_size=64, max_wait_s=1.0)
    started = time.perf_counter()
    assert await batcher.submit([7]) == [70]
    assert time.perf_counter() - started < 0.05


async def test_batches_never_exceed_max_size_and_an_oversize_request_goes_alone() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(model, max_size=4, max_wait_s=0.05)
    await asyncio.gather(*(batcher.submit([i]) for i in range(10)), batcher.submit(list(range(9))))
    assert all(len(c) <= 4 for c in model.calls if c != list(range(9)))
    assert list(range(9)) in model.calls
    assert sum(len(c) for c in model.calls) == 19


async def test_flush_is_put_off_while_requests_keep_arriving_up_to_max_wait() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(model, max_size=1000, max_wait_s=0.02)

    submitted = []
    for i in range(200):  # one new request per loop turn
        submitted.append(asyncio.ensure_future(batcher.submit([i])))
        await asyncio.sleep(0)
    assert await asyncio.gather(*submitted) == [[i * 10] for i in range(200)]
    assert sum(len(c) for c in model.calls) == 200
    assert len(model.calls) < 100, "arrivals on consecutive turns should share batches"


async def test_a_failing_request_fails_alone() -> None:
    model = Recorder(fail_on=3)
    batcher = AdaptiveBatcher(model, max_size=64, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), return_exceptions=True)
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [[0], [10], [20], [40], [50]]


async def test_a_cancelled_request_is_left_out_of_the_batch() -> None:
    model = Recorder()
    batcher = AdaptiveBatcher(model, max_size=64, max_wait_s=0.05)
    doomed = asyncio.ensure_future(batcher.submit([1]))
    kept = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.sleep(0)  # both are queued
    doomed.cancel()
    assert await kept == [20]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert model.calls == [[2]]
