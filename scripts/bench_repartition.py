"""What the join's own partitioning costs (docs/adr/0019-join-owns-its-partitioning.md).

The label join reads each input record's event_id and checks it against the record's
partition; a record elsewhere goes through label-join.repartition.

First without a broker (``check_cost_in_process``): this process's CPU per input record for
the route (the check, or with it off only the split by kind) and the join of the same
batches, fresh state each time, in paired rounds; the rate ratio the check alone allows.
This is the steady figure: on a shared 2-core machine the broker runs below move by ±30 %.

Then on the embedded broker, three ways, each on a
fresh topic prefix with the same inputs (P predictions of one model version with feature
bins, and a label for 90 % of them), LabelJoinService in this process, timed from its first
batch until every input is committed, with this process's CPU time over the same span:

- ``check_on``: every record on its event_id's partition (a murmur2 producer);
- ``check_off``: the same inputs, the check switched off (the join before it existed);
- ``labels_misplaced``: the check on, every label on another partition (as if its producer
  partitioned by something else): each label is forwarded and read a second time.

``check_on`` and ``check_off`` are paired in each of ``--rounds`` rounds (their order
alternates); the ratio that matters is the median of the rounds' check_on/check_off rate
ratios (target >= 0.95). ``labels_misplaced`` is timed in the same rounds: the extra hop's cost.
Last, its latency: labels sent one by one to a join holding their predictions, every other
one misplaced, each timed from its send to its row on predictions.labeled.

    python scripts/bench_repartition.py [--events 40000] [--rounds 3] [--quick]
        [--output bench-results/repartition.json]
"""

# ruff: noqa: I001 - bench_label_join (it sets SCOREMESH_HOME) is imported before services

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_label_join as lj  # the embedded stack, phase prefixes, probes, produce helpers

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import numpy as np
import orjson
from aiokafka import ConsumerRecord

from scoremesh.contract.catalog import catalog
from scoremesh.contract.codec import codec
from scoremesh.contract.partitioner import partitions_for_keys
from services.common.devstack import DevStack
from services.common.kafka import (
    assign_all,
    delete_topics,
    make_consumer,
    make_producer,
    send_records,
    start_with_retry,
)
from services.common.batchloop import Record
from services.common.model_version import ModelVersion
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.label_join.join import JoinCore, OutputTopics, VersionCatalog
from services.label_join.repartition import Repartitioner
from services.label_join.service import LABELS, PREDICTIONS, LabelJoinService
from services.trainer.datasets import CREDIT_SPEC, credit_events

MODES = ("check_on", "check_off", "labels_misplaced")
Placed = tuple[int, bytes, bytes]  # (partition, key, value)


@dataclass
class Inputs:
    predictions: list[Placed]
    labels: list[Placed]
    misplaced: list[Placed]  # the labels, each on the partition after its own
    version: ModelVersion  # the version that made the predictions (feature bins included)

    @property
    def registry(self) -> bytes:
        return codec("ModelVersion").encode(self.version.to_record())  # type: ignore[arg-type]


