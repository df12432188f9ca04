"""Kafka wiring shared by every service: clients, topic creation, reading to the end.

Dev-broker workarounds live in settings (the dev-stack file) and here in reading
helpers that are correct on any broker; product logic never special-cases tansu.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    BrokerResponseError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IncompatibleBrokerVersion,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
)
from pydantic import SecretStr

from scoremesh.client.aio import NO_HEADERS as NO_HEADERS
from scoremesh.client.aio import aiokafka_options
from scoremesh.client.aio import enqueue_records as enqueue_records
from scoremesh.client.aio import send_records as send_records
from scoremesh.client.aio import start_with_retry as retry_start
from scoremesh.client.config import ENV_NAMES, ClientConfig
from scoremesh.client.errors import KafkaUnavailable as KafkaUnavailable
from scoremesh.client.retry import Backoff
from scoremesh.contract.catalog import TopicSpec, catalog
from scoremesh.contract.topics import TopicName
from services.common.metrics import KAFKA_UP
from services.common.settings import ConfigError, Settings

log = logging.getLogger(__name__)


class BrokerRefused(ConfigError):
    """The broker answered, but refused what the client asked for: no retry changes that,
    a setting (ours or the cluster's) does. The message names the request and the setting."""


def client_config(settings: Settings) -> ClientConfig:
    """The client library's view of the settings (one mapping, ``ENV_NAMES``)."""
    values: dict[str, Any] = {}
    for name, setting in ENV_NAMES.items():
        value = getattr(settings, setting)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, Path):
            value = str(value)
        values[name] = value
    values["bootstrap"] = settings.require_bootstrap()
    return ClientConfig(**values)


def client_options(settings: Settings) -> dict[str, Any]:
    return aiokafka_options(client_config(settings))


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
    """Start a client, retrying with capped exponential backoff and saying so in the log.

    A refusal (see ``refusal``) is not retried: it raises BrokerRefused at once.
    """

    async def start_or_refuse() -> None:
        try:
            await start()
        except (KafkaError, OSError) as exc:
            refused = refusal(exc, what, settings, start)
            if refused is None:
                raise  # silence or a passing error: the retry loop's business
            await _close_quietly(start)
            raise refused from exc

    await retry_start(
        start_or_refuse, what, settings.kafka_bootstrap, settings.kafka_connect_timeout_s, stop
    )


_REFUSALS: tuple[type[Exception], ...] = (
    BrokerResponseError,
    IncompatibleBrokerVersion,
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
)


_AUTHENTICATION = (
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
)


def refusal(
    exc: BaseException, what: str, settings: Settings, start: Callable[..., Any] | None = None
) -> BrokerRefused | None:
    """The broker's answer explained, when it is a refusal rather than silence.

    A refusal (an error code in a response, an API the broker lacks, failed authentication)
    is final: retrying until the connect timeout and then saying "did not answer" would
    hide both the cause and the fix. Returns None for errors worth retrying.
    """
    if not isinstance(exc, _REFUSALS) or getattr(exc, "retriable", False):
        return None
    at = f"{what}: Kafka at {settings.kafka_bootstrap} answered but"
    name = type(exc).__name__
    if _is_init_producer_id(exc, start):
        return BrokerRefused(
            f"{at} refused an idempotent producer (InitProducerId: {name}): the broker does "
            "not support idempotent producers, or this client lacks the IdempotentWrite "
            "permission on the cluster. Set SCOREMESH_KAFKA_IDEMPOTENCE=false (at-least-once "
            "delivery; consumers deduplicate by key), or grant IdempotentWrite"
        )
    if isinstance(exc, _AUTHENTICATION):
        return BrokerRefused(
            f"{at} refused authentication ({name}: {exc}); check SCOREMESH_KAFKA_SASL_MECHANISM "
            "(the broker's), SCOREMESH_KAFKA_SASL_USERNAME and SCOREMESH_KAFKA_SASL_PASSWORD"
        )
    if isinstance(
        exc,
        TopicAuthorizationFailedError
        | GroupAuthorizationFailedError
        | ClusterAuthorizationFailedError,
    ):
        scope = {
            TopicAuthorizationFailedError: "a topic",
            GroupAuthorizationFailedError: "a consumer group",
        }.get(type(exc), "the cluster")
        return BrokerRefused(
            f"{at} refused access to {scope} ({name}): the principal "
            f"{settings.kafka_sasl_username or '(anonymous)'} lacks an ACL; grant it (the topics "
            f"are those of schemas/topics.yaml, prefixed with SCOREMESH_TOPIC_PREFIX "
            f"{settings.topic_prefix!r}) or set SCOREMESH_KAFKA_SASL_USERNAME to a principal "
            "that has it"
        )
    if isinstance(exc, IncompatibleBrokerVersion | UnsupportedVersionError):
        return BrokerRefused(
            f"{at} does not support a request this client needs ({name}: {exc}); scoremesh "
            "needs a Kafka protocol of 2.x or later"
        )
    return BrokerRefused(
        f"{at} refused the request ({name}: {exc or 'no detail'}); this is not a connection "
        "problem and retrying will not change it: check the broker's log and its limits"
    )


