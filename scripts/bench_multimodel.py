"""A scorer serving three models against one serving one model, on the embedded stack.

Paired rounds (one model, then three, order alternating), after a discarded warm-up: the
same number of events on events.valid, drained by a ScorerService in this process. The
target (three vs one >= 0.8) is judged on the scorer's capacity, events per second of its
own CPU (this process's CPU per event; the machine is shared, so wall-clock rates move with
whatever else runs: they are reported too). Three models get a third of the events each, with the `model`
header the validator writes. Also: each model's prediction latency p99 (the scorer's own
consume -> prediction time, from the predictions' latency_ms), and the memory one loaded
model costs (RSS of a fresh interpreter holding 1 and then 4 sessions of the artifact).

    python scripts/bench_multimodel.py [--events 60000] [--rounds 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline as bp

from scoremesh.contract.codec import codec
from services.common.devstack import DevStack
from services.common.kafka import make_producer, start_with_retry
from services.common.registration import register_version
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.trainer.pipeline import builtin_recipe, train

MODELS = ("credit", "fraud", "churn")
TARGET_RATIO = 0.8
ROOT = Path(__file__).resolve().parent.parent


async def register_models(settings: Settings, onnx: bytes, names: tuple[str, ...]) -> None:
    async with bp.running(RegistryService(settings)):
        for name in names:
            reg = await register_version(
                settings, name, "1.0.0", onnx, CREDIT_SPEC, stage="champion", actor="bench"
            )
            assert reg.outcome["outcome"] == "applied", reg.outcome


async def produce_events(settings: Settings, n: int, names: tuple[str, ...]) -> None:
    encode = codec("Event").encode
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "bench-producer", settings)
    topic = settings.topic("events.valid")
    try:
        futures = []
        for i, (event, _) in enumerate(credit_events(n, seed=61, id_prefix="mm")):
            model = names[i % len(names)]
            value = encode({**event, "model": model, "rule_set": f"{model}@1.0.0", "flags": []})
            futures.append(
                await producer.send(
                    topic,
                    value,
                    key=event["entity_id"].encode(),
                    headers=[("model", model.encode())],
                )
            )
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def latencies(settings: Settings, n: int) -> dict[str, dict[str, float]]:
    """p50/p99 of each model's prediction latency_ms."""
    decode = codec("Prediction").decode
    by_model: dict[str, list[float]] = {}
    consumer = bp.make_consumer(settings, group_id=None, max_poll_records=5000)
    await start_with_retry(consumer.start, "bench-latency", settings)
    try:
        tps = await bp.assign_all(consumer, settings.topic("predictions"))

        def keep(record: Any) -> None:
            p = decode(record.value or b"")
            by_model.setdefault(p["model"], []).append(p["latency_ms"])

        await bp.read_to_end(consumer, tps, keep, timeout_s=300)
    finally:
        await consumer.stop()
    assert sum(len(v) for v in by_model.values()) == n, "every event scored once"
    return {m: bp.percentiles(v) for m, v in sorted(by_model.items())}


async def phase(
    base: Settings, run_id: str, label: str, names: tuple[str, ...], onnx: bytes, n: int
) -> dict[str, Any]:
    settings = bp.phase_settings(base, run_id, label)
    await bp.create_topics(settings)
    await register_models(settings, onnx, names)
    await produce_events(settings, n, names)
    scorer = ScorerService(settings)
    probe = bp.Probe(scorer.loop, None)
    async with bp.running(scorer) as task:
        deadline = time.monotonic() + 60
        while scorer.holder.current.serving_models != sorted(names):
            bp.check_alive(task)
            if time.monotonic() > deadline:
                raise TimeoutError(f"models not loaded: {scorer.holder.current.serving_models}")
            await asyncio.sleep(0.05)
        timing = await bp.drain(probe, n, task, timeout_s=600)
    return {
        "models": list(names),
        "events": n,
        "events_per_s": timing["events_per_s"],
        "cpu_us_per_event": timing["process_cpu_us_per_event"],
        "events_per_cpu_s": round(1e6 / timing["process_cpu_us_per_event"], 1),
        "prediction_latency_ms": await latencies(settings, n),
    }


