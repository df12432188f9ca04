"""Producers and consumers on aiokafka (the ``[aiokafka]`` extra).

    async with EventProducer() as producer:            # config from SCOREMESH_* variables
        await producer.send_many(events)               # encoded, partitioned, acknowledged

    async with PredictionConsumer(group_id="fraud-cases") as predictions:
        async for prediction in predictions:           # a typed Prediction
            ...

Producers write Avro single-object values (or JSON, where the topic accepts it) with
``acks=all``, idempotence unless the config turns it off, lingering batches, and place each
record by murmur2 of its key (events by entity_id, labels by event_id): the partition the
label join expects. Consumers commit a record's offset only after the loop body that
received it has finished, so a crash re-delivers and never skips (at-least-once: dedupe
by (event_id, variant) downstream).

``send_records``/``enqueue_records`` are the batched sends underneath (one BatchBuilder per
partition instead of a send() per record), shared with scoremesh's own services.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import RecordMetadata, TopicPartition

from scoremesh.client._wire import (
    decode_value,
    key_of,
    partition_for,
    value_encoder,
)
from scoremesh.client.config import ClientConfig
from scoremesh.client.errors import (
    ClientError,
    CodecError,
    KafkaUnavailable,
    UndecodableRecord,
)
from scoremesh.client.retry import Backoff
from scoremesh.contract.partitioner import partitions_for_keys
from scoremesh.contract.records import Alert, Event, Label, LabeledPrediction, Prediction
from scoremesh.contract.topics import TopicName

__all__ = [
    "AlertConsumer",
    "Consumer",
    "EventProducer",
    "LabelProducer",
    "LabeledPredictionConsumer",
    "PredictionConsumer",
    "Producer",
    "aiokafka_options",
    "enqueue_records",
    "send_records",
    "start_with_retry",
]

log = logging.getLogger(__name__)
R = TypeVar("R")


def aiokafka_options(config: ClientConfig) -> dict[str, Any]:
    """Connection options (bootstrap, client id, TLS, SASL) for any aiokafka client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap,
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=config.ssl_cafile, certfile=config.ssl_certfile, keyfile=config.ssl_keyfile
        )
    if config.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = config.sasl_mechanism or "SCRAM-SHA-512"
        opts["sasl_plain_username"] = config.sasl_username
        opts["sasl_plain_password"] = config.sasl_password
    return opts


async def start_with_retry(
    start: Callable[[], Awaitable[None]],
    what: str,
    bootstrap: str | None,
    timeout_s: float,
    stop: asyncio.Event | None = None,
    hint: str = "",
) -> None:
    """Start a client, retrying with capped exponential backoff and saying so in the log;
    KafkaUnavailable after ``timeout_s`` (or at once when ``stop`` is set)."""
    deadline = time.monotonic() + timeout_s
    backoff = Backoff(0.25, 5.0)
    attempt = 0
    while True:
        attempt += 1
        try:
            await start()
            if attempt > 1:
                log.info("connected to Kafka", extra={"client": what, "attempts": attempt})
            return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                raise KafkaUnavailable(
                    f"{what}: Kafka at {bootstrap} did not answer for {timeout_s:.0f}s "
                    f"({exc}); check SCOREMESH_KAFKA_BOOTSTRAP or run `scoremesh dev up`{hint}"
                ) from exc
            delay = backoff.next()
            log.warning(
                "Kafka not reachable, retrying",
                extra={"client": what, "error": str(exc), "retry_in_s": round(delay, 2)},
            )
            await asyncio.sleep(min(delay, remaining))


_IDEMPOTENCE_HINT = (
    "; a broker without idempotent producers (the embedded development broker) refuses "
    "InitProducerId: set idempotence=False (SCOREMESH_KAFKA_IDEMPOTENCE=false) for it"
)


