"""The batch loop commits a batch's offsets only after its records are acknowledged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from services.common.batchloop import BatchLoop, Out
from services.common.kafka import enqueue_records
from services.common.settings import Settings

TP = TopicPartition("in", 0)


class Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.value = b"v"


class Batch:
    closed = False

    def append(self, **_: Any) -> object:
        assert not self.closed
        return object()

    def close(self) -> None:
        self.closed = True


class Producer:
    def __init__(self) -> None:
        self.acks: list[asyncio.Future[None]] = []

    def create_batch(self) -> Batch:
        return Batch()

    async def send_batch(self, batch: Batch, topic: str, partition: int) -> asyncio.Future[None]:
        assert batch.closed, "a processed batch is complete: it must not linger"
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}


class Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)


async def echo(records: list[Any]) -> list[Out]:
    return [Out("out", str(r.offset).encode(), b"x") for r in records]


def make_loop(depth: int) -> tuple[BatchLoop, Producer, Consumer]:
    producer = Producer()
    loop = BatchLoop(Settings(), "t", "g", ["in"], producer, echo, pipeline_depth=depth)  # type: ignore[arg-type]
    return loop, producer, Consumer()


async def settle_tasks() -> None:
    for _ in range(30):  # a chain of batches takes a few loop turns per batch
        await asyncio.sleep(0)


async def test_without_pipelining_the_batch_waits_for_its_acknowledgements() -> None:
    loop, producer, consumer = make_loop(depth=0)
    handle = asyncio.create_task(loop._handle(consumer, {TP: [Record(0), Record(1)]}))  # type: ignore[arg-type]
    await settle_tasks()
    assert not handle.done() and consumer.commits == []
    for ack in producer.acks:
        ack.set_result(None)
    await handle
    assert consumer.commits == [{TP: 2}]


async def test_pipelined_commits_follow_acknowledgements_in_order() -> None:
    loop, producer, consumer = make_loop(depth=1)
    await loop._handle(consumer, {TP: [Record(0), Record(1)]})  # type: ignore[arg-type]
    await settle_tasks()
    assert consumer.commits == [], "committed before the outputs were acknowledged"
    first_acks = list(producer.acks)
    # the next batch is processed meanwhile, but cannot overtake the unacknowledged one
    second = asyncio.create_task(loop._handle(consumer, {TP: [Record(2)]}))  # type: ignore[arg-type]
    await settle_tasks()
    assert not second.done() and len(producer.acks) > len(first_acks), "second batch not sent"
    for ack in first_acks:
        ack.set_result(None)
    await second
    assert consumer.commits == [{TP: 2}]
    for ack in producer.acks[len(first_acks) :]:
        ack.set_result(None)
    await loop.settle()
    assert consumer.commits == [{TP: 2}, {TP: 3}]


async def test_a_batch_never_acknowledged_is_not_committed_and_stops_the_loop() -> None:
    loop, producer, consumer = make_loop(depth=1)
    await loop._handle(consumer, {TP: [Record(0)]})  # type: ignore[arg-type]
    producer.acks[0].set_exception(KafkaTimeoutError())
    await loop.settle()  # what a revoke or a stop does
    assert consumer.commits == []
    with pytest.raises(KafkaTimeoutError):
        await loop._handle(consumer, {TP: [Record(1)]})  # type: ignore[arg-type]


async def test_deeper_pipelines_keep_commits_in_fetch_order() -> None:
    loop, producer, consumer = make_loop(depth=3)
    for offset in range(3):
        await loop._handle(consumer, {TP: [Record(offset)]})  # type: ignore[arg-type]
    assert len(producer.acks) == 3 and consumer.commits == []
    # acknowledgements arrive out of order; commits do not
    producer.acks[2].set_result(None)
    producer.acks[1].set_result(None)
    await settle_tasks()
    assert consumer.commits == [], "a later batch committed before the first was acknowledged"
    producer.acks[0].set_result(None)
    await settle_tasks()
    assert consumer.commits == [{TP: 1}, {TP: 2}, {TP: 3}]
    # a fourth batch waits only when more than three are unacknowledged
    for offset in range(3, 7):
        handle = asyncio.create_task(loop._handle(consumer, {TP: [Record(offset)]}))  # type: ignore[arg-type]
        await settle_tasks()
    assert not handle.done(), "a fourth unacknowledged batch did not wait"
    producer.acks[3].set_result(None)
    await handle
    for ack in producer.acks[4:]:
        ack.set_result(None)
    await loop.settle()
    assert [c[TP] for c in consumer.commits] == [1, 2, 3, 4, 5, 6, 7]


async def test_a_failed_batch_fails_the_ones_after_it() -> None:
    loop, producer, consumer = make_loop(depth=4)
    for offset in range(3):
        await loop._handle(consumer, {TP: [Record(offset)]})  # type: ignore[arg-type]
    producer.acks[2].set_result(None)
    producer.acks[0].set_result(None)
    producer.acks[1].set_exception(KafkaTimeoutError())
    await loop.settle()
    assert consumer.commits == [{TP: 1}], "committed past a batch that was never acknowledged"
    with pytest.raises(KafkaTimeoutError):
        await loop._handle(consumer, {TP: [Record(3)]})  # type: ignore[arg-type]


class SizedBatch:
    """A batch holding at most 100 bytes of values, like aiokafka's max_batch_size."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self.closed = False

    def append(self, *, key: Any, value: bytes, timestamp: Any, headers: Any = ()) -> object | None:
        if sum(map(len, self.values)) + len(value) > 100:
            return None
        self.values.append(value)
        return object()

    def close(self) -> None:
        self.closed = True


