"""Events and labels from stock Kafka clients with their default partitioners, as a new user
would send them: every label joins, exactly once, and none is left waiting in the join.

librdkafka (confluent-kafka) places a keyed record by CRC32 (``consistent_random``), not by
the murmur2 the join partitions by; aiokafka uses murmur2 for a keyed record and picks any
partition for one without a key. The join forwards what arrives on another partition than
its event_id's through ``label-join.repartition`` and counts it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from scoremesh.contract.codec import codec
from scoremesh.contract.partitioner import partitions_for_keys
from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry
from services.common.query_store import QueryStore
from services.common.settings import Settings
from services.label_join.join import state_record
from services.label_join.service import CHANGELOG, LabelJoinService
from services.label_join.telemetry import REPARTITIONED
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import credit_events
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, register_model

pytestmark = pytest.mark.integration

N = 240  # events per client
KeyValue = tuple[bytes | None, bytes]


def confluent_send(settings: Settings, topic: str, items: list[KeyValue]) -> list[int]:
    """Produce with librdkafka's defaults (its own partitioner); each record's partition."""
    producer = Producer({"bootstrap.servers": settings.require_bootstrap()})
    placed: list[int | None] = [None] * len(items)
    errors: list[Any] = []

    def on_delivery(i: int) -> Callable[[Any, Any], None]:
        def done(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                placed[i] = msg.partition()

        return done

    for i, (key, value) in enumerate(items):
        producer.produce(settings.topic(topic), value, key, on_delivery=on_delivery(i))
        producer.poll(0)
    assert producer.flush(30) == 0 and not errors, errors
    assert all(p is not None for p in placed)
    return [p for p in placed if p is not None]


async def aiokafka_send(settings: Settings, topic: str, items: list[KeyValue]) -> list[int]:
    """Produce with a plain aiokafka producer (its default partitioner)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.require_bootstrap())
    await producer.start()
    try:
        futures = [await producer.send(settings.topic(topic), v, key=k) for k, v in items]
        return [(await f).partition for f in futures]
    finally:
        await producer.stop()


def events_and_labels(
    seed: int, start_ms: int
) -> tuple[list[KeyValue], list[str], list[KeyValue], dict[str, str]]:
    """N events (a third Avro, a third JSON, a third JSON without event_time) keyed by
    entity_id, and a label for each (half Avro keyed by event_id, half JSON: some with no
    key, some without label_time, some with the class as a JSON number); the truth."""
    events: list[KeyValue] = []
    untimed: list[str] = []
    labels: list[KeyValue] = []
    truth: dict[str, str] = {}
    for i, (event, y) in enumerate(credit_events(N, seed=seed, start_ms=start_ms)):
        event_id = event["event_id"]
        key = event["entity_id"].encode()
        if i % 3 == 0:
            events.append((key, codec("Event").encode(event)))
        elif i % 3 == 1:
            events.append((key, orjson.dumps(event)))
        else:
            untimed.append(event_id)
            events.append(
                (key, orjson.dumps({k: v for k, v in event.items() if k != "event_time"}))
            )
        truth[event_id] = y
        label_time = start_ms + 3_600_000 + i
        if i % 2 == 0:
            lab = {"event_id": event_id, "value": y, "label_time": label_time}
            labels.append((event_id.encode(), codec("Label").encode(lab)))
        elif i % 4 == 1:
            labels.append((None, orjson.dumps({"event_id": event_id, "value": int(y)})))
        else:
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(label_time / 1000))
            raw = {"event_id": event_id, "value": y, "label_time": iso}
            labels.append((event_id.encode(), orjson.dumps(raw)))
    return events, untimed, labels, truth


async def pending_labels(settings: Settings) -> int:
    """Labels the join holds without their prediction, by its changelog (last record per
    event wins): what would wait, counted nowhere, until the window closes."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "test-changelog", settings)
    latest: dict[bytes, bytes | None] = {}
    try:
        tps = await assign_all(consumer, settings.topic(CHANGELOG))
        await read_to_end(consumer, tps, lambda r: latest.__setitem__(r.key, r.value), 30)
    finally:
        await consumer.stop()
    states = [state_record(v) for v in latest.values() if v is not None]
    return sum(1 for s in states if s.get("l") and s.get("t") is None)


async def test_stock_clients_default_partitioners_join_every_label_once(
    settings: Settings, trained_model: Any
) -> None:
    join = LabelJoinService(settings, publish_interval_s=5)
    counted = REPARTITIONED.labels("label")
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        async with (
            Running(ValidatorService(settings)),
            Running(ScorerService(settings, store=QueryStore(settings))),
            Running(join),
        ):
            clients = {
                "confluent-kafka": lambda topic, items: asyncio.to_thread(
                    confluent_send, settings, topic, items
                ),
                "aiokafka": lambda topic, items: aiokafka_send(settings, topic, items),
            }
            joined: set[str] = set()
            for round_, (client, send) in enumerate(clients.items()):
                start_ms = int(time.time() * 1000) - 3_600_000
                events, untimed, labels, truth = events_and_labels(31 + round_, start_ms)
                before = time.time() * 1000
                await send("events.raw", events)
                after = time.time() * 1000
                valid = await consume_until(
                    settings,
                    "events.valid",
                    lambda r, t=truth: len({v["event_id"] for v in r} & set(t)) == N,
                    60,
                )
                mine = {v["event_id"]: v for v in valid if v["event_id"] in truth}
                for event_id in untimed:  # the record's timestamp stood in for event_time
                    assert mine[event_id]["flags"] == ["event_time_from_record"], client
                    assert before - 1 <= mine[event_id]["event_time"] <= after + 1, client
                assert all(mine[e]["flags"] == [] for e in truth if e not in untimed)

                forwarded_before = join.repartition.forwarded["label"]
                counted_before = counted._value.get()
                placed = await send("labels", labels)
                ids = [orjson.loads(v)["event_id"] if v[:1] == b"{" else None for _, v in labels]
                ids = [
                    i if i is not None else codec("Label").decode(v)["event_id"]
                    for i, (_, v) in zip(ids, labels, strict=True)
                ]
                home = partitions_for_keys([i.encode() for i in ids], 6)
                wrong = sum(p != h for p, h in zip(placed, home, strict=True))
                assert wrong > N // 8, (client, wrong)  # the default partitioner disagrees

                joined |= set(truth)
                rows = await consume_until(
                    settings,
                    "predictions.labeled",
                    lambda r, j=joined: len({x["event_id"] for x in r}) >= len(j),
                    90,
                )
                await asyncio.sleep(1.0)  # anything counted twice would come now
                rows = await consume_until(settings, "predictions.labeled", lambda r: False, 2)
                mine_rows = [r for r in rows if r["event_id"] in truth]
                assert len(mine_rows) == N, (client, len(mine_rows))  # each exactly once
                assert {r["event_id"]: r["label"] for r in mine_rows} == truth
                assert join.repartition.forwarded["label"] - forwarded_before == wrong, client
                assert counted._value.get() - counted_before == wrong, client
                assert join.repartition.forwarded["prediction"] == 0  # the scorer's: murmur2

            examples = await consume_until(settings, "training.examples", lambda r: False, 2)
            assert sorted(e["event_id"] for e in examples) == sorted(joined)
            unmatched = await consume_until(settings, "labels.unmatched", lambda r: False, 2)
            assert unmatched == []
            assert join.core.counts["joined"] == 2 * N  # one variant: the champion
            await join.loop.settle()
            assert await pending_labels(settings) == 0