class Producer(Generic[R]):
    """Encodes records of one catalog topic and sends them, keyed and partitioned as the
    catalog says. ``EventProducer`` and ``LabelProducer`` are the two a team needs.

    ``config`` defaults to ``ClientConfig.from_env()``; ``overrides`` go to
    ``AIOKafkaProducer`` as they are (e.g. ``compression_type="lz4"``).
    """

    topic: ClassVar[TopicName]

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        value_format: Literal["avro", "json"] = "avro",
        **overrides: Any,
    ) -> None:
        self.config = config or ClientConfig.from_env()
        self.destination = self.config.topic(self.topic)
        self._encode = value_encoder(self.topic, value_format)
        opts = aiokafka_options(self.config)
        opts.update(
            acks="all",
            enable_idempotence=self.config.idempotence,
            linger_ms=self.config.linger_ms,
            max_batch_size=self.config.max_batch_bytes,
            max_request_size=self.config.max_request_bytes,
            request_timeout_ms=30_000,
        )
        opts.update(overrides)
        self._producer = AIOKafkaProducer(**opts)
        self._partitions: list[int] | None = None

    async def start(self) -> None:
        await start_with_retry(
            self._producer.start,
            f"{type(self).__name__}",
            self.config.bootstrap,
            self.config.connect_timeout_s,
            hint=_IDEMPOTENCE_HINT if self.config.idempotence else "",
        )

    async def stop(self) -> None:
        """Send what is buffered, wait for it, and close."""
        await self._producer.stop()

    async def __aenter__(self) -> Producer[R]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _key(self, record: R) -> bytes:
        return key_of(self.topic, record)

    async def partitions(self) -> list[int]:
        """The topic's partitions, asked of the broker once."""
        if self._partitions is None:
            try:
                found = await self._producer.partitions_for(self.destination)
            except KafkaTimeoutError:
                raise ClientError(
                    f"topic {self.destination!r} not found on {self.config.bootstrap}: check "
                    "the topic prefix (SCOREMESH_TOPIC_PREFIX) and that the mesh's topics exist"
                ) from None
            self._partitions = sorted(found)
        return self._partitions

    async def send(self, record: R) -> asyncio.Future[RecordMetadata]:
        """Encode and enqueue one record; returns the future of its acknowledgement."""
        key = self._key(record)
        value = self._encode(record)
        partitions = await self.partitions()
        partition = partitions[partition_for(key, len(partitions))]
        future: asyncio.Future[RecordMetadata] = await self._producer.send(
            self.destination, value, key=key, partition=partition
        )
        return future

    async def send_many(self, records: Iterable[R]) -> int:
        """Encode every record (a bad one raises EncodeError before anything is sent), send
        them in per-partition batches and wait until the broker acknowledged each one.
        Returns the number sent."""
        batch = list(records)
        out = [(self.destination, None, self._key(r), self._encode(r)) for r in batch]
        await self.partitions()  # a missing topic says so, not a timeout deep in aiokafka
        return await send_records(self._producer, out)

    async def flush(self) -> None:
        """Wait until everything enqueued so far is acknowledged."""
        await self._producer.flush()


class EventProducer(Producer[Event]):
    """Events to ``events.raw``, keyed by entity_id."""

    topic = "events.raw"


class LabelProducer(Producer[Label]):
    """Labels to ``labels``, keyed by event_id and placed by murmur2 of it: the partition of
    the event's predictions, where the label join waits for it."""

    topic = "labels"


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer[Any]) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.commit()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


