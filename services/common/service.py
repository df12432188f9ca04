"""One shape for every service: what it consumes, its pure core, what it produces.

A service subclasses ``StreamService`` and says, in ``setup``, what it needs in the order
it needs it: clients, state folded from topics, background tasks. Each is entered on one
``AsyncExitStack``, so ``stop`` closes everything in the reverse order, once, whatever
failed on the way, and every service stops the same way (a background task is cancelled
and awaited; an error it died of is logged, never swallowed silently).

State rebuilt from a topic (the registry view, the retrain-trigger's memory, the alerts,
the deployment log) is read by ``TopicFollower``: every partition assigned without a
consumer group, folded to its high watermark before the service is ready, then followed.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from typing import Any, ClassVar, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from scoremesh.contract.topics import TopicName
from services.common.health import HealthServer
from services.common.kafka import (
    assign_all,
    make_consumer,
    make_producer,
    read_to_end,
    seek_to_time,
    start_with_retry,
)
from services.common.settings import Settings

log = logging.getLogger(__name__)

_C = TypeVar("_C", bound="_Client")

Apply = Callable[[ConsumerRecord[bytes, bytes]], bool]
"""Folds one record into a state; True when the state changed."""


class Lifecycle(abc.ABC):
    """start() enters what ``setup`` needs on one exit stack; stop() closes it, once, in
    reverse order. A failure half-way through ``setup`` closes what was entered."""

    _stack: AsyncExitStack | None = None

    @abc.abstractmethod
    async def setup(self, stack: AsyncExitStack) -> None:
        """Start what is needed, entering each on ``stack`` (see the helpers below)."""

    async def start(self) -> None:
        stack = AsyncExitStack()
        try:
            await self.setup(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


class StreamService(Lifecycle):
    """The lifecycle the runner (``services.common.lifecycle.serve``) drives."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def run(self, stop: asyncio.Event) -> None:
        """Do the work until ``stop`` is set."""

    def register_checks(self, health: HealthServer) -> None:
        """Readiness checks; none by default."""


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def enter_client(stack: AsyncExitStack, client: _C, what: str, settings: Settings) -> _C:
    """Start a Kafka client (retrying while the broker is not there); stop it on exit."""
    await start_with_retry(client.start, what, settings)
    stack.push_async_callback(client.stop)
    return client


async def started_producer(
    stack: AsyncExitStack, settings: Settings, what: str, **overrides: Any
) -> AIOKafkaProducer:
    """A new producer, started and stopped on exit."""
    return await enter_client(stack, make_producer(settings, **overrides), what, settings)


async def started_consumer(
    stack: AsyncExitStack, settings: Settings, what: str, **options: Any
) -> AIOKafkaConsumer:
    """A new consumer, without a group unless ``group_id`` is given, started and stopped on
    exit."""
    options.setdefault("group_id", None)
    return await enter_client(stack, make_consumer(settings, **options), what, settings)


async def wait_for(event: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until ``event`` is set (True) or ``stop`` is (False), whichever comes first."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        stopper.cancel()
    return event.is_set()


def in_background(
    stack: AsyncExitStack, work: Coroutine[Any, Any, object], name: str
) -> asyncio.Task[object]:
    """Run ``work`` as a task until the stack closes: then cancel it and wait for it."""
    task: asyncio.Task[object] = asyncio.create_task(work, name=name)
    stack.push_async_callback(cancel_and_wait, task)
    return task


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it; an error it had died of is logged, not raised."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:
            log.exception("background task had failed", extra={"task": task.get_name()})


def on_exit(stack: AsyncExitStack, close: Callable[[], Awaitable[object]]) -> None:
    """Call ``close`` when the stack closes (a client's stop, a final flush)."""
    stack.push_async_callback(close)


async def fold_topics(
    settings: Settings,
    folds: Sequence[tuple[TopicName, Callable[[ConsumerRecord[bytes, bytes]], None]]],
    what: str,
    timeout_s: float = 60.0,
) -> int:
    """Read each topic from its beginning to its high watermark, once, in order, handing
    every record to its function. Returns how many records were read."""
    async with AsyncExitStack() as stack:
        consumer = await started_consumer(stack, settings, what)
        count = 0
        for topic, handle in folds:
            tps = await assign_all(consumer, settings.topic(topic))
            count += await read_to_end(consumer, tps, handle, timeout_s=timeout_s)
        return count


class TopicFollower(Lifecycle):
    """Fold a topic to its end, then follow it: the one way state is rebuilt from a topic.

    ``apply`` folds a record and says whether the state changed; ``on_change`` (a function
    or a coroutine function) is called once after the initial fold (when anything was
    folded) and after every fetch that changed the state. ``ready`` is set when the fold
    reached the high watermark.

    ``since_ms`` (a function, asked at start) folds only the records written since then,
    for state that is a recent window of a long topic (``seek_to_time``).
    """

    def __init__(
        self,
        settings: Settings,
        topic: TopicName,
        apply: Apply,
        on_change: Callable[[], object] | None = None,
        what: str | None = None,
        fold_timeout_s: float = 60.0,
        since_ms: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.apply = apply
        self.on_change = on_change
        self.what = what or f"follow-{topic}"
        self.fold_timeout_s = fold_timeout_s
        self.since_ms = since_ms
        self.ready = asyncio.Event()
        self.folded = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []

    async def setup(self, stack: AsyncExitStack) -> None:
        consumer = await started_consumer(stack, self.settings, self.what)
        self._tps = await assign_all(consumer, self.settings.topic(self.topic))
        if self.since_ms is not None:
            await seek_to_time(consumer, self._tps, self.since_ms())
        changed = False

        def fold(record: ConsumerRecord[bytes, bytes]) -> None:
            nonlocal changed
            changed |= self.apply(record)

        self.folded = await read_to_end(consumer, self._tps, fold, self.fold_timeout_s)
        self._consumer = consumer
        self.ready.set()
        if changed:
            await self._changed()
        in_background(stack, self._follow(consumer), self.what)

    async def __aenter__(self) -> TopicFollower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                log.warning(
                    "follow error, retrying", extra={"topic": self.topic, "error": str(exc)}
                )
                await asyncio.sleep(1)
                continue
            changed = False
            for records in batches.values():
                for record in records:
                    changed |= self.apply(record)
            if changed:
                await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            outcome = self.on_change()
            if inspect.isawaitable(outcome):
                await outcome
