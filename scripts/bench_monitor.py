"""Monitor benchmark on the embedded stack: does the monitor keep up with the scorer?

One run, on a 20-feature model (18 numeric, 2 categorical) trained here with the real
pipeline and registered as champion:

1. scorer - N checked events are pre-produced into events.valid; ScorerService (in-process,
   with the Redis query store) drains them into predictions: the rate to keep up with;
2. monitor, one process - MonitorService (in-process, default policy: ADWIN on every
   numeric feature, score and confidence, the categorical test, windows of 5,000 tested
   every 1,000) drains those N predictions;
3. monitor, two processes - when one process is slower than the scorer: two worker
   processes in one consumer group (three partitions each) drain a copy of the
   predictions, produced once both have their partitions.

Throughput is timed from the first batch to the moment every input is committed (the loop
commits after its outputs are acknowledged). The monitor's per-event CPU cost without
Kafka (MonitorCore.process on batches of 512) is measured too.

    python scripts/bench_monitor.py [--events 50000] [--output bench-results/monitor.json]
"""

# ruff: noqa: E402 - SCOREMESH_HOME must be set before anything from services is imported

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCH_HOME = Path(
    os.environ.get("SCOREMESH_BENCH_HOME") or tempfile.mkdtemp(prefix="scoremesh-bmon-")
)
os.environ["SCOREMESH_HOME"] = str(BENCH_HOME)

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, RuleSet
from services.common.batchloop import BatchLoop, Out, ProcessFn, Record
from services.common.devstack import DevStack
from services.common.kafka import (
    assign_all,
    client_options,
    ensure_topics,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
)
from services.common.lifecycle import Service
from services.common.policies.monitor import MonitorPolicy
from services.common.registration import register_version
from services.common.settings import Settings
from services.monitor.service import MonitorService
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.pipeline import builtin_recipe, train

log = logging.getLogger("bench_monitor")
ROOT = Path(__file__).resolve().parents[1]

SEED = 2026
N_NUMERIC = 18
CATEGORIES = (5, 9)
CORE_BATCH = 512
KeyValue = tuple[bytes | None, bytes]


def say(text: str) -> None:
    print(f"[bench-monitor {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- a 20-feature model -----------------------------------------------------------------

SPEC = FeatureSpec(
    features=[
        FeatureRule(name=f"x{j:02d}", dtype="double", min=-1_000, max=1_000)
        for j in range(N_NUMERIC)
    ]
    + [
        FeatureRule(name=f"c{k}", dtype="long", categories=list(range(n)))
        for k, n in enumerate(CATEGORIES)
    ],
    classes=["0", "1"],
    positive_class="1",
    segments=["channel"],
)


def events(n: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    rng = np.random.default_rng(seed)
    means = np.linspace(-5, 5, N_NUMERIC)
    numeric = rng.normal(means, 2.0, size=(n, N_NUMERIC))
    cats = [rng.integers(0, k, size=n) for k in CATEGORIES]
    logit = numeric[:, :4] @ np.array([0.8, -0.5, 0.3, 0.2]) + 0.3 * cats[0] - 0.6
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    out = []
    for i in range(n):
        features: dict[str, Any] = {f"x{j:02d}": float(numeric[i, j]) for j in range(N_NUMERIC)}
        features |= {f"c{k}": int(cats[k][i]) for k in range(len(CATEGORIES))}
        out.append(
            {
                "event_id": f"bm-{seed}-{i}",
                "entity_id": f"cust-{i % 5000}",
                "event_time": 1_767_225_600_000 + i * 10,
                "features": features,
                "attributes": {"channel": ("web", "branch", "partner")[i % 3]},
            }
        )
    return out, [str(v) for v in labels]


# --- helpers ----------------------------------------------------------------------------


async def produce(settings: Settings, topic: str, items: Sequence[KeyValue]) -> float:
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "bench-producer", settings)
    started = time.perf_counter()
    try:
        futures: list[asyncio.Future[Any]] = []
        for key, value in items:
            futures.append(await producer.send(topic, value, key=key))
            if len(futures) >= 5_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(items) / (time.perf_counter() - started)


async def read_all(settings: Settings, name: str) -> list[KeyValue]:
    consumer = make_consumer(settings, group_id=None, max_poll_records=5_000)
    await start_with_retry(consumer.start, "bench-reader", settings)
    out: list[KeyValue] = []
    try:
        tps = await assign_all(consumer, settings.topic(name))
        await read_to_end(consumer, tps, lambda r: out.append((r.key, r.value or b"")), 120)
    finally:
        await consumer.stop()
    return out


class Probe:
    """When the first batch arrived, and how many inputs are committed (see bench_pipeline)."""

    def __init__(self, loop: BatchLoop) -> None:
        self.loop = loop
        self.first: float | None = None
        self.cpu_first: float | None = None
        self.cumulative = [0]
        self._inner: ProcessFn = loop.process
        loop.process = self._process

    async def _process(self, records: list[Record]) -> list[Out]:
        if self.first is None:
            self.first, self.cpu_first = time.perf_counter(), time.process_time()
        self.cumulative.append(self.cumulative[-1] + len(records))
        return await self._inner(records)

    def committed(self) -> int:
        return self.cumulative[min(self.loop.batches, len(self.cumulative) - 1)]


async def drain(
    probe: Probe, total: int, task: asyncio.Task[None], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while probe.committed() < total:
        if task.done():
            raise RuntimeError(f"{probe.loop.service} stopped early") from task.exception()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{probe.loop.service}: {probe.committed()}/{total} after {timeout_s}s"
            )
        await asyncio.sleep(0.002)
    assert probe.first is not None and probe.cpu_first is not None
    wall = time.perf_counter() - probe.first
    cpu = time.process_time() - probe.cpu_first
    return {
        "events": total,
        "seconds": round(wall, 3),
        "events_per_s": round(total / wall, 1),
        "process_cpu_us_per_event": round(cpu / total * 1e6, 1),
        "batches": probe.loop.batches,
    }


@contextlib.asynccontextmanager
async def running(service: Service) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    await service.start()
    task = asyncio.create_task(service.run(stop), name=f"{service.name}-run")
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 30)
        await asyncio.wait_for(service.stop(), 30)


