"""Scorer benchmark on the embedded stack, in one run:

1. aiokafka passthrough (the ceiling), from bench_pipeline;
2. scorer events/s with batch sizes 1, 64 and 512 (SCOREMESH_BATCH_MAX_RECORDS);
3. added latency at 1,000 events/s: events.valid -> predictions, per event_id, with the
   scorer in its own process (`scoremesh run scorer`, as deployed), again in this process
   (sharing one event loop with the sender and the follower, as phase 2 runs it), and with
   a relay in its place (its own process): the same client settings forwarding each event
   unscored. Added latency = scorer (own process) minus relay, per percentile: what the
   broker's fetch wait and the clients cost is in the relay's figure too. The scorer's own
   time per event (consumed -> prediction queued, the prediction's latency_ms) is reported
   as well;
   The measuring clients are kept out of the figure as far as they can be: the sender has
   no linger and the follower fetches with a 5 ms wait (the scorer keeps its own settings);
   the prediction's CreateTime (stamped by the scorer's producer) gives a second figure
   that excludes the follower entirely;
4. five hot swaps under load (promote, roll back, ...): events lost (no champion prediction)
   and failed (dead-lettered by the scorer) must both be 0.

    python scripts/bench_scorer.py [--events 30000] [--output bench-results/scorer.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline as bp

from scoremesh.contract.codec import CodecError, codec
from services.common.commands import command, new_command
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.trainer.pipeline import builtin_recipe, train

TARGET_EPS = 20_000
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
SWAPS = 5


async def scorer_at_batch(
    settings: Settings, work: bp.Workload, batch: int, broker_pid: int | None, timeout_s: float
) -> dict[str, Any]:
    s = settings.model_copy(update={"batch_max_records": batch})
    n = len(work.checked) if batch > 1 else min(len(work.checked), 5_000)
    await bp.create_topics(s)
    await bp.produce(s, s.topic("events.valid"), work.checked[:n])
    await bp.bootstrap_champion(s)
    service = ScorerService(s)
    probe = bp.Probe(service.loop, broker_pid)
    async with bp.running(service) as task:
        timing = await bp.drain(probe, n, task, timeout_s)
    return {"batch_max_records": batch, "events": n, **timing}


ROOT = Path(__file__).resolve().parent.parent
SCORER_ENV = (
    "kafka_bootstrap",
    "redis_url",
    "topic_prefix",
    "redis_key_prefix",
    "redis_prediction_ttl_s",
    "artifact_dir",
    "kafka_idempotence",
    "kafka_fetch_max_wait_ms",
    "kafka_linger_ms",
    "kafka_session_timeout_ms",
    "kafka_heartbeat_interval_ms",
    "kafka_rebalance_timeout_ms",
)


RELAY_CODE = (
    "import asyncio, sys; sys.path.insert(0, 'scripts'); import bench_scorer as b; "
    "from services.common.settings import Settings; asyncio.run(b.relay(Settings()))"
)


def spawn_scorer(settings: Settings, log_path: Path, relay_only: bool) -> subprocess.Popen[bytes]:
    """`scoremesh run scorer` (or the relay) on the benchmark's broker, Redis and prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env |= {
        "SCOREMESH_HOME": str(bp.BENCH_HOME),
        "SCOREMESH_IGNORE_DEV_STACK": "1",
        "SCOREMESH_METRICS_PORT": "0",
        "SCOREMESH_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    for name in SCORER_ENV:
        env[f"SCOREMESH_{name.upper()}"] = str(getattr(settings, name))
    with log_path.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", RELAY_CODE]
            if relay_only
            else [sys.executable, "-m", "services.cli", "run", "scorer"],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


async def relay(settings: Settings) -> None:
    """The floor for the latency phase: events.valid -> predictions with the scorer's client
    settings (group consumer, fetch wait, linger) and nothing else: keyed by event_id like a
    prediction, no scoring, no Redis, acks not awaited, no commits."""
    decode = codec("Event").decode
    consumer = bp.make_consumer(
        settings,
        settings.topic("events.valid"),
        group_id=f"{settings.topic_prefix}scoremesh-relay",
    )
    producer = bp.make_producer(settings)
    await bp.start_with_retry(consumer.start, "relay-consumer", settings)
    await bp.start_with_retry(producer.start, "relay-producer", settings)
    out = settings.topic("predictions")
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    event_id = decode(record.value or b"")["event_id"]
                    await producer.send(out, record.value, key=event_id.encode())
    finally:
        await consumer.stop()
        await producer.stop()


