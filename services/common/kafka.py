"""Kafka wiring shared by every service: clients, topic creation, reading to the end.

Dev-broker workarounds live in settings (the dev-stack file) and here in reading
helpers that are correct on any broker; product logic never special-cases tansu.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from scoremesh.contract.catalog import TopicSpec, catalog
from scoremesh.contract.partitioner import partitions_for_keys
from scoremesh.contract.topics import TopicName
from services.common.metrics import KAFKA_UP
from services.common.settings import Settings

log = logging.getLogger(__name__)


NO_HEADERS: list[tuple[str, bytes]] = []
"""Shared by every record without headers (aiokafka's batch builder takes lists only and
does not change them)."""


class KafkaUnavailable(RuntimeError):
    """The broker did not answer within the configured time."""


def client_options(settings: Settings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.require_bootstrap(),
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None
        )
    return opts


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    opts = client_options(settings)
    opts.update(
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=settings.kafka_linger_ms,
        max_batch_size=settings.kafka_max_batch_bytes,
        max_request_size=settings.kafka_max_request_bytes,
        request_timeout_ms=30_000,
    )
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None = None, **overrides: Any
) -> AIOKafkaConsumer:
    opts = client_options(settings)
    opts.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        rebalance_timeout_ms=settings.kafka_rebalance_timeout_ms,
        max_partition_fetch_bytes=max(1024 * 1024, settings.kafka_max_request_bytes),
        fetch_max_bytes=16 * 1024 * 1024,
        max_poll_records=settings.batch_max_records,
    )
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


async def start_with_retry(
    start: Callable[[], Awaitable[None]],
    what: str,
    settings: Settings,
    stop: asyncio.Event | None = None,
) -> None:
    """Start a client, retrying with capped exponential backoff and saying so in the log."""
    deadline = time.monotonic() + settings.kafka_connect_timeout_s
    delay = 0.25
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
                    f"{what}: Kafka at {settings.kafka_bootstrap} did not answer for "
                    f"{settings.kafka_connect_timeout_s:.0f}s ({exc}); check "
                    "SCOREMESH_KAFKA_BOOTSTRAP or run `scoremesh dev up`"
                ) from exc
            log.warning(
                "Kafka not reachable, retrying",
                extra={"client": what, "error": str(exc), "retry_in_s": round(delay, 2)},
            )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


async def ask_broker(client: Any, topics: Iterable[str] | None = None) -> ClusterMetadata:
    """Metadata of some topics from any broker that answers (raises KafkaError if none).

    ``topics`` defaults to the ones the client uses. Not the whole cluster's: on a cluster
    with thousands of topics, a full metadata response every few seconds from every
    process is real load on the brokers for a question ("are you there?") that one topic
    answers. With no topics known yet, all are asked for.
    """
    wanted = sorted(topics if topics is not None else getattr(client, "_topics", ()) or ())
    if not wanted:
        metadata: ClusterMetadata = await client.fetch_all_metadata()
        return metadata
    metadata = ClusterMetadata()
    # aiokafka's own per-topic refresh (fetch_all_metadata is the same call with None)
    if not await client._metadata_update(metadata, wanted):
        raise KafkaError("no broker answered a metadata request")
    return metadata


class BrokerWatch:
    """Is the broker reachable now? A metadata request every few seconds says.

    aiokafka retries a lost connection on its own and quietly (its logger is muted, see
    ``services.common.logs``), so without this a running service cannot tell "no traffic"
    from "no broker". Down: log once at error, then one warning per retry with capped
    exponential backoff; ``scoremesh_kafka_connected`` 0; readiness fails. Up again: log
    how long the outage lasted.
    """

    def __init__(
        self,
        service: str,
        client: Any,
        interval_s: float = 2.0,
        timeout_s: float = 5.0,
        max_backoff_s: float = 4.0,
    ) -> None:
        self.service = service
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.reachable = True
        self.down_since: float | None = None
        self.last_error = ""
        self.outages = 0

    async def probe(self) -> bool:
        try:
            await asyncio.wait_for(ask_broker(self.client), self.timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            return False
        return True

    def readiness(self) -> tuple[bool, str]:
        if self.reachable:
            return True, "broker reachable"
        down_for = time.monotonic() - (self.down_since or time.monotonic())
        return False, f"broker unreachable for {down_for:.0f}s ({self.last_error})"

    async def run(self) -> None:
        delay = 0.5
        while True:
            ok = await self.probe()
            now = time.monotonic()
            if ok:
                if not self.reachable:
                    log.info(
                        "Kafka reachable again",
                        extra={"outage_s": round(now - (self.down_since or now), 1)},
                    )
                self.reachable, self.down_since, delay = True, None, 0.5
                KAFKA_UP.labels(self.service).set(1)
                await asyncio.sleep(self.interval_s)
                continue
            KAFKA_UP.labels(self.service).set(0)
            if self.reachable:
                self.reachable, self.down_since = False, now
                self.outages += 1
                log.error(
                    "Kafka unreachable; consuming and producing paused until it answers",
                    extra={"error": self.last_error},
                )
            log.warning(
                "Kafka not reachable, retrying",
                extra={
                    "error": self.last_error,
                    "down_for_s": round(now - (self.down_since or now), 1),
                    "retry_in_s": delay,
                },
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)


async def ensure_topics(settings: Settings, specs: Iterable[TopicSpec] | None = None) -> list[str]:
    """Create the catalog's topics that are missing; returns the names created."""
    specs = list(specs if specs is not None else catalog().values())
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=30_000)
    await start_with_retry(admin.start, "admin", settings)
    try:
        cluster = await admin.describe_cluster()
        brokers = max(1, len(cluster.get("brokers", [])))
        existing = set(await admin.list_topics())
        wanted = [s for s in specs if settings.topic(s.name) not in existing]
        created: list[str] = []
        for spec in wanted:
            rf = min(spec.replication_factor, brokers)
            configs = dict(spec.configs)
            configs["min.insync.replicas"] = str(min(spec.min_insync_replicas, rf))
            topic = NewTopic(settings.topic(spec.name), spec.partitions, rf, topic_configs=configs)
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def delete_topics(settings: Settings, names: Sequence[TopicName]) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=30_000)
    await start_with_retry(admin.start, "admin", settings)
    try:
        existing = set(await admin.list_topics())
        doomed = [settings.topic(n) for n in names if settings.topic(n) in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise KafkaError(f"topic {topic!r} does not exist; run `scoremesh dev up` or create it")
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def assign_all(
    consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0
) -> list[TopicPartition]:
    """Assign every partition of a topic (no consumer group) and seek to the beginning."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Asked for directly: the consumer's own refresh covers only topics it already has.
        cluster = await ask_broker(consumer._client, [topic])
        parts = cluster.partitions_for_topic(topic)
        if parts:
            break
        if time.monotonic() > deadline:
            raise KafkaError(f"topic {topic!r} does not exist; run `scoremesh dev up`")
        await asyncio.sleep(0.5)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def read_to_end(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    handle: Callable[[ConsumerRecord[bytes, bytes]], None],
    timeout_s: float = 60.0,
) -> int:
    """Consume assigned partitions until each position reaches its high watermark.

    Uses the high watermark a fetch response reports rather than ``end_offsets()``,
    which some Kafka-compatible brokers answer wrongly (see MEASURED.md).
    """
    deadline = time.monotonic() + timeout_s
    count = 0
    while True:
        batches = await consumer.getmany(*tps, timeout_ms=200)
        for records in batches.values():
            for record in records:
                handle(record)
                count += 1
        done = True
        for tp in tps:
            hw = consumer.highwater(tp)
            if hw is None or await consumer.position(tp) < hw:
                done = False
                break
        if done:
            return count
        if time.monotonic() > deadline:
            raise KafkaError(f"could not read {tps[0].topic} to its end in {timeout_s:.0f}s")


async def true_end_offsets(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """End offsets from fetch high watermarks (``end_offsets()`` can be wrong, MEASURED.md).

    Leaves the consumer positioned at those ends.
    """
    approx = await consumer.end_offsets(list(tps))
    ends: dict[TopicPartition, int] = {}
    for tp in tps:
        consumer.seek(tp, max(0, approx[tp] - 1))
    pending = set(tps)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        await consumer.getmany(*pending, timeout_ms=200, max_records=1)
        for tp in list(pending):
            hw = consumer.highwater(tp)
            if hw is not None:
                ends[tp] = hw
                pending.discard(tp)
    for tp in tps:
        ends.setdefault(tp, approx[tp])
        consumer.seek(tp, ends[tp])
    return ends


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


async def enqueue_records(
    producer: AIOKafkaProducer,
    records: Iterable[tuple[str, int | None, bytes | None, bytes | None]],
    *,
    close_batches: bool = False,
    on_too_large: Callable[[str, bytes | None], None] | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
) -> tuple[list[asyncio.Future[Any]], int]:
    """Hand the records to the producer in per-partition batches; returns the batches'
    acknowledgement futures (not awaited) and the number of records enqueued.

    Order is kept within each partition, and across calls. ``close_batches``: the records
    are a complete unit (a processed batch), so the producer sends them at once instead of
    lingering ``linger_ms`` for more records that will not come. A record larger than an
    empty batch raises ValueError, or, with ``on_too_large``, is handed to it and skipped.
    ``headers``: each record's Kafka headers, when any record has some.
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
        if batch.append(key=key, value=value, timestamp=None, headers=extra) is None:
            if tp not in empty:  # full: send it, and try the record in a fresh one
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = open_batches[tp] = producer.create_batch()
                empty.add(tp)
            if batch.append(key=key, value=value, timestamp=None, headers=extra) is None:
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