class Consumer(Generic[R]):
    """Typed records of one catalog topic, in a consumer group.

    ``async for record in consumer`` yields each record; its offset is committed once the
    loop body has finished with it (at the next fetch, on a rebalance and at ``stop``); leaving
    an ``async with`` block normally (``break`` included) counts the last record as done, an
    exception does not.
    ``idle_timeout_s`` ends the iteration after that long without a record once partitions are
    assigned (default: never).
    A record that does not decode raises UndecodableRecord (its offset is not committed),
    unless ``on_undecodable`` takes it. ``overrides`` go to ``AIOKafkaConsumer``.
    """

    topic: ClassVar[TopicName]

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        group_id: str,
        idle_timeout_s: float | None = None,
        on_undecodable: Callable[[UndecodableRecord], None] | None = None,
        max_records: int = 500,
        **overrides: Any,
    ) -> None:
        if not group_id:
            raise ClientError("group_id: name your application's consumer group")
        self.config = config or ClientConfig.from_env()
        self.source = self.config.topic(self.topic)
        self.idle_timeout_s = idle_timeout_s
        self.on_undecodable = on_undecodable
        self.max_records = max_records
        opts = aiokafka_options(self.config)
        opts.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.config.fetch_max_wait_ms,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            rebalance_timeout_ms=self.config.rebalance_timeout_ms,
            max_partition_fetch_bytes=max(1024 * 1024, self.config.max_request_bytes),
        )
        opts.update(overrides)
        self._consumer = AIOKafkaConsumer(**opts)
        self._done: dict[TopicPartition, int] = {}
        self._pending: tuple[TopicPartition, int] | None = None  # yielded, body running

    async def start(self) -> None:
        await start_with_retry(
            self._consumer.start,
            type(self).__name__,
            self.config.bootstrap,
            self.config.connect_timeout_s,
        )
        self._consumer.subscribe([self.source], listener=_CommitOnRevoke(self))

    async def stop(self) -> None:
        """Commit what was processed and leave the group."""
        try:
            await self.commit()
        finally:
            await self._consumer.stop()

    async def __aenter__(self) -> Consumer[R]:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and self._pending is not None:  # the body finished with it
            self._done[self._pending[0]] = self._pending[1]
        await self.stop()

    async def commit(self) -> None:
        """Commit the offsets of the records processed so far."""
        if not self._done:
            return
        done, self._done = self._done, {}
        try:
            await self._consumer.commit(done)
        except (CommitFailedError, IllegalStateError) as exc:
            # the partitions moved to another member, which re-reads them: at-least-once
            log.warning("commit refused after a rebalance", extra={"error": str(exc)})

    def __aiter__(self) -> AsyncIterator[R]:
        return self._records()

    async def _records(self) -> AsyncIterator[R]:
        last_seen = time.monotonic()
        while True:
            await self.commit()
            batches = await self._consumer.getmany(timeout_ms=200, max_records=self.max_records)
            if not batches:
                idle = self.idle_timeout_s
                if not self._consumer.assignment():
                    last_seen = time.monotonic()  # joining the group is not idleness
                elif idle is not None and time.monotonic() - last_seen >= idle:
                    return
                continue
            last_seen = time.monotonic()
            for tp, messages in batches.items():
                for message in messages:
                    try:
                        value: R = decode_value(self.topic, message.value or b"")
                    except CodecError as exc:
                        error = UndecodableRecord(tp.topic, tp.partition, message.offset, exc)
                        if self.on_undecodable is None:
                            raise error from exc
                        self.on_undecodable(error)
                    else:
                        self._pending = (tp, message.offset + 1)
                        yield value
                        self._pending = None
                    self._done[tp] = message.offset + 1


class PredictionConsumer(Consumer[Prediction]):
    """Predictions, one per (event, variant); ``served`` marks the variant that decided."""

    topic = "predictions"


class LabeledPredictionConsumer(Consumer[LabeledPrediction]):
    """Predictions joined with their label (``predictions.labeled``)."""

    topic = "predictions.labeled"


class AlertConsumer(Consumer[Alert]):
    """The monitor's alerts, firing and resolved."""

    topic = "alerts"


# One BatchBuilder per partition instead of a send() per record: ~2 µs of client CPU per
# record instead of ~9 (embedded broker, 300-byte records). Keyed records are placed exactly
# as send() would place them (murmur2, the Java client's partitioner), so co-partitioning
# holds; records without a key are spread round-robin.
_spread = itertools.count()