@contextlib.asynccontextmanager
async def scorer_running(settings: Settings, where: str) -> AsyncIterator[Callable[[], None]]:
    """The scorer (in its own process or in this one) or the relay (in its own process),
    running; yields a check that raises when it died."""
    if where == "this process":
        scorer = ScorerService(settings)
        async with bp.running(scorer) as task:
            while not scorer.loop.assigned:
                bp.check_alive(task)
                await asyncio.sleep(0.05)
            yield lambda: bp.check_alive(task)
        return
    log_path = bp.BENCH_HOME / f"latency-{where.replace(' ', '-')}.log"
    proc = spawn_scorer(settings, log_path, relay_only=where == "relay")

    def alive() -> None:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the {where} process exited ({proc.returncode}):\n{tail}")

    try:
        yield alive
    finally:
        bp.stop_process(proc)


def keep_latency(scorer_ms: dict[str, float]) -> Callable[[str, bytes], None]:
    """For the follower: each prediction's own latency_ms (the relay forwards events)."""
    decode = codec("Prediction").decode

    def keep(event_id: str, value: bytes) -> None:
        with contextlib.suppress(CodecError):
            scorer_ms[event_id] = decode(value)["latency_ms"]

    return keep


async def latency(
    settings: Settings, rate: float, seconds: float, timeout_s: float, where: str
) -> dict[str, Any]:
    await bp.create_topics(settings)
    await bp.bootstrap_champion(settings)
    encode = codec("Event").encode
    items = [
        (e["event_id"], e["entity_id"].encode(), encode({**e, "rule_set": "bench", "flags": []}))
        for e, _ in credit_events(int(rate * (seconds + 1)), seed=77, id_prefix="lat")
    ]
    probes = [
        (e["event_id"], e["entity_id"].encode(), encode({**e, "rule_set": "bench", "flags": []}))
        for e, _ in credit_events(200, seed=78, id_prefix="probe")
    ]
    consumer = bp.make_consumer(settings, group_id=None, max_poll_records=5000, fetch_max_wait_ms=5)
    producer = bp.make_producer(settings, linger_ms=0)
    arrivals = bp.Arrivals()
    scorer_ms: dict[str, float] = {}
    sent: dict[str, float] = {}
    topic = settings.topic("events.valid")
    await bp.start_with_retry(consumer.start, "lat-consumer", settings)
    await bp.start_with_retry(producer.start, "lat-producer", settings)
    try:
        async with scorer_running(settings, where) as alive:
            await bp.assign_all(consumer, settings.topic("predictions"))
            follower = asyncio.create_task(
                bp.follow_predictions(consumer, arrivals, keep_latency(scorer_ms))
            )
            # ready = a probe came back scored (group joined, champion loaded)
            deadline = time.monotonic() + timeout_s
            for _event_id, key, value in probes:
                alive()
                await producer.send_and_wait(topic, value, key=key)
                await asyncio.sleep(0.2)
                if arrivals.seen or time.monotonic() > deadline:
                    break
            if not arrivals.seen:
                raise RuntimeError("the scorer scored no probe event")
            begin = time.perf_counter()
            futures = []
            for i, (event_id, key, value) in enumerate(items):
                delay = begin + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[event_id] = time.time()
                futures.append(await producer.send(topic, value, key=key))
            await asyncio.gather(*futures)
            deadline = time.monotonic() + timeout_s
            while (
                sum(e in arrivals.seen for e in sent) < len(items) and time.monotonic() < deadline
            ):
                alive()
                await asyncio.sleep(0.1)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    finally:
        await consumer.stop()
        await producer.stop()
    warm = int(rate)
    arrived = [e for e, _, _ in items[warm:] if e in arrivals.seen]
    lat = [(arrivals.seen[e][0] - sent[e]) * 1000 for e in arrived]
    produced = [arrivals.seen[e][1] - sent[e] * 1000 for e in arrived]
    return {
        "rate": rate,
        "scorer": where,
        "events": len(items) - warm,
        "received": len(lat),
        "latency_ms": bp.percentiles(lat),
        "to_prediction_created_ms": bp.percentiles(produced),
        "scorer_consumed_to_prediction_ms": bp.percentiles(
            [scorer_ms[e] for e in arrived if e in scorer_ms] or [0.0]
        ),
    }