MEMORY_CODE = """
import gc, sys, psutil, onnxruntime as ort
data = open(sys.argv[1], "rb").read()
options = ort.SessionOptions(); options.intra_op_num_threads = 1
gc.collect(); rss = [psutil.Process().memory_info().rss]
sessions = []
for _ in range(4):
    sessions.append(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]))
    gc.collect(); rss.append(psutil.Process().memory_info().rss)
print(rss[1] - rss[0], (rss[4] - rss[1]) / 3)
"""


def memory_per_model(onnx: bytes) -> dict[str, float]:
    path = bp.BENCH_HOME / "model.onnx"
    path.write_bytes(onnx)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CODE, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    first, each = float(out[0]), float(out[1])
    return {
        "artifact_bytes": len(onnx),
        "first_session_mib": round(first / 2**20, 2),
        "each_further_session_mib": round(each / 2**20, 2),
    }


async def run(args: argparse.Namespace, base: Settings) -> dict[str, Any]:
    pairs = list(credit_events(3000, seed=3))
    trained = train(
        CREDIT_SPEC,
        [e["features"] for e, _ in pairs],
        [y for _, y in pairs],
        recipe=builtin_recipe(),
        seed=3,
    )
    run_id = f"{int(time.time())}"
    bp.say("warm-up (discarded)")
    await phase(base, f"{run_id}-warm", "warm", MODELS[:1], trained.onnx, min(args.events, 10_000))
    rounds = []
    for r in range(args.rounds):
        order = [("one", MODELS[:1]), ("three", MODELS)]
        if r % 2:
            order.reverse()
        result = {}
        for label, names in order:
            bp.say(f"round {r + 1}: {label} model(s), {args.events} events")
            result[label] = await phase(
                base, f"{run_id}-{r}", label, names, trained.onnx, args.events
            )
        capacity = result["three"]["events_per_cpu_s"] / result["one"]["events_per_cpu_s"]
        wall = result["three"]["events_per_s"] / result["one"]["events_per_s"]
        rounds.append(
            {
                **result,
                "capacity_ratio_three_vs_one": round(capacity, 3),
                "wall_ratio_three_vs_one": round(wall, 3),
            }
        )
    ratios = [x["capacity_ratio_three_vs_one"] for x in rounds]
    walls = [x["wall_ratio_three_vs_one"] for x in rounds]
    median = statistics.median(ratios)
    return {
        "benchmark": "scorer serving three models vs one",
        "events_per_phase": args.events,
        "rounds": rounds,
        "capacity_ratio_three_vs_one": {
            "median": median,
            "min": min(ratios),
            "max": max(ratios),
        },
        "wall_ratio_three_vs_one": {
            "median": statistics.median(walls),
            "min": min(walls),
            "max": max(walls),
        },
        "target_ratio": TARGET_RATIO,
        "meets_target": median >= TARGET_RATIO,
        "memory_per_loaded_model": memory_per_model(trained.onnx),
        "machine": bp.machine_info("asyncio", STATE) if STATE else {},
    }


STATE: Any = None


def main(argv: list[str] | None = None) -> int:
    global STATE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "multimodel.json")
    args = parser.parse_args(argv)
    if args.events < 3000 or args.rounds < 1:
        parser.error("--events must be at least 3000 and --rounds at least 1")
    stack = DevStack(bp.BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    try:
        STATE, _ = stack.up()
        base = stack.settings.replace(
            **(STATE.settings_overrides() | {"redis_url": None}),
            artifact_dir=bp.BENCH_HOME / "artifacts",
        )
        report = asyncio.run(run(args, base))
    finally:
        stack.down()
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