def inputs(n: int, partitions: int) -> Inputs:
    """Predictions and labels on their event_id's partition, the labels again on the next
    partition, and the version that made the predictions."""
    rng = random.Random(lj.SEED)
    events = [e for e, _ in credit_events(n, seed=lj.SEED)]
    ids = [e["event_id"].encode() for e in events]
    home = partitions_for_keys(ids, partitions)
    encode = codec("Prediction").encode
    predictions: list[Placed] = []
    labels: list[Placed] = []
    misplaced: list[Placed] = []
    for event, key, p in zip(events, ids, home, strict=True):
        p1 = rng.random()
        predictions.append(
            (
                p,
                key,
                encode(
                    {
                        **event,
                        "model": "credit",
                        "model_version": "1.0.0",
                        "variant": "champion",
                        "served": True,
                        "source": "stream",
                        "score": p1,
                        "scores": {"0": 1 - p1, "1": p1},
                        "decision": "1" if p1 >= 0.5 else "0",
                        "latency_ms": 1.0,
                        "scored_at": event["event_time"] + 5,
                    }
                ),
            )
        )
        if rng.random() < 0.9:
            label = codec("Label").encode(
                {
                    "event_id": event["event_id"],
                    "value": "1" if rng.random() < 0.4 else "0",
                    "label_time": event["event_time"] + rng.randrange(1_000, 3_600_000),
                }
            )
            labels.append((p, key, label))
            misplaced.append(((p + 1) % partitions, key, label))
    numeric = [f.name for f in CREDIT_SPEC.features if not f.categories]
    reference = {
        "features": {
            name: {
                "kind": "numeric",
                "edges": np.quantile(
                    [e["features"][name] or 0.0 for e in events], np.linspace(0, 1, 11)
                ).tolist(),
            }
            for name in numeric
        }
        | {f.name: {"kind": "categorical"} for f in CREDIT_SPEC.features if f.categories}
    }
    version = ModelVersion(
        name="credit",
        version="1.0.0",
        stage="champion",
        generation=2,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="0" * 64,
        artifact_size=1,
        feature_spec_json=CREDIT_SPEC.model_dump_json(),
        metadata_json=orjson.dumps({"reference": reference}).decode(),
    )
    return Inputs(predictions, labels, misplaced, version)


async def produce_placed(settings: Settings, topic: str, rows: list[Placed]) -> None:
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "bench-producer", settings)
    name = settings.topic(topic)  # type: ignore[arg-type]
    try:
        for i in range(0, len(rows), 5000):
            await send_records(producer, ((name, p, k, v) for p, k, v in rows[i : i + 5000]))
    finally:
        await producer.stop()


async def one_run(
    base: Settings,
    run_id: str,
    mode: str,
    data: Inputs,
    timeout_s: float,
) -> dict[str, Any]:
    predictions, labels, misplaced = data.predictions, data.labels, data.misplaced
    settings = lj.phase_settings(base, run_id, mode.replace("_", "-"))
    await lj.create_topics(settings)
    try:
        await lj.produce(settings, "models.registry", [(b"credit@1.0.0", data.registry)])
        await produce_placed(settings, PREDICTIONS, predictions)
        await produce_placed(settings, LABELS, misplaced if mode == "labels_misplaced" else labels)
        service = LabelJoinService(settings, lj.CONFIG, publish_interval_s=3600)
        service.repartition.check = mode != "check_off"
        probe = lj.Probe(service.loop)
        inputs_n = len(predictions) + len(labels)
        total = inputs_n + (len(labels) if mode == "labels_misplaced" else 0)
        async with lj.running(service) as task:
            await lj.wait_first_batch(probe, task, timeout_s)
            cpu0 = time.process_time()
            first = probe.first
            seconds = await lj.drain_time(probe, total, task, timeout_s)
            cpu = time.process_time() - cpu0
            assert first is not None
        forwarded = dict(service.repartition.forwarded)
        joined = service.core.counts["joined"]
    finally:
        with contextlib.suppress(Exception):
            await delete_topics(settings, list(catalog()))
    if joined != len(labels):
        raise RuntimeError(f"{mode}: {joined} of {len(labels)} labels joined")
    expected_forwards = len(labels) if mode == "labels_misplaced" else 0
    if forwarded["label"] != expected_forwards or forwarded["prediction"]:
        raise RuntimeError(f"{mode}: forwarded {forwarded}, expected {expected_forwards} labels")
    result = {
        "mode": mode,
        "input_records": inputs_n,
        "records_read": total,
        "seconds": round(seconds, 3),
        "input_records_per_s": round(inputs_n / seconds),
        "cpu_us_per_input": round(cpu / inputs_n * 1e6, 2),
        "forwarded": forwarded,
        "labels_joined": joined,
    }
    lj.say(f"{mode}: {result['input_records_per_s']}/s, {result['cpu_us_per_input']} us CPU/input")
    return result


def as_records(topic: str, rows: list[Placed]) -> list[Record]:
    return [
        ConsumerRecord(topic, p, i, 0, 0, k, v, None, len(k), len(v), [])
        for i, (p, k, v) in enumerate(rows)
    ]