async def send_records(
    producer: AIOKafkaProducer,
    records: Iterable[tuple[str, int | None, bytes | None, bytes | None]],
) -> int:
    """Send (topic, partition or None, key, value) records and wait for every acknowledgement.

    Order is kept within each partition. Returns the number of records sent.
    """
    futures, count = await enqueue_records(producer, records)
    if futures:
        await asyncio.gather(*futures)
    return count


NO_HEADERS: list[tuple[str, bytes]] = []
"""Shared by every record without headers (aiokafka's batch builder takes lists only and
does not change them)."""


async def enqueue_records(
    producer: AIOKafkaProducer,
    records: Iterable[tuple[str, int | None, bytes | None, bytes | None]],
    *,
    close_batches: bool = False,
    on_too_large: Callable[[str, bytes | None], None] | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
    timestamps: Sequence[int | None] | None = None,
) -> tuple[list[asyncio.Future[Any]], int]:
    """Hand the records to the producer in per-partition batches; returns the batches'
    acknowledgement futures (not awaited) and the number of records enqueued.

    Order is kept within each partition, and across calls. ``close_batches``: the records
    are a complete unit (a processed batch), so the producer sends them at once instead of
    lingering ``linger_ms`` for more records that will not come. A record larger than an
    empty batch raises ValueError, or, with ``on_too_large``, is handed to it and skipped.
    ``headers``: each record's Kafka headers, when any record has some. ``timestamps``:
    each record's timestamp (epoch ms; None: now), to keep one a forwarded record came with.
    """
    batch_records = records if isinstance(records, list) else list(records)
    placed = await _place(producer, batch_records)
    open_batches: dict[tuple[str, int], Any] = {}
    futures: list[asyncio.Future[Any]] = []
    empty: set[tuple[str, int]] = set()  # open batches holding no record yet
    enqueued = 0
    for i, ((topic, _, key, value), partition) in enumerate(
        zip(batch_records, placed, strict=True)
    ):
        tp = (topic, partition)
        batch = open_batches.get(tp)
        if batch is None:
            batch = open_batches[tp] = producer.create_batch()
            empty.add(tp)
        extra = NO_HEADERS if headers is None else headers[i]
        stamp = None if timestamps is None else timestamps[i]
        if batch.append(key=key, value=value, timestamp=stamp, headers=extra) is None:
            if tp not in empty:  # full: send it, and try the record in a fresh one
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = open_batches[tp] = producer.create_batch()
                empty.add(tp)
            if batch.append(key=key, value=value, timestamp=stamp, headers=extra) is None:
                if on_too_large is None:
                    raise ValueError(f"{topic}: a record larger than the producer's batch size")
                on_too_large(topic, value)
                continue
        empty.discard(tp)
        enqueued += 1
    for (topic, partition), batch in open_batches.items():
        if (topic, partition) in empty:
            continue  # nothing fitted in it
        if close_batches:
            batch.close()
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures, enqueued


async def _place(
    producer: AIOKafkaProducer,
    records: list[tuple[str, int | None, bytes | None, bytes | None]],
) -> list[int]:
    """Each record's partition: as given, murmur2 of the key, or round-robin without a key."""
    placed: list[int] = [0] * len(records)
    keyed: dict[str, list[int]] = {}
    partitions: dict[str, list[int]] = {}
    for i, (topic, partition, key, _) in enumerate(records):
        if partition is not None:
            placed[i] = partition
        elif key is None:
            known = partitions.get(topic) or await _partitions(producer, topic, partitions)
            placed[i] = known[next(_spread) % len(known)]
        else:
            keyed.setdefault(topic, []).append(i)
    for topic, idx in keyed.items():
        known = partitions.get(topic) or await _partitions(producer, topic, partitions)
        keys = [records[i][2] or b"" for i in idx]
        for i, p in zip(idx, partitions_for_keys(keys, len(known)), strict=True):
            placed[i] = known[p]
    return placed


async def _partitions(
    producer: AIOKafkaProducer, topic: str, known: dict[str, list[int]]
) -> list[int]:
    known[topic] = sorted(await producer.partitions_for(topic))
    return known[topic]