async def hot_swaps(settings: Settings, n: int, rate: float, timeout_s: float) -> dict[str, Any]:
    """Promote and roll back SWAPS times while events stream; count lost and failed."""
    await bp.create_topics(settings)
    await bp.bootstrap_champion(settings)
    pairs = list(credit_events(3000, seed=5))
    other = await asyncio.to_thread(
        lambda: train(
            CREDIT_SPEC,
            [e["features"] for e, _ in pairs],
            [y for _, y in pairs],
            recipe=builtin_recipe(),
            seed=5,
            dataset="bench",
            cv_folds=3,
        )
    )
    from services.common.registration import register_version

    encode = codec("Event").encode
    items = [
        (e["event_id"], e["entity_id"].encode(), encode({**e, "rule_set": "bench", "flags": []}))
        for e, _ in credit_events(n, seed=78, id_prefix="swap")
    ]
    swaps: list[dict[str, Any]] = []
    async with bp.running(RegistryService(settings)) as registry_task:
        reg = await register_version(
            settings,
            settings.model_name,
            "1.0.1",
            other.onnx,
            CREDIT_SPEC,
            metadata=other.metadata,
            actor="bench",
        )
        assert reg.outcome["outcome"] == "applied", reg.outcome
        scorer = ScorerService(settings)
        async with bp.running(scorer) as scorer_task:
            while not scorer.loop.assigned:
                bp.check_alive(scorer_task, registry_task)
                await asyncio.sleep(0.05)
            producer = bp.make_producer(settings)
            await bp.start_with_retry(producer.start, "swap-producer", settings)
            try:
                begin = time.perf_counter()
                futures = []
                next_swap = n // (SWAPS + 1)
                for i, (_event_id, key, value) in enumerate(items):
                    delay = begin + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    futures.append(
                        await producer.send(settings.topic("events.valid"), value, key=key)
                    )
                    if i == next_swap and len(swaps) < SWAPS:
                        # Alternate champions: 1.0.1, back to 1.0.0 (retired -> champion), ...
                        target = "1.0.1" if len(swaps) % 2 == 0 else "1.0.0"
                        cmd = new_command(
                            settings.model_name,
                            "promote",
                            "bench",
                            version=target,
                            target_stage="champion",
                        )
                        t0 = time.perf_counter()
                        outcome = await command(settings, cmd)
                        swaps.append(
                            {
                                "at_event": i,
                                "action": cmd["action"],
                                "outcome": outcome["outcome"],
                                "new_champion": outcome.get("new_champion"),
                                "answer_s": round(time.perf_counter() - t0, 3),
                            }
                        )
                        next_swap += n // (SWAPS + 1)
                await asyncio.gather(*futures)
            finally:
                await producer.stop()
            deadline = time.monotonic() + timeout_s
            while scorer.loop.batches == 0 or time.monotonic() < deadline:
                counts = await bp.count_records(settings, "predictions")
                if counts["predictions"] >= n:
                    break
                await asyncio.sleep(1)
    consumer = bp.make_consumer(settings, group_id=None, max_poll_records=5000)
    await bp.start_with_retry(consumer.start, "swap-reader", settings)
    champion: dict[str, set[str]] = {}
    rejected = 0
    try:
        decode = codec("Prediction").decode
        tps = await bp.assign_all(consumer, settings.topic("predictions"))

        def keep(record: Any) -> None:
            p = decode(record.value)
            if p["variant"] == "champion":
                champion.setdefault(p["event_id"], set()).add(p["model_version"])

        await bp.read_to_end(consumer, tps, keep, timeout_s=120)
        tps = await bp.assign_all(consumer, settings.topic("events.rejected"))
        rejected = await bp.read_to_end(consumer, tps, lambda _r: None, timeout_s=60)
    finally:
        await consumer.stop()
    ids = {e for e, _, _ in items}
    versions: dict[str, int] = {}
    for vs in champion.values():
        for v in vs:
            versions[v] = versions.get(v, 0) + 1
    return {
        "events": n,
        "rate": rate,
        "swaps": swaps,
        "lost": len(ids - set(champion)),
        "failed": rejected,
        "scored_by_version": versions,
    }