class SizedProducer(Producer):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, list[bytes]]] = []

    def create_batch(self) -> SizedBatch:  # type: ignore[override]
        return SizedBatch()

    async def send_batch(  # type: ignore[override]
        self, batch: SizedBatch, topic: str, partition: int
    ) -> asyncio.Future[None]:
        assert batch.values, "an empty batch was sent"
        self.sent.append((partition, list(batch.values)))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


async def test_a_record_too_large_for_any_batch_is_handed_back_and_the_rest_sent() -> None:
    producer = SizedProducer()
    too_large: list[bytes | None] = []
    records = [
        ("out", 0, b"k", b"a" * 60),
        ("out", 0, b"k", b"b" * 500),  # fits no batch
        ("out", 0, b"k", b"c" * 60),  # does not fit next to "a": a second batch
        ("out", 1, b"k", b"d" * 500),  # the first record of its partition, too large
    ]
    futures, enqueued = await enqueue_records(
        producer,  # type: ignore[arg-type]
        records,
        close_batches=True,
        on_too_large=lambda _topic, value: too_large.append(value),
    )
    assert enqueued == 2 and too_large == [b"b" * 500, b"d" * 500]
    assert producer.sent == [(0, [b"a" * 60]), (0, [b"c" * 60])]
    assert len(futures) == 2
    with pytest.raises(ValueError, match="larger than the producer's batch size"):
        await enqueue_records(producer, [("out", 0, None, b"x" * 101)])  # type: ignore[arg-type]


async def test_max_records_bounds_both_the_consumer_and_each_fetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop's own batch size (the label join's 2048) reaches the consumer's
    max_poll_records and every getmany; without one, the batch_max_records setting does."""
    made: list[dict[str, Any]] = []
    fetched: list[int] = []
    stop = asyncio.Event()

    class Fetching:
        _client = None

        def subscribe(self, topics: list[str], listener: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
            fetched.append(max_records)
            stop.set()
            return {}

    def make_consumer(settings: Settings, **options: Any) -> Fetching:
        made.append(options)
        return Fetching()

    class Watch:
        def __init__(self, *_: Any) -> None:
            pass

        async def run(self) -> None:
            await asyncio.Event().wait()

    monkeypatch.setattr("services.common.batchloop.make_consumer", make_consumer)
    monkeypatch.setattr("services.common.batchloop.BrokerWatch", Watch)
    settings = Settings(batch_max_records=64)
    for max_records, expected in ((None, 64), (2048, 2048)):
        stop.clear()
        loop = BatchLoop(settings, "t", "g", ["in"], Producer(), echo, max_records=max_records)  # type: ignore[arg-type]
        await loop.start()
        await loop.run(stop)
        assert made[-1]["max_poll_records"] == expected
        assert fetched[-1] == expected