async def register_champion(settings: Settings, trained: Any) -> None:
    async with running(RegistryService(settings)):
        result = await register_version(
            settings,
            settings.model_name,
            "1.0.0",
            trained.onnx,
            SPEC,
            metadata=trained.metadata,
            actor="bench",
            reason="bench_monitor",
            stage="champion",
        )
    if result.promotion is None or result.promotion["outcome"] != "applied":
        raise RuntimeError(f"could not register the bench model: {result.outcome}")


def core_cost(service: MonitorService, settings: Settings, items: Sequence[KeyValue]) -> float:
    """µs per prediction of MonitorCore.process alone, on fresh state, batches of 512."""
    from aiokafka import ConsumerRecord

    topic = settings.topic("predictions")
    records = [
        ConsumerRecord(topic, i % 6, i // 6, 0, 0, k, v, None, 0, len(v), [])
        for i, (k, v) in enumerate(items)
    ]
    core = type(service.core)(settings, service.policy)
    core.registry = dict(service.core.registry)
    started = time.process_time()
    for start in range(0, len(records), CORE_BATCH):
        core.process(records[start : start + CORE_BATCH])
    return round((time.process_time() - started) / len(records) * 1e6, 2)


# --- two monitor processes --------------------------------------------------------------


async def worker(settings_json: str) -> None:
    """One monitor process: prints its assignment, its first batch and its progress."""
    settings = Settings(**json.loads(settings_json))
    service = MonitorService(settings, MonitorPolicy(lag_interval_s=0))
    probe = Probe(service.loop)
    async with running(service) as task:
        reported = None
        while not task.done():
            assigned = sorted(
                tp.partition for tp in service.loop.assigned if tp.topic.endswith("predictions")
            )
            state = (assigned, probe.first is not None)
            if state != reported:
                first = None
                if probe.first is not None:
                    first = time.time() - (time.perf_counter() - probe.first)
                print(
                    json.dumps({"assigned": assigned, "at": time.time(), "first": first}),
                    flush=True,
                )
                reported = state
            await asyncio.sleep(0.05)


async def committed_predictions(settings: Settings, group: str, tps: list[TopicPartition]) -> int:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=30_000)
    await start_with_retry(admin.start, "bench-admin", settings)
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return sum(max(0, m.offset) for m in offsets.values())


def spawn_workers(settings: Settings, n: int) -> list[subprocess.Popen[str]]:
    blob = json.dumps(settings.model_dump(mode="json", exclude_none=True))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", blob],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]


async def two_processes(
    settings: Settings, trained: Any, items: Sequence[KeyValue], timeout_s: float
) -> dict[str, Any]:
    """Two monitor processes started together on pre-filled predictions (one group)."""
    await ensure_topics(settings)
    await register_champion(settings, trained)
    await produce(settings, settings.topic("predictions"), items)
    procs = spawn_workers(settings, 2)
    firsts: list[float] = []
    assignments: list[list[int]] = [[], []]
    settled: list[float] = []  # when both workers held 3 partitions each (final split)

    async def follow(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                return
            info = json.loads(line)
            assignments[i] = info["assigned"]
            if info["first"]:
                firsts.append(info["first"])
            if sorted(len(a) for a in assignments) == [3, 3]:
                settled.append(info["at"])

    readers = [asyncio.create_task(follow(i, p)) for i, p in enumerate(procs)]
    tps = [TopicPartition(settings.topic("predictions"), p) for p in range(6)]
    group = f"{settings.topic_prefix}scoremesh-monitor"
    progress: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while (done := await committed_predictions(settings, group, tps)) < len(items):
            progress.append((time.time(), done))
            if time.monotonic() > deadline:
                raise TimeoutError(f"two monitors committed {done}/{len(items)}")
            await asyncio.sleep(0.05)
        end = time.time()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 20)
        for r in readers:
            r.cancel()
    wall = end - min(firsts)
    steady: dict[str, Any] | None = None
    if settled:
        since = max(settled[0], min(firsts))
        before = [n for t, n in progress if t <= since]
        start_count = before[-1] if before else 0
        if len(items) - start_count >= 5_000:
            steady = {
                "events": len(items) - start_count,
                "seconds": round(end - since, 3),
                "events_per_s": round((len(items) - start_count) / (end - since), 1),
            }
    return {
        "processes": 2,
        "partitions_at_end": assignments,
        "events": len(items),
        "seconds": round(wall, 3),
        "events_per_s": round(len(items) / wall, 1),
        "after_the_split": steady,
        "note": "workers started together on pre-filled predictions; events_per_s is timed "
        "from the first batch of either to every offset committed (includes the group's "
        "rebalance when the second worker joins); after_the_split from the moment both "
        "held 3 partitions",
    }