def check_cost(data: Inputs, rounds: int, batch: int) -> dict[str, Any]:
    """Without a broker: this process's CPU per input record for the route (the check, or
    with it off only the split by kind) and for the join of the same batches, in paired
    rounds with a fresh join state each; the rate ratio the check alone allows."""
    partitions = catalog()[PREDICTIONS].partitions
    state = RegistryState()
    state.apply(data.version)
    records = as_records("predictions", data.predictions) + as_records("labels", data.labels)
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        result: dict[str, float] = {}
        for check in (True, False) if r % 2 == 0 else (False, True):
            versions = VersionCatalog("credit")
            versions.update(state)
            core = JoinCore(
                lj.CONFIG,
                versions,
                OutputTopics("predictions.labeled", "training.examples", "labels.unmatched"),
            )
            for p in range(partitions):
                core.restore(p, [])
            router = Repartitioner("predictions", "labels", "label-join.repartition", partitions)
            router.check = check
            gc.collect()
            route_s = join_s = 0.0
            for part in batches:
                t0 = time.process_time()
                routed = router.route(part)
                t1 = time.process_time()
                core.process(routed.predictions, routed.labels)
                t2 = time.process_time()
                route_s += t1 - t0
                join_s += t2 - t1
            name = "on" if check else "off"
            result[f"route_{name}_us"] = round(route_s / len(records) * 1e6, 3)
            result[f"join_{name}_us"] = round(join_s / len(records) * 1e6, 3)
        result["rate_ratio"] = round(
            (result["route_off_us"] + result["join_off_us"])
            / (result["route_on_us"] + result["join_on_us"]),
            3,
        )
        per_round.append(result)
        lj.say(f"check cost, round {r}: {result}")
    check_us = median(x["route_on_us"] - x["route_off_us"] for x in per_round)
    join_us = median(x["join_on_us"] for x in per_round)
    return {
        "records": len(records),
        "batch": batch,
        "rounds": per_round,
        "check_us_per_record_median": round(check_us, 3),
        "join_us_per_record_median": round(join_us, 3),
        "rate_ratio_median": median(x["rate_ratio"] for x in per_round),
    }


