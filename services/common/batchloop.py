"""The stateless hot-path loop: getmany -> process the batch -> send -> ack -> commit.

Offsets are committed only after every record the batch produced is acknowledged, so a
crash replays (at-least-once) and never skips. Consumers downstream deduplicate by key.

``pipelined`` loops (the validator and the scorer) process the next batch while the
previous one's records are being acknowledged: at most one batch is unacknowledged, its
offsets are committed only after its acknowledgements (and after the batch before it),
and revoked partitions, a stop and a failure all wait for it first. Without pipelining the
loop sat idle for a broker round trip per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from services.common.health import HealthServer
from services.common.kafka import BrokerWatch, enqueue_records, make_consumer, start_with_retry
from services.common.metrics import BATCH_SECONDS, BATCH_SIZE, EVENTS_IN, EVENTS_OUT, KAFKA_UP
from services.common.settings import Settings

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass(slots=True)
class Out:
    topic: str
    key: bytes | None
    value: bytes


ProcessFn = Callable[[list[Record]], Awaitable[list[Out]]]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: BatchLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info(
            "partitions revoked",
            extra={"partitions": [f"{t.topic}/{t.partition}" for t in revoked]},
        )
        await self.loop.settle()

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.loop.assigned = list(assigned)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{t.topic}/{t.partition}" for t in assigned]},
        )


async def commit_offsets(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], records: int
) -> None:
    """Commit a finished batch; a commit lost to a rebalance is logged, not raised."""
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, KafkaError) as exc:
        # A rebalance took these partitions away; the new owner replays from the last
        # committed offset, and downstream dedupes by key.
        log.warning(
            "commit failed after rebalance; batch will be replayed",
            extra={"error": str(exc), "records": records},
        )


class BatchLoop:
    def __init__(
        self,
        settings: Settings,
        service: str,
        group_id: str,
        topics: Sequence[str],
        producer: AIOKafkaProducer,
        process: ProcessFn,
        *,
        pipelined: bool = False,
    ) -> None:
        self.settings = settings
        self.pipelined = pipelined
        self._pending: asyncio.Future[None] | None = None  # the unacknowledged batch
        self._failure: BaseException | None = None
        self.service = service
        self.group_id = group_id
        self.topics = list(topics)
        self.producer = producer
        self.process = process
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned: list[TopicPartition] = []
        self.consuming = False
        self.last_batch_at = 0.0
        self.batches = 0
        self.watch: BrokerWatch | None = None

    def add_checks(self, health: HealthServer) -> None:
        """Readiness: in the consumer group, and the broker answering."""
        health.add_check("consuming", lambda: (self.consuming, "joined the consumer group"))
        health.add_check(
            "kafka",
            lambda: self.watch.readiness() if self.watch else (False, "not connected yet"),
        )

    async def start(self, stop: asyncio.Event | None = None) -> None:
        self.consumer = make_consumer(self.settings, group_id=self.group_id)
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        await start_with_retry(self.consumer.start, f"{self.service}-consumer", self.settings, stop)
        self.consuming = True
        KAFKA_UP.labels(self.service).set(1)

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None, "start() first"
        consumer = self.consumer
        stop_wait = asyncio.ensure_future(stop.wait())
        self.watch = BrokerWatch(self.service, consumer._client)
        watching = asyncio.create_task(self.watch.run(), name=f"{self.service}-broker-watch")
        try:
            while not stop.is_set():
                fetch = asyncio.ensure_future(
                    consumer.getmany(timeout_ms=1000, max_records=self.settings.batch_max_records)
                )
                done, _ = await asyncio.wait(
                    {fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if fetch not in done:
                    fetch.cancel()
                    break
                try:
                    batches = fetch.result()
                except KafkaError as exc:
                    KAFKA_UP.labels(self.service).set(0)
                    log.warning("fetch failed, retrying", extra={"error": str(exc)})
                    await asyncio.sleep(1)
                    continue
                if batches:
                    await self._handle(consumer, batches)
        finally:
            stop_wait.cancel()
            watching.cancel()
        await self.settle()
        if self._failure is not None:
            raise self._failure

    async def _handle(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Record]]
    ) -> None:
        if self._failure is not None:
            raise self._failure
        started = time.perf_counter()
        records = [r for part in batches.values() for r in part]
        for tp, part in batches.items():
            EVENTS_IN.labels(self.service, tp.topic).inc(len(part))
        outs = await self.process(records)
        futures: list[asyncio.Future[object]] = []
        if outs:
            futures, _ = await enqueue_records(
                self.producer, [(o.topic, None, o.key, o.value) for o in outs], close_batches=True
            )
        per_topic: dict[str, int] = {}
        for o in outs:
            per_topic[o.topic] = per_topic.get(o.topic, 0) + 1
        for topic, n in per_topic.items():
            EVENTS_OUT.labels(self.service, topic).inc(n)
        offsets = {tp: part[-1].offset + 1 for tp, part in batches.items()}
        previous, self._pending = self._pending, None
        if previous is not None:
            await previous  # at most one batch unacknowledged; commits stay in order
        finish = self._finish(consumer, futures, offsets, len(records))
        if self.pipelined:
            self._pending = asyncio.ensure_future(finish)
        else:
            await finish
        BATCH_SIZE.labels(self.service).observe(len(records))
        BATCH_SECONDS.labels(self.service).observe(time.perf_counter() - started)
        self.last_batch_at = time.time()
        self.batches += 1

    async def _finish(
        self,
        consumer: AIOKafkaConsumer,
        futures: list[asyncio.Future[object]],
        offsets: dict[TopicPartition, int],
        records: int,
    ) -> None:
        """Wait for the batch's acknowledgements, then commit its offsets."""
        if futures:
            await asyncio.gather(*futures)
        await commit_offsets(consumer, offsets, records)

    async def settle(self) -> None:
        """Wait until the unacknowledged batch, if any, is acknowledged and committed.

        A failure (an acknowledgement that never came) is kept and raised by the loop: its
        offsets were not committed, so the batch is replayed after the restart.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await pending
        except Exception as exc:
            log.error(
                "a batch was not acknowledged; it will be replayed", extra={"error": str(exc)}
            )
            self._failure = exc

    async def stop(self) -> None:
        await self.settle()
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        self.consuming = False
