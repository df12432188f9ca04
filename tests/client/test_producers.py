"""The client's producers and consumers against the embedded broker: values decode, keys
follow the catalog, labels land on murmur2(event_id), offsets commit after processing,
and mistakes say what is wrong."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import TopicPartition

from scoremesh.client import (
    ClientConfig,
    ClientError,
    EncodeError,
    Event,
    KafkaUnavailable,
    Label,
    Prediction,
    TopicName,
    UndecodableRecord,
    aio,
    confluent,
    decode,
    encode,
    encode_json,
    partition_for,
)
from services.common.devstack import free_port
from services.common.kafka import assign_all, client_config, make_consumer, start_with_retry
from services.common.settings import Settings
from tests.contract.samples import SAMPLES
from tests.helpers import produce

pytestmark = pytest.mark.integration


def events(n: int, tag: str) -> list[Event]:
    return [
        {
            "event_id": f"{tag}-{i}",
            "entity_id": f"cust-{i % 7}",
            "event_time": 1_767_225_600_000 + i,
            "features": {"salary": 1000.0 + i, "tier": "gold", "vip": i % 2 == 0},
        }
        for i in range(n)
    ]


def labels(n: int, tag: str) -> list[Label]:
    return [
        {"event_id": f"{tag}-{i}", "value": str(i % 2), "label_time": 1_767_225_700_000 + i}
        for i in range(n)
    ]


async def raw_records(settings: Settings, topic: TopicName, n: int) -> list[Any]:
    """The first ``n`` records of a topic as the broker holds them (partition included)."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "test", settings)
    out: list[Any] = []
    try:
        tps = await assign_all(consumer, settings.topic(topic))
        async with asyncio.timeout(60):
            while len(out) < n:
                for records in (await consumer.getmany(*tps, timeout_ms=300)).values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


def check_placement(records: list[Any], key_field: str, topic: TopicName) -> None:
    for r in records:
        value = decode(topic, r.value)  # type: ignore[call-overload]
        assert r.key == value[key_field].encode()
        assert r.partition == partition_for(value[key_field], 6)


async def test_aiokafka_producers_encode_key_and_partition(settings: Settings) -> None:
    config = client_config(settings)
    async with aio.EventProducer(config) as producer:
        assert await producer.send_many(events(40, "a")) == 40
        await (await producer.send(events(1, "single")[0]))
    async with aio.EventProducer(config, value_format="json") as producer:
        assert await producer.send_many(events(3, "json")) == 3
    async with aio.LabelProducer(config) as producer:
        assert await producer.send_many(labels(60, "a")) == 60
    raw_events = await raw_records(settings, "events.raw", 44)
    check_placement(raw_events, "entity_id", "events.raw")
    assert sum(r.value.startswith(b"{") for r in raw_events) == 3
    raw_labels = await raw_records(settings, "labels", 60)
    check_placement(raw_labels, "event_id", "labels")
    assert {decode("labels", r.value)["event_id"] for r in raw_labels} == {
        f"a-{i}" for i in range(60)
    }


async def test_confluent_producers_place_labels_by_murmur2_not_crc32(settings: Settings) -> None:
    config = client_config(settings)
    with confluent.LabelProducer(config) as producer:
        assert producer.send_many(labels(60, "c")) == 60
        producer.send(labels(61, "c")[60])
    with confluent.EventProducer(config) as producer:
        assert producer.send_many(events(20, "c")) == 20
    check_placement(await raw_records(settings, "labels", 61), "event_id", "labels")
    check_placement(await raw_records(settings, "events.raw", 20), "entity_id", "events.raw")


def prediction(i: int) -> Prediction:
    return {**SAMPLES["Prediction"], "event_id": f"p-{i}"}  # type: ignore[typeddict-item]