async def hop_latency(
    base: Settings, run_id: str, data: Inputs, n: int, rate: float, timeout_s: float
) -> dict[str, Any]:
    """Label to joined row, for labels sent one by one at ``rate`` to a join that holds
    their predictions: every other label on its partition, the others on the next one."""
    settings = lj.phase_settings(base, run_id, "latency")
    await lj.create_topics(settings)
    predictions = data.predictions[:n]
    labels = data.labels[:n]
    await lj.produce(settings, "models.registry", [(b"credit@1.0.0", data.registry)])
    await produce_placed(settings, PREDICTIONS, predictions)
    ids = {p[1] for p in predictions}
    labels = [lab for lab in labels if lab[1] in ids]
    misplaced = {lab[1]: m for lab, m in zip(data.labels, data.misplaced, strict=True)}
    service = LabelJoinService(settings, lj.CONFIG, publish_interval_s=3600)
    probe = lj.Probe(service.loop)
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    producer = make_producer(settings)
    await start_with_retry(consumer.start, "latency-consumer", settings)
    await start_with_retry(producer.start, "latency-producer", settings)
    sent: dict[bytes, float] = {}
    joined: dict[bytes, float] = {}
    try:
        async with lj.running(service) as task:
            await lj.drain_time(probe, len(predictions), task, timeout_s)
            await assign_all(consumer, settings.topic("predictions.labeled"))

            async def follow() -> None:
                while True:
                    batches = await consumer.getmany(timeout_ms=20)
                    now = time.perf_counter()
                    for records in batches.values():
                        for r in records:
                            if r.key is not None:
                                joined.setdefault(r.key, now)

            follower = asyncio.create_task(follow())
            started = time.perf_counter()
            futures = []
            for i, (partition, key, value) in enumerate(labels):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i % 2:
                    partition = misplaced[key][0]
                sent[key] = time.perf_counter()
                futures.append(
                    await producer.send(settings.topic(LABELS), value, key=key, partition=partition)
                )
                lj.check_alive(task, follower)
            await asyncio.gather(*futures)
            deadline = time.monotonic() + timeout_s
            while len(joined) < len(sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        forwarded = service.repartition.forwarded["label"]
    finally:
        await consumer.stop()
        await producer.stop()
        with contextlib.suppress(Exception):
            await delete_topics(settings, list(catalog()))
    placed_ms = [(joined[k] - sent[k]) * 1000 for i, (_, k, _) in enumerate(labels) if not i % 2]
    moved_ms = [(joined[k] - sent[k]) * 1000 for i, (_, k, _) in enumerate(labels) if i % 2]
    result = {
        "labels": len(sent),
        "rate": rate,
        "forwarded": forwarded,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "in_place_ms": lj.percentiles(placed_ms),
        "forwarded_ms": lj.percentiles(moved_ms),
    }
    lj.say(f"label -> joined row: {result}")
    return result


async def run_all(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    partitions = catalog()[PREDICTIONS].partitions
    data = inputs(args.events, partitions)
    in_process = check_cost(data, max(args.rounds, 5), settings.label_join.batch_max_records)
    run_id = f"{os.getpid()}-{int(time.time())}"
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = ["check_on", "check_off"] if r % 2 == 0 else ["check_off", "check_on"]
        results = {}
        for mode in [*order, "labels_misplaced"]:
            results[mode] = await one_run(settings, f"{run_id}-r{r}", mode, data, args.timeout)
        rounds.append(results)
    latency = await hop_latency(
        settings, run_id, data, min(args.latency_labels, len(data.labels)), args.rate, args.timeout
    )

    def ratios(num: str, den: str, field: str, invert: bool = False) -> list[float]:
        out = []
        for results in rounds:
            a, b = results[num][field], results[den][field]
            out.append(round(b / a if invert else a / b, 3))
        return out

    on_off = ratios("check_on", "check_off", "input_records_per_s")
    cpu_on_off = ratios("check_on", "check_off", "cpu_us_per_input", invert=True)
    misplaced_on = ratios("labels_misplaced", "check_on", "input_records_per_s")
    cpu_misplaced = ratios("labels_misplaced", "check_on", "cpu_us_per_input")
    return {
        "benchmark": "label-join repartition",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "events": args.events,
        "predictions": len(data.predictions),
        "labels": len(data.labels),
        "partitions": partitions,
        "check_cost_in_process": in_process,
        "rounds": rounds,
        "check_on_vs_off": {
            "rate_ratio_per_round": on_off,
            "rate_ratio_median": median(on_off),
            "cpu_ratio_per_round": cpu_on_off,
            "cpu_ratio_median": median(cpu_on_off),
            "target": 0.95,
            "meets_target": median(on_off) >= 0.95,
            "note": "ratios > 1 mean check_on was faster: the check costs less than the noise",
        },
        "labels_misplaced_vs_check_on": {
            "rate_ratio_per_round": misplaced_on,
            "rate_ratio_median": median(misplaced_on),
            "cpu_ratio_per_round": cpu_misplaced,
            "cpu_ratio_median": median(cpu_misplaced),
            "note": "every label forwarded once and read twice: the extra hop's cost",
        },
        "label_to_joined_row_latency": latency,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000, help="predictions per run")
    parser.add_argument("--rounds", type=int, default=3, help="paired check_on/check_off rounds")
    parser.add_argument("--latency-labels", type=int, default=600, help="in the latency phase")
    parser.add_argument("--rate", type=float, default=200.0, help="labels/s in the latency phase")
    parser.add_argument("--quick", action="store_true", help="5,000 events, 3 rounds")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=Path("bench-results/repartition.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.events = 5_000
        args.latency_labels = 200
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3 (a median of paired rounds), not {args.rounds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stack = DevStack(lj.BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    try:
        lj.say("starting the embedded stack ...")
        state, _ = stack.up()
        settings = stack.settings.model_copy(
            update=state.settings_overrides()
            | {"redis_url": None, "artifact_dir": lj.BENCH_HOME / "artifacts"}
        )
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(run_all(args, settings))
        else:
            report = uvloop.run(run_all(args, settings))
    finally:
        stack.down()
        shutil.rmtree(lj.BENCH_HOME, ignore_errors=True)
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    lj.say(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
