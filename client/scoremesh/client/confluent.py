"""Producers and consumers on confluent-kafka (librdkafka; the ``[confluent]`` extra).

    with LabelProducer() as producer:               # config from SCOREMESH_* variables
        producer.send_many(labels)                  # encoded, partitioned, acknowledged

    with PredictionConsumer(group_id="fraud-cases") as predictions:
        for prediction in predictions:              # a typed Prediction
            ...

librdkafka's default partitioner is ``consistent_random`` (CRC32 of the key), not the
murmur2 of the Java client, aiokafka and faust: labels it places land on the label join's
partition about one time in six, and the join forwards the others through its repartition
topic (an extra hop each). These producers set ``partitioner=murmur2_random``, which
places every keyed record where Kafka's default partitioner (and the label join) does, and
refuse a configuration that changes it. Delivery is ``acks=all`` with idempotence unless the
config turns it off; consumers commit a record's offset only after the loop body that
received it has finished (at-least-once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Generic, Literal, TypeVar

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Producer as _Producer

from scoremesh.client._wire import (
    decode_value,
    key_of,
    value_encoder,
)
from scoremesh.client.config import ClientConfig
from scoremesh.client.errors import (
    ClientConfigError,
    ClientError,
    CodecError,
    DeliveryError,
    KafkaUnavailable,
    UndecodableRecord,
)
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
    "librdkafka_options",
]

log = logging.getLogger(__name__)
R = TypeVar("R")
PARTITIONER = "murmur2_random"  # murmur2 for keyed records, as Kafka's default partitioner


def librdkafka_options(config: ClientConfig) -> dict[str, Any]:
    """Connection options (bootstrap, client id, TLS, SASL) for any librdkafka client."""
    opts: dict[str, Any] = {
        "bootstrap.servers": config.bootstrap,
        "client.id": config.client_id,
        "security.protocol": config.security_protocol.lower(),
    }
    if config.security_protocol.startswith("SASL"):
        opts["sasl.mechanisms"] = config.sasl_mechanism or "SCRAM-SHA-512"
        opts["sasl.username"] = config.sasl_username
        opts["sasl.password"] = config.sasl_password
    for option, value in (
        ("ssl.ca.location", config.ssl_cafile),
        ("ssl.certificate.location", config.ssl_certfile),
        ("ssl.key.location", config.ssl_keyfile),
    ):
        if value:
            opts[option] = value
    return opts


def _check_topic(client: Any, topic: str, config: ClientConfig) -> int:
    """Ask the broker for the topic; its partition count, or a clear error. (All topics
    are listed, once: a request naming the topic would have some brokers create it.)"""
    try:
        metadata = client.list_topics(timeout=config.connect_timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"Kafka at {config.bootstrap} did not answer for {config.connect_timeout_s:.0f}s "
            f"({exc}); check SCOREMESH_KAFKA_BOOTSTRAP or run `scoremesh dev up`"
        ) from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ClientError(
            f"topic {topic!r} not found on {config.bootstrap}: check the topic prefix "
            "(SCOREMESH_TOPIC_PREFIX) and that the mesh's topics exist"
        )
    return len(found.partitions)


class Producer(Generic[R]):
    """Encodes records of one catalog topic and produces them, keyed as the catalog says and
    placed by murmur2 of the key. ``EventProducer`` and ``LabelProducer`` are the two a team
    needs. ``extra`` holds librdkafka settings (e.g. ``{"compression.type": "lz4"}``)."""

    topic: ClassVar[TopicName]

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        value_format: Literal["avro", "json"] = "avro",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config or ClientConfig.from_env()
        self.destination = self.config.topic(self.topic)
        self._encode = value_encoder(self.topic, value_format)
        extra = dict(extra or {})
        if extra.get("partitioner", PARTITIONER) not in (PARTITIONER, "murmur2"):
            raise ClientConfigError(
                f"partitioner {extra['partitioner']!r}: these producers place records by "
                "murmur2 of their key, where the label join reads them (any other placement "
                "costs each label a hop through label-join.repartition); leave it out"
            )
        opts = librdkafka_options(self.config)
        opts.update(
            {
                "acks": "all",
                "enable.idempotence": self.config.idempotence,
                "linger.ms": self.config.linger_ms,
                "batch.size": self.config.max_batch_bytes,
                "message.max.bytes": self.config.max_request_bytes,
                "partitioner": PARTITIONER,
            }
        )
        opts.update(extra)
        self._producer = _Producer(opts)
        self._failures: list[tuple[bytes | None, str]] = []
        self._started = False

    def start(self) -> None:
        """Check that the broker answers and the topic exists (clear errors up front rather
        than a delivery timeout minutes later)."""
        _check_topic(self._producer, self.destination, self.config)
        self._started = True

    def close(self) -> None:
        """Deliver what is buffered (raises DeliveryError if some was not acknowledged)."""
        self.flush()

    def __enter__(self) -> Producer[R]:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, record: R) -> bytes:
        return key_of(self.topic, record)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append((message.key(), str(error)))

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(self.destination, value, key, on_delivery=self._delivered)
                return
            except BufferError:  # the local queue is full: serve deliveries, then retry
                self._producer.poll(0.05)

    def send(self, record: R) -> None:
        """Encode one record and hand it to librdkafka (acknowledged by ``flush``)."""
        if not self._started:
            self.start()
        self._produce(self._key(record), self._encode(record))
        self._producer.poll(0)

    def send_many(self, records: Iterable[R]) -> int:
        """Encode every record (a bad one raises EncodeError before anything is sent),
        produce them and wait until the broker acknowledged each one. Returns the number."""
        if not self._started:
            self.start()
        out = [(self._key(r), self._encode(r)) for r in records]
        for key, value in out:
            self._produce(key, value)
        self.flush()
        return len(out)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every acknowledgement; DeliveryError names the records that failed."""
        left = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if left:
            failures.append((None, f"{left} records still unacknowledged after {timeout_s:.0f}s"))
        if failures:
            raise DeliveryError(
                f"{self.destination}: {len(failures)} records not delivered, the first: "
                f"{failures[0][1]}",
                failures,
            )