async def test_consumers_yield_typed_records_and_commit_after_processing(
    settings: Settings,
) -> None:
    await produce(
        settings,
        "predictions",
        [(f"p-{i}".encode(), encode("predictions", prediction(i))) for i in range(30)],
    )
    config = client_config(settings)
    group = f"g-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    async with aio.PredictionConsumer(config, group_id=group) as consumer:
        async for p in consumer:
            seen.append(p["event_id"])
            if len(seen) == 10:
                break  # the tenth is processed: its offset is committed at stop
    async with aio.PredictionConsumer(config, group_id=group, idle_timeout_s=2) as consumer:
        rest = [p["event_id"] async for p in consumer]
    assert sorted(seen + rest) == sorted(f"p-{i}" for i in range(30))

    def read_with_confluent() -> list[str]:
        with confluent.PredictionConsumer(config, group_id=group + "c", idle_timeout_s=2) as c:
            return [p["event_id"] for p in c]

    assert sorted(await asyncio.to_thread(read_with_confluent)) == sorted(
        f"p-{i}" for i in range(30)
    )


async def test_an_undecodable_record_stops_the_consumer_unless_taken(settings: Settings) -> None:
    await produce(
        settings,
        "predictions",
        [(b"p-0", encode("predictions", prediction(0))), (b"junk", b"\xc3\x01" + b"\x00" * 9)],
    )
    config = client_config(settings)
    with pytest.raises(UndecodableRecord, match="unknown schema fingerprint") as caught:
        async with aio.PredictionConsumer(config, group_id="g-strict") as consumer:
            async for _ in consumer:
                pass
    assert caught.value.topic == settings.topic("predictions")
    skipped: list[UndecodableRecord] = []
    async with aio.PredictionConsumer(
        config, group_id="g-lenient", idle_timeout_s=1.5, on_undecodable=skipped.append
    ) as consumer:
        assert [p["event_id"] async for p in consumer] == ["p-0"]
    assert [(s.partition, s.offset) for s in skipped] == [(partition_for("junk", 6), 0)]

    def confluent_strict() -> None:
        with confluent.PredictionConsumer(config, group_id="g-strict-c", idle_timeout_s=5) as c:
            for _ in c:
                pass

    with pytest.raises(UndecodableRecord):
        await asyncio.to_thread(confluent_strict)


async def test_mistakes_are_refused_with_a_reason(settings: Settings) -> None:
    config = client_config(settings)
    with pytest.raises(ClientError, match="not JSON"):
        encode_json("predictions", {})  # type: ignore[call-overload]
    with pytest.raises(ClientError, match="murmur2"):
        confluent.LabelProducer(config, extra={"partitioner": "consistent_random"})
    with pytest.raises(ClientError, match="group_id"):
        aio.PredictionConsumer(config, group_id="")
    async with aio.LabelProducer(config) as producer:
        with pytest.raises(EncodeError, match="keyed by 'event_id'"):
            await producer.send_many([*labels(2, "x"), {"value": "1", "label_time": 1}])  # type: ignore[typeddict-item]
    with pytest.raises(ClientError, match=r"topic 'nope\.labels' not found"):
        confluent.LabelProducer(config.replace(topic_prefix="nope.", connect_timeout_s=5)).start()
    nowhere = ClientConfig(bootstrap=f"127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    with pytest.raises(KafkaUnavailable, match="did not answer"):
        confluent.EventProducer(nowhere).start()
    with pytest.raises(KafkaUnavailable, match="SCOREMESH_KAFKA_BOOTSTRAP"):
        await aio.EventProducer(nowhere).start()
    assert not await labels_received(settings)


async def labels_received(settings: Settings) -> bool:
    """Whether ``labels`` holds anything (a refused batch must have sent nothing)."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "test", settings)
    try:
        tps = await assign_all(consumer, settings.topic("labels"))
        batches = await consumer.getmany(*tps, timeout_ms=1000)
        return any(batches.values()) or any(
            (consumer.highwater(TopicPartition(tp.topic, tp.partition)) or 0) > 0 for tp in tps
        )
    finally:
        await consumer.stop()