async def run(args: argparse.Namespace, settings: Settings, state: Any) -> dict[str, Any]:
    run_id = str(int(time.time()))
    broker_pid = state.started.get("broker")
    work = bp.build_workload(args.events)
    bp.gc.collect()
    bp.gc.freeze()
    bp.say("passthrough ...")
    ceiling = await bp.passthrough_phase(
        bp.phase_settings(settings, run_id, "passthrough"),
        work.passthrough,
        broker_pid,
        args.timeout,
    )
    batches = {}
    for size in (1, 64, 512):
        bp.say(f"scorer, batch {size} ...")
        batches[str(size)] = await scorer_at_batch(
            bp.phase_settings(settings, run_id, f"b{size}"), work, size, broker_pid, args.timeout
        )
    lat: dict[str, dict[str, Any]] = {}
    for where in ("own process", "this process", "relay"):
        bp.say(f"latency at 1,000 events/s, {where} ...")
        lat[where] = await latency(
            bp.phase_settings(settings, run_id, f"latency-{where.replace(' ', '-')}"),
            1000.0,
            args.latency_seconds,
            args.timeout,
            where,
        )
    added = {
        q: round(lat["own process"]["latency_ms"][q] - lat["relay"]["latency_ms"][q], 2)
        for q in ("p50", "p90", "p99")
    }
    bp.say(f"{SWAPS} hot swaps under load ...")
    swaps = await hot_swaps(
        bp.phase_settings(settings, run_id, "swaps"), args.swap_events, 2000.0, args.timeout
    )
    eps_512 = batches["512"]["events_per_s"]
    return {
        "passthrough_eps": ceiling["events_per_s"],
        "scorer_eps": {k: v["events_per_s"] for k, v in batches.items()},
        "scorer_ratio_512": round(eps_512 / ceiling["events_per_s"], 3),
        "added_latency_1k_eps_ms": added,
        "latency_1k_eps": lat["own process"],
        "latency_1k_eps_scorer_in_bench_process": lat["this process"],
        "latency_1k_eps_relay": lat["relay"],
        "hot_swaps": swaps,
        "targets": {
            f"scorer_eps>={TARGET_EPS}": eps_512 >= TARGET_EPS,
            f"scorer_ratio>={TARGET_RATIO}": eps_512 / ceiling["events_per_s"] >= TARGET_RATIO,
            # a p99 difference is mostly the two runs' noise (it can be negative); never
            # below the scorer's own consume-to-prediction p99
            f"p99_added_latency<{TARGET_P99_MS}ms": max(
                added["p99"], lat["own process"]["scorer_consumed_to_prediction_ms"]["p99"]
            )
            < TARGET_P99_MS,
            f"p99_latency_own_process<{TARGET_P99_MS}ms": lat["own process"]["latency_ms"]["p99"]
            < TARGET_P99_MS,
            "swaps_lost_or_failed==0": swaps["lost"] == 0 and swaps["failed"] == 0,
        },
        "phases": {"passthrough": ceiling, "batches": batches},
        "machine": {
            "loadavg": [round(x, 2) for x in bp.os.getloadavg()],
            "nproc": bp.os.cpu_count(),
        },
        "code": bp.code_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--swap-events", type=int, default=20_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=Path("bench-results/scorer.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stack = bp.DevStack(bp.BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    prefix = f"scoremesh-bench-scorer-{int(time.time())}:"
    state = None
    try:
        state, _ = stack.up()
        settings = stack.settings.model_copy(
            update=state.settings_overrides()
            | {
                "redis_key_prefix": prefix,
                "redis_prediction_ttl_s": 3600,
                "artifact_dir": bp.BENCH_HOME / "artifacts",
            }
        )
        import uvloop

        report = uvloop.run(run(args, settings, state))
    finally:
        if state is not None and "redis" not in state.started:
            with contextlib.suppress(Exception):
                bp.forget_redis_keys(state.redis_url, prefix)
        stack.down()
        bp.shutil.rmtree(bp.BENCH_HOME, ignore_errors=True)
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
