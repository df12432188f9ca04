"""Adaptive micro-batching: concurrent requests share one model call.

Each request submits its events and awaits a future. The first submission schedules a
flush for the next turn of the event loop; every request that reached ``submit`` in the
meantime joins the batch. The flush is put off turn by turn while new submissions keep
arriving, until the batch holds ``max_size`` items or its oldest item has waited
``max_wait_s``. So a lone request pays one loop turn (microseconds), and under load the
batches grow by themselves, which is where the per-call cost of the model is saved.

The batch function is synchronous and runs on the event loop: for the models this mesh
serves a batch is tens to hundreds of microseconds, far less than a hop to a thread.
If it raises for a batch of several requests, each request is retried alone, so one
poisoned request fails only itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T], float], Sequence[R]]
"""(items, perf_counter time the oldest item arrived) -> one result per item, in order."""


@dataclass(slots=True)
class _Submission(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]]


class AdaptiveBatcher(Generic[T, R]):
    def __init__(
        self,
        process: BatchFn[T, R],
        max_size: int = 64,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch  # (items, submissions) per flush, for metrics
        self._pending: list[_Submission[T, R]] = []
        self._pending_items = 0
        self._first_at = 0.0
        self._seen = 0
        self._handle: asyncio.Handle | None = None

    @property
    def pending(self) -> int:
        return self._pending_items

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, computed in a batch with whatever else is waiting."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._pending and self._pending_items + len(items) > self.max_size:
            self._flush()  # keep batches within max_size; an oversize request goes alone
        future: asyncio.Future[list[R]] = loop.create_future()
        if not self._pending:
            self._first_at = time.perf_counter()
            self._seen = 0
        self._pending.append(_Submission(items, future))
        self._pending_items += len(items)
        if self._pending_items >= self.max_size:
            self._flush()
        elif self._handle is None:
            self._handle = loop.call_soon(self._tick)
        return await future

    def _tick(self) -> None:
        self._handle = None
        if not self._pending:
            return
        arrived = len(self._pending)
        waited = time.perf_counter() - self._first_at
        if arrived == self._seen or waited >= self.max_wait_s:
            self._flush()
        else:
            self._seen = arrived
            self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def _flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        batch, first_at = self._pending, self._first_at
        self._pending, self._pending_items = [], 0
        live = [s for s in batch if not s.future.done()]  # a timed-out request is cancelled
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(sum(len(s.items) for s in live), len(live))
        self._run(live, first_at, isolate=len(live) > 1)

    def _run(self, batch: list[_Submission[T, R]], first_at: float, isolate: bool) -> None:
        items: list[T] = [item for s in batch for item in s.items]
        try:
            results = self.process(items, first_at)
            if len(results) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(items)} items"
                )
        except Exception as exc:
            if isolate:
                for submission in batch:
                    self._run([submission], first_at, isolate=False)
                return
            for submission in batch:
                if not submission.future.done():
                    submission.future.set_exception(exc)
            return
        start = 0
        for submission in batch:
            end = start + len(submission.items)
            if not submission.future.done():
                submission.future.set_result(list(results[start:end]))
            start = end

    def close(self, exc: BaseException | None = None) -> None:
        """Fail whatever is still waiting (at shutdown)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        pending, self._pending, self._pending_items = self._pending, [], 0
        for submission in pending:
            if not submission.future.done():
                submission.future.set_exception(exc or RuntimeError("batcher closed"))