class EventProducer(Producer[Event]):
    """Events to ``events.raw``, keyed by entity_id."""

    topic = "events.raw"


class LabelProducer(Producer[Label]):
    """Labels to ``labels``, keyed by event_id and placed by murmur2 of it: the partition of
    the event's predictions, where the label join waits for it."""

    topic = "labels"


class Consumer(Generic[R]):
    """Typed records of one catalog topic, in a consumer group.

    ``for record in consumer`` yields each record; its offset is committed once the loop
    body has finished with it (at the next fetch, on a rebalance and at ``close``); leaving a
    ``with`` block normally (``break`` included) counts the last record as done, an exception
    does not.
    ``idle_timeout_s`` ends the iteration after that long without a record once partitions are
    assigned (default: never).
    A record that does not decode raises UndecodableRecord (its offset is not committed),
    unless ``on_undecodable`` takes it. ``extra`` holds librdkafka settings.
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
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not group_id:
            raise ClientError("group_id: name your application's consumer group")
        self.config = config or ClientConfig.from_env()
        self.source = self.config.topic(self.topic)
        self.idle_timeout_s = idle_timeout_s
        self.on_undecodable = on_undecodable
        self.max_records = max_records
        opts = librdkafka_options(self.config)
        opts.update(
            {
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": self.config.fetch_max_wait_ms,
                "session.timeout.ms": self.config.session_timeout_ms,
                "heartbeat.interval.ms": self.config.heartbeat_interval_ms,
            }
        )
        opts.update(extra or {})
        self._consumer = _Consumer(opts)
        self._done: dict[tuple[str, int], int] = {}
        self._pending: tuple[tuple[str, int], int] | None = None  # yielded, body running
        self._started = False

    def start(self) -> None:
        _check_topic(self._consumer, self.source, self.config)
        self._consumer.subscribe([self.source], on_revoke=self._revoked)
        self._started = True

    def close(self) -> None:
        """Commit what was processed and leave the group."""
        try:
            self.commit()
        finally:
            self._consumer.close()

    def __enter__(self) -> Consumer[R]:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and self._pending is not None:  # the body finished with it
            self._done[self._pending[0]] = self._pending[1]
        self.close()

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.commit()

    def commit(self) -> None:
        """Commit the offsets of the records processed so far."""
        if not self._done:
            return
        done, self._done = self._done, {}
        offsets = [TopicPartition(t, p, o) for (t, p), o in done.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # the partitions moved to another member, which re-reads them: at-least-once
            log.warning("commit refused", extra={"error": str(exc)})

    def __iter__(self) -> Iterator[R]:
        if not self._started:
            self.start()
        last_seen = time.monotonic()
        while True:
            self.commit()
            messages = self._consumer.consume(self.max_records, 0.2)
            if not messages:
                idle = self.idle_timeout_s
                if not self._consumer.assignment():
                    last_seen = time.monotonic()  # joining the group is not idleness
                elif idle is not None and time.monotonic() - last_seen >= idle:
                    return
                continue
            last_seen = time.monotonic()
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise ClientError(f"{self.source}: {error}")
                    log.warning("consumer error", extra={"error": str(error)})
                    continue
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                if topic is None or partition is None or offset is None:
                    continue  # only error events lack a position, and those are handled above
                try:
                    value: R = decode_value(self.topic, message.value() or b"")
                except CodecError as exc:
                    undecodable = UndecodableRecord(topic, partition, offset, exc)
                    if self.on_undecodable is None:
                        raise undecodable from exc
                    self.on_undecodable(undecodable)
                else:
                    self._pending = ((topic, partition), offset + 1)
                    yield value
                    self._pending = None
                self._done[(topic, partition)] = offset + 1


class PredictionConsumer(Consumer[Prediction]):
    """Predictions, one per (event, variant); ``served`` marks the variant that decided."""

    topic = "predictions"


class LabeledPredictionConsumer(Consumer[LabeledPrediction]):
    """Predictions joined with their label (``predictions.labeled``)."""

    topic = "predictions.labeled"


class AlertConsumer(Consumer[Alert]):
    """The monitor's alerts, firing and resolved."""

    topic = "alerts"
