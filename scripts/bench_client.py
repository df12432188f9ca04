"""The client's event producers against bare producers doing the same work, on the embedded
broker, in paired rounds.

Each round sends the same N events (Avro single-object, keyed by entity_id, placed by
murmur2, acks=all, linger 5 ms, 256 KiB batches, every acknowledgement awaited), each phase
to a fresh topic of 6 partitions:

- aiokafka: a bare AIOKafkaProducer with fastavro encoding (header + ``schemaless_writer``)
  and ``send()`` per event in the same loop, against the client's ``EventProducer`` —
  ``send_many`` (batches of 1,000, as a producer of a stream would call it) and ``send``
  per event;
- confluent-kafka: a bare Producer (``partitioner=murmur2_random``) with the same fastavro
  encoding and ``produce()`` per event, against the client's ``EventProducer.send_many``.

The phases of a round run back to back, their order reversed every other round; a round's
ratio is client events/s over bare events/s, and the report gives the median of the rounds'
ratios (min and max too). Target: the client's aiokafka producer at >= 0.9 of the bare one.

    python scripts/bench_client.py [--events 50000] [--rounds 3] [--output bench-results/client.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import confluent_kafka
import fastavro
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scoremesh.client import ClientConfig, Event, aio, confluent
from scoremesh.contract.codec import codec
from services.common.devstack import broker_binary, free_port, port_open

TARGET_RATIO = 0.9
PARTITIONS = 6
LINGER_MS = 5
BATCH_BYTES = 256 * 1024
CHUNK = 1_000


def make_events(n: int) -> list[Event]:
    return [
        {
            "event_id": f"evt-{i}",
            "entity_id": f"cust-{i % 5000}",
            "event_time": 1_767_225_600_000 + i,
            "features": {
                "salary": 20_000.0 + (i * 37) % 130_000,
                "commission": None if i % 3 else 5_000.0,
                "age": 20 + i % 60,
                "elevel": i % 5,
                "car": 1 + i % 20,
                "zipcode": i % 9,
                "hvalue": 50_000.0 + (i * 91) % 900_000,
                "hyears": 1 + i % 30,
                "loan": float((i * 53) % 500_000),
            },
            "attributes": {"channel": ("web", "app", "branch")[i % 3]},
        }
        for i in range(n)
    ]


class Broker:
    """A private tansu broker for the run."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"tansu did not start (log: {log})")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def with_topic(bootstrap: str, name: str, phase: Callable[[str], Awaitable[float]]) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        try:
            return await phase(name)
        finally:
            await admin.delete_topics([name])
    finally:
        await admin.close()


def fastavro_encoder() -> Callable[[Any], bytes]:
    current = codec(Event).current
    header = b"\xc3\x01" + current.fingerprint
    schema = current.parsed

    def encode(event: Any) -> bytes:
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, schema, event)
        return buf.getvalue()

    return encode


async def bare_aiokafka(bootstrap: str, topic: str, events: list[Event]) -> float:
    encode = fastavro_encoder()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=LINGER_MS, max_batch_size=BATCH_BYTES
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = []
        for event in events:
            value = encode(event)
            futures.append(await producer.send(topic, value, key=event["entity_id"].encode()))
        await asyncio.gather(*futures)
        return len(events) / (time.perf_counter() - started)
    finally:
        await producer.stop()


def client_config(bootstrap: str, topic: str) -> ClientConfig:
    # the client writes to catalog topics under a prefix: this run's topic is "<prefix>events.raw"
    return ClientConfig(
        bootstrap=bootstrap,
        topic_prefix=topic.removesuffix("events.raw"),
        idempotence=False,  # the embedded broker has no idempotent producer
        linger_ms=LINGER_MS,
        max_batch_bytes=BATCH_BYTES,
    )


async def client_aiokafka(bootstrap: str, topic: str, events: list[Event], many: bool) -> float:
    async with aio.EventProducer(client_config(bootstrap, topic)) as producer:
        await producer.partitions()  # metadata first, as the bare producer's first send does
        started = time.perf_counter()
        if many:
            for i in range(0, len(events), CHUNK):
                await producer.send_many(events[i : i + CHUNK])
        else:
            futures = [await producer.send(event) for event in events]
            await asyncio.gather(*futures)
        return len(events) / (time.perf_counter() - started)