# --- the run ----------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, base: Settings) -> dict[str, Any]:
    run_id = str(int(time.time()))
    say("training the 20-feature model ...")
    rows, labels = events(4_000, seed=SEED)
    trained = train(
        SPEC,
        [e["features"] for e in rows],
        labels,
        recipe=builtin_recipe(),
        seed=SEED,
        cv_folds=2,
        dataset="bench",
    )
    settings = base.model_copy(update={"topic_prefix": f"bmon-{run_id}.a."})
    await ensure_topics(settings)
    await register_champion(settings, trained)
    stream, _ = events(args.events, seed=SEED + 1)
    rules = RuleSet([SPEC], "credit@1.0.0#g2")
    event_codec = codec("Event")
    checked = []
    for e in stream:
        result = rules.check(e)
        assert result.event is not None, result.rejections
        checked.append((e["entity_id"].encode(), event_codec.encode(result.event)))
    await produce(settings, settings.topic("events.valid"), checked)

    say(f"scorer: {args.events} events, 20 features ...")
    scorer = ScorerService(settings)
    probe = Probe(scorer.loop)
    async with running(scorer) as task:
        scored = await drain(probe, args.events, task, args.timeout)
    say(f"  {scored['events_per_s']:.0f} events/s")

    say("monitor, one process ...")
    monitor = MonitorService(settings, MonitorPolicy())
    probe = Probe(monitor.loop)
    async with running(monitor) as task:
        monitored = await drain(probe, args.events, task, args.timeout)
    predictions = await read_all(settings, "predictions")
    monitored["core_cpu_us_per_event"] = core_cost(
        monitor, settings, predictions[: 20 * CORE_BATCH]
    )
    monitored["alerts"] = len(await read_all(settings, "alerts"))
    say(
        f"  {monitored['events_per_s']:.0f} events/s ({monitored['core_cpu_us_per_event']} µs/event core)"
    )

    report: dict[str, Any] = {
        "features": len(SPEC.features),
        "events": args.events,
        "scorer_eps": scored["events_per_s"],
        "monitor_eps": monitored["events_per_s"],
        "monitor_keeps_up_with_one_process": monitored["events_per_s"] >= scored["events_per_s"],
        "phases": {"scorer": scored, "monitor_1_process": monitored},
    }
    if not report["monitor_keeps_up_with_one_process"] or args.always_two:
        say("monitor, two processes on separate partitions ...")
        two = await two_processes(
            base.model_copy(update={"topic_prefix": f"bmon-{run_id}.b."}),
            trained,
            predictions,
            args.timeout,
        )
        say(f"  {two['events_per_s']:.0f} events/s")
        report["phases"]["monitor_2_processes"] = two
        report["monitor_2_processes_eps"] = two["events_per_s"]
        report["monitor_keeps_up_with_two_processes"] = (
            two["events_per_s"] >= scored["events_per_s"]
        )
    report["machine"] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "broker": "tansu (embedded)",
        "services": "in-process (scorer, monitor 1), subprocesses (monitor 2)",
    }
    report["settings"] = {
        k: getattr(base, k)
        for k in ("kafka_fetch_max_wait_ms", "batch_max_records", "onnx_threads")
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--output", type=Path, default=Path("bench-results/monitor.json"))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--always-two", action="store_true", help="measure two processes anyway")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runner: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    if args.worker:
        runner(worker(args.worker))
        return 0
    stack = DevStack(BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    try:
        say("starting the embedded stack ...")
        state, _ = stack.up()
        settings = stack.settings.model_copy(
            update=state.settings_overrides()
            | {
                "redis_key_prefix": f"scoremesh-bmon-{os.getpid()}:",
                "redis_prediction_ttl_s": 600,
                "artifact_dir": BENCH_HOME / "artifacts",
                "metrics_port": 0,
            }
        )
        report = runner(run_all(args, settings))
    finally:
        stack.down()
        shutil.rmtree(BENCH_HOME, ignore_errors=True)
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