async def _close_quietly(start: Callable[..., Any]) -> None:
    """Release what a refused start left open (connections), so nothing leaks into the exit."""
    owner = getattr(start, "__self__", None)
    close = getattr(owner, "stop", None) or getattr(owner, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _is_init_producer_id(exc: BaseException, start: Callable[..., Any] | None) -> bool:
    """Did the broker refuse an idempotent producer's InitProducerId?"""
    if isinstance(exc, TopicAuthorizationFailedError | GroupAuthorizationFailedError):
        return False
    owner = getattr(start, "__self__", None)
    idempotent = isinstance(owner, AIOKafkaProducer) and owner._txn_manager is not None
    frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
    return "_do_init_pid" in frames or (idempotent and isinstance(exc, BrokerResponseError))


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
        backoff = Backoff(0.5, self.max_backoff_s)
        while True:
            ok = await self.probe()
            now = time.monotonic()
            if ok:
                if not self.reachable:
                    log.info(
                        "Kafka reachable again",
                        extra={"outage_s": round(now - (self.down_since or now), 1)},
                    )
                self.reachable, self.down_since = True, None
                backoff.reset()
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
            delay = backoff.next()
            log.warning(
                "Kafka not reachable, retrying",
                extra={
                    "error": self.last_error,
                    "down_for_s": round(now - (self.down_since or now), 1),
                    "retry_in_s": delay,
                },
            )
            await asyncio.sleep(delay)


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


async def send_one(
    settings: Settings,
    topic: str,
    value: bytes,
    key: bytes | None,
    what: str,
    producer: AIOKafkaProducer | None = None,
) -> None:
    """Send one record and wait for its acknowledgement: with ``producer``, or with a
    producer of its own started (``what`` names it in errors) and stopped around it."""
    if producer is not None:
        await producer.send_and_wait(topic, value, key=key)
        return
    own = make_producer(settings)
    await start_with_retry(own.start, what, settings)
    try:
        await own.send_and_wait(topic, value, key=key)
    finally:
        await own.stop()


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
    which some Kafka-compatible brokers answer wrongly (docs/benchmarks/embedded-broker.md).
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


async def seek_to_time(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], since_ms: int
) -> None:
    """Position each partition at its first record written at or after ``since_ms`` (the
    records' timestamps), or at its end when there is none.

    A broker that cannot look up by time (it answers timestamp -1, or refuses) leaves the
    partition at its end, or at the beginning when it refused: a reader that must not see
    older records checks their own times too.
    """
    ends = await true_end_offsets(consumer, tps)  # leaves every partition at its end
    try:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
    except KafkaError as exc:
        log.info(
            "time lookup refused; reading from the beginning",
            extra={"topic": tps[0].topic if tps else "", "error": str(exc)},
        )
        await consumer.seek_to_beginning(*tps)
        return
    for tp in tps:
        hit = found.get(tp)
        if hit is not None and hit.timestamp >= 0 and hit.offset < ends[tp]:
            consumer.seek(tp, hit.offset)


async def true_end_offsets(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """End offsets from fetch high watermarks (``end_offsets()`` can be wrong: docs/benchmarks/embedded-broker.md).

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