def bare_confluent(bootstrap: str, topic: str, events: list[Event]) -> float:
    encode = fastavro_encoder()
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": LINGER_MS,
            "batch.size": BATCH_BYTES,
            "partitioner": "murmur2_random",
        }
    )
    producer.list_topics(topic, timeout=10)
    started = time.perf_counter()
    for event in events:
        value = encode(event)
        while True:
            try:
                producer.produce(topic, value, event["entity_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise SystemExit("bare confluent producer: records left unacknowledged")
    return len(events) / (time.perf_counter() - started)


def client_confluent(bootstrap: str, topic: str, events: list[Event]) -> float:
    with confluent.EventProducer(client_config(bootstrap, topic)) as producer:
        started = time.perf_counter()
        for i in range(0, len(events), CHUNK):
            producer.send_many(events[i : i + CHUNK])
        return len(events) / (time.perf_counter() - started)


async def run_round(bootstrap: str, events: list[Event], index: int) -> dict[str, float]:
    phases: list[tuple[str, Callable[[str], Awaitable[float]]]] = [
        ("aiokafka_bare", lambda t: bare_aiokafka(bootstrap, t, events)),
        ("aiokafka_client_send_many", lambda t: client_aiokafka(bootstrap, t, events, True)),
        ("aiokafka_client_send", lambda t: client_aiokafka(bootstrap, t, events, False)),
        ("confluent_bare", lambda t: asyncio.to_thread(bare_confluent, bootstrap, t, events)),
        ("confluent_client", lambda t: asyncio.to_thread(client_confluent, bootstrap, t, events)),
    ]
    if index % 2:
        phases.reverse()
    rates: dict[str, float] = {}
    for name, phase in phases:
        topic = f"bench-{index}-{name}.events.raw"
        rates[name] = round(await with_topic(bootstrap, topic, phase))
        print(f"round {index + 1}: {name} {rates[name]:,} events/s", file=sys.stderr)
    return rates


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    events = make_events(args.events)
    await with_topic(  # warm-up: connections, codecs, the broker's first topic
        bootstrap,
        "bench-warmup.events.raw",
        lambda t: client_aiokafka(bootstrap, t, events[:5000], True),
    )
    rounds = [await run_round(bootstrap, events, i) for i in range(args.rounds)]
    ratios = {
        "aiokafka_send_many_vs_bare": [
            r["aiokafka_client_send_many"] / r["aiokafka_bare"] for r in rounds
        ],
        "aiokafka_send_vs_bare": [r["aiokafka_client_send"] / r["aiokafka_bare"] for r in rounds],
        "confluent_send_many_vs_bare": [
            r["confluent_client"] / r["confluent_bare"] for r in rounds
        ],
    }
    headline = statistics.median(ratios["aiokafka_send_many_vs_bare"])
    return {
        "benchmark": "client event producers vs bare producers with fastavro encoding",
        "events_per_phase": args.events,
        "rounds": rounds,
        "rates_median": {
            name: round(statistics.median(r[name] for r in rounds)) for name in rounds[0]
        },
        "ratios": {name: summary(values) for name, values in ratios.items()},
        "target": {
            "aiokafka_send_many_vs_bare": TARGET_RATIO,
            "met": headline >= TARGET_RATIO,
        },
        "settings": {
            "partitions": PARTITIONS,
            "linger_ms": LINGER_MS,
            "batch_bytes": BATCH_BYTES,
            "send_many_chunk": CHUNK,
            "acks": "all",
            "idempotence": False,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "confluent_kafka": confluent_kafka.version(),
            "librdkafka": confluent_kafka.libversion()[0],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-results/client.json"))
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds: at least 3 (the report is a median of paired rounds)")
    if args.events < 5_000:
        parser.error("--events: at least 5000 (shorter phases measure start-up, not sending)")
    broker = Broker(Path(tempfile.mkdtemp(prefix="bench-client-")) / "tansu.log")
    try:
        report = asyncio.run(run(args, broker.bootstrap))
    finally:
        broker.stop()
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
