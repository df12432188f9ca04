"""Monitor benchmark: whole-stream detection, false alarms, and keeping up with the scorer.

Part 1, the monitor's core without a broker (``core_bench``; CI runs it with ``--quick``):
a synthetic 25-feature model (20 numeric, 5 categorical) on 6 partitions read by 2
monitor replicas. Detection rounds (median of >= 3 seeds): the error rate rises
0.5 % -> 12 % (labels arriving 100-600 events late), x07 shifts 0.5 sd and the share of
one category of c2 goes from 1/6 to 0.4; the delay of the monitor's first warning or critical, in
events after the change, against one River ADWIN fed the whole stream in arrival order.
Then a stationary stream (1M events; --quick 100k) and trend, seasonal and random-walk
inputs of the same length: warnings and criticals counted.

Part 2, on the embedded stack (not with --quick, unless --broker), on a 20-feature model (18 numeric, 2 categorical) trained here with the real
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

    python scripts/bench_monitor.py [--quick] [--core-only] [--events 50000]
        [--output bench-results/monitor.json]

Exit status 1 when a verdict of part 1 fails.
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
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from river import drift

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, RuleSet
from services.common.batchloop import BatchLoop, Out, ProcessFn, Record
from services.common.devstack import DevStack
from services.common.evaluation import reference_distributions
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
from services.common.model_version import ModelVersion, VersionMetadata
from services.common.policies.monitor import MonitorPolicy, severity_rank
from services.common.registration import register_version
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.monitor import signals as sig
from services.monitor.alerts import Transition
from services.monitor.core import MonitorCore
from services.monitor.features import FeatureLayout, PreparedBatch
from services.monitor.inprocess import Loopback
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


# --- the monitor's core without a broker: whole-stream detection and false alarms ------
#
# Predictions of a synthetic 25-feature model (20 numeric, 5 categorical) on 6 partitions
# (random by event), read by 2 monitor replicas (3 partitions each) in rounds of
# POLL_EVENTS events of time; each replica's first stage turns its partitions' rows into
# signal records (the arrays the service publishes after decoding; Avro decoding is
# measured in the broker phase) and the owner of the model's monitor.signals partition
# runs MonitorCore's second stage on them, as the service does. Labels arrive late
# (LABEL_LAG_EVENTS), so the labelled stream's arrival order is not the event order.
#
# The score depends on x15..x19 only; drifts are put on other features, so "the score
# distribution holds" is true by construction in the slow-drift runs.

CORE_NUMERIC = 20
CORE_CATEGORIES = (4, 5, 6, 7, 8)
CORE_PARTITIONS = 6
CORE_REPLICAS = 2
POLL_EVENTS = 256  # events of time between two polls of a replica
LABEL_LAG_EVENTS = (100, 600)  # a label arrives this many events after its prediction
EVENT_MS = 10
T0 = 1_767_225_600_000
ERROR_BEFORE, ERROR_AFTER = 0.005, 0.12  # the concept change
SHIFT_FEATURE, SHIFT_SD = 7, 0.5  # x07: +0.5 sd
SHARE_FEATURE, SHARE_CODE, SHARE_AFTER = 2, 0, 0.4  # c2 (6 categories): code 0, 1/6 -> 0.4
SCORE_FEATURES = slice(15, 20)
# slow, harmless input drift (per event, so a longer run drifts further): 5 features each
TREND_SD_PER_EVENT = 1.0 / 250_000  # +4 sd over 1M events
SEASON_AMPLITUDE_SD, SEASON_PERIOD = 1.0, 200_000
WALK_STEP_SD = 0.002  # a random walk's step: ~2 sd away after 1M steps
SLOW_FEATURES = slice(0, 5)

CORE_SPEC = FeatureSpec(
    features=[
        FeatureRule(name=f"x{j:02d}", dtype="double", min=-1_000, max=1_000)
        for j in range(CORE_NUMERIC)
    ]
    + [
        FeatureRule(name=f"c{k}", dtype="long", categories=list(range(n)))
        for k, n in enumerate(CORE_CATEGORIES)
    ],
    classes=["0", "1"],
    positive_class="1",
)


@dataclass
class Stream:
    numeric: np.ndarray  # [n, 20] in sd units
    cats: np.ndarray  # [n, 5]
    scores: np.ndarray
    errors: np.ndarray  # 0/1
    partitions: np.ndarray
    label_arrival: np.ndarray  # events ordered by label arrival


def core_stream(n: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    numeric = rng.normal(0.0, 1.0, size=(n, CORE_NUMERIC))
    cats = np.stack([rng.integers(0, k, size=n) for k in CORE_CATEGORIES], axis=1)
    logit = numeric[:, SCORE_FEATURES] @ np.array([0.9, -0.6, 0.4, 0.3, -0.2]) - 0.4
    scores = 1.0 / (1.0 + np.exp(-logit))
    errors = (rng.random(n) < ERROR_BEFORE).astype(np.uint8)
    lag = rng.integers(*LABEL_LAG_EVENTS, size=n)
    return Stream(
        numeric,
        cats,
        scores,
        errors,
        rng.integers(0, CORE_PARTITIONS, size=n),
        np.argsort(np.arange(n) + lag, kind="stable"),
    )


def core_version(seed: int) -> ModelVersion:
    """The model version with a training reference from a stationary sample."""
    ref = core_stream(20_000, seed + 1_000)
    matrix = np.concatenate([ref.numeric, ref.cats], axis=1)
    probabilities = np.stack([1.0 - ref.scores, ref.scores], axis=1)
    metadata = VersionMetadata(
        class_balance={"0": 0.6, "1": 0.4},
        reference=reference_distributions(matrix, CORE_SPEC, probabilities),
    )
    return ModelVersion(
        name="bench",
        version="1.0.0",
        stage="champion",
        generation=1,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="0" * 64,
        artifact_size=0,
        feature_spec_json=CORE_SPEC.model_dump_json(),
        metadata_json=metadata.model_dump_json(),
    )


def _prepared(layout: FeatureLayout, s: Stream, rows: np.ndarray) -> PreparedBatch:
    matrix = np.concatenate([s.numeric[rows], s.cats[rows]], axis=1).astype(np.float32)
    block = matrix[:, list(layout.bounded)].astype(np.float64)
    scores = s.scores[rows]
    return PreparedBatch(
        matrix=matrix,
        nulls=np.zeros((len(rows), 0), dtype=bool),
        out_of_range=(block < layout.lows) | (block > layout.highs),
        codes={},
        scores=scores,
        confidence=np.maximum(scores, 1.0 - scores),
        decisions=(scores >= 0.5).astype(np.int64),
        event_times=T0 + rows.astype(np.int64) * EVENT_MS,
    )


def run_core(s: Stream, version: ModelVersion, policy: MonitorPolicy) -> dict[str, Any]:
    """Both stages over the stream; every alert transition, and the time spent."""
    settings = Settings(kafka_bootstrap="127.0.0.1:9", topic_prefix="bench.")
    state = RegistryState()
    state.apply(version)
    replicas = [MonitorCore(settings, policy) for _ in range(CORE_REPLICAS)]
    for core in replicas:
        core.on_registry(state)
    layout = replicas[0].context(version.name, version.version).layout  # type: ignore[union-attr]
    loop = Loopback(settings.topic("monitor.signals"))
    owns_input = [
        [p for p in range(CORE_PARTITIONS) if p % CORE_REPLICAS == r] for r in range(CORE_REPLICAS)
    ]
    owns_signals = [
        [p for p in range(loop.partitions) if p % CORE_REPLICAS == r] for r in range(CORE_REPLICAS)
    ]
    n = len(s.scores)
    label_times = np.empty(n, dtype=np.int64)
    label_times[s.label_arrival] = np.arange(n)  # arrival position of each event's label
    arrival_of = label_times.copy()
    transitions: list[Transition] = []
    offsets = {("p", p): 0 for p in range(CORE_PARTITIONS)} | {
        ("l", p): 0 for p in range(CORE_PARTITIONS)
    }
    started = time.process_time()
    stage2 = 0.0
    for t0 in range(0, n + LABEL_LAG_EVENTS[1] + POLL_EVENTS, POLL_EVENTS):
        pred_rows = np.arange(t0, min(t0 + POLL_EVENTS, n))
        label_rows = s.label_arrival[t0 : t0 + POLL_EVENTS]
        for r, core in enumerate(replicas):
            outs: list[Out] = []
            for p in owns_input[r]:
                rows = pred_rows[s.partitions[pred_rows] == p]
                if len(rows):
                    offs = offsets[("p", p)] + np.arange(len(rows))
                    offsets[("p", p)] += len(rows)
                    batch = sig.from_predictions(
                        version.name, version.version, p, offs, _prepared(layout, s, rows)
                    )
                    core._signal_outs(batch, outs)
                rows = label_rows[s.partitions[label_rows] == p]
                if len(rows):
                    offs = offsets[("l", p)] + np.arange(len(rows))
                    offsets[("l", p)] += len(rows)
                    batch = sig.from_labeled(
                        version.name,
                        version.version,
                        p,
                        offs,
                        s.errors[rows],
                        T0 + rows * EVENT_MS,
                        T0 + (rows + (arrival_of[rows] - rows).clip(0)) * EVENT_MS,
                        (arrival_of[rows] - rows).clip(0) * EVENT_MS,
                    )
                    core._signal_outs(batch, outs)
            loop.append(outs)
        for r, core in enumerate(replicas):
            records = loop.take(r, owns_signals[r])
            if records:
                before = time.process_time()
                transitions += core.process(records).transitions
                stage2 += time.process_time() - before
    owner = next(c for c in replicas if (version.name, version.version) in c.states)
    return {
        "transitions": transitions,
        "cpu_s": time.process_time() - started,
        "stage2_cpu_s": stage2,
        "seen": owner.states[(version.name, version.version)].bank.score[0].seen,
        "labels_seen": owner.states[(version.name, version.version)].errors.detectors[0].seen,
        "arrival_of": arrival_of,
        "delta": owner.states[(version.name, version.version)].bank.delta,
    }


def _index(ms: int) -> int:
    return (ms - T0) // EVENT_MS


def first_pages(transitions: list[Transition]) -> dict[str, tuple[int, str]]:
    """Per signal: the event index of its first warning or critical, and that severity."""
    out: dict[str, tuple[int, str]] = {}
    for t in transitions:
        record = t.record
        signal = t.key.split("/", 2)[-1]
        if signal in out or record["severity"] not in ("warning", "critical"):
            continue
        if t.event in ("opened", "escalated", "updated"):
            at = record["evidence"].get("event_time_ms") or record["first_seen"]
            out[signal] = (_index(int(at)), record["severity"])
    return out


def highest(transitions: list[Transition]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in transitions:
        signal = t.key.split("/", 2)[-1]
        if severity_rank(t.record["severity"]) > severity_rank(out.get(signal, "")):
            out[signal] = t.record["severity"]
    return out


def river_first(values: np.ndarray, delta: float) -> int | None:
    """Where one River ADWIN fed these values one by one fires first."""
    detector = drift.ADWIN(delta=delta)
    for i, v in enumerate(values.tolist()):
        detector.update(v)
        if detector.drift_detected:
            return i
    return None


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


def detection_round(
    n: int, seed: int, policy: MonitorPolicy, version: ModelVersion
) -> dict[str, Any]:
    """One seeded round: at n/2 the error rate rises, x07 shifts 0.5 sd and the share of
    c2's first category goes from 1/6 to 0.4; delays counted in events after the change."""
    change = n // 2
    s = core_stream(n, seed)
    rng = np.random.default_rng(seed + 7)
    post = np.arange(change, n)
    s.errors[post] = (rng.random(len(post)) < ERROR_AFTER).astype(np.uint8)
    s.numeric[post, SHIFT_FEATURE] += SHIFT_SD
    k = CORE_CATEGORIES[SHARE_FEATURE]
    shares = np.full(k, (1 - SHARE_AFTER) / (k - 1))
    shares[SHARE_CODE] = SHARE_AFTER
    s.cats[post, SHARE_FEATURE] = rng.choice(k, len(post), p=shares / shares.sum())
    run = run_core(s, version, policy)
    pages = first_pages(run["transitions"])
    arrival = run["arrival_of"]
    post_arrivals = np.sort(arrival[change:])

    def label_delay(arrival_position: int | None) -> int | None:
        if arrival_position is None:
            return None
        return int(np.searchsorted(post_arrivals, arrival_position, side="right"))

    def event_delay(index: int | None) -> int | None:
        return None if index is None or index < change else index - change + 1

    errors_in_arrival = s.errors[s.label_arrival].astype(np.float64)
    error_delta = run["delta"]
    baseline_error = river_first(errors_in_arrival, error_delta)
    baseline_error_default = river_first(errors_in_arrival, 0.002)
    x = s.numeric[:, SHIFT_FEATURE].astype(np.float32).astype(np.float64)
    share = (s.cats[:, SHARE_FEATURE] == SHARE_CODE).astype(np.float64)
    share_delta = error_delta / (CORE_CATEGORIES[SHARE_FEATURE] + 1)
    monitor_error = pages.get("error_rate")
    monitor_shift = pages.get(f"stream_drift.x{SHIFT_FEATURE:02d}")
    monitor_share = pages.get(f"category_shift.c{SHARE_FEATURE}")
    out = {
        "seed": seed,
        "events": n,
        "change_at": change,
        "error_rate": {
            "monitor": label_delay(arrival[monitor_error[0]]) if monitor_error else None,
            "monitor_severity": monitor_error[1] if monitor_error else None,
            "one_adwin_same_delta": label_delay(baseline_error),
            "one_adwin_delta_0.002": label_delay(baseline_error_default),
            "delta": error_delta,
        },
        "mean_shift": {
            "monitor": event_delay(monitor_shift[0]) if monitor_shift else None,
            "monitor_severity": monitor_shift[1] if monitor_shift else None,
            "one_adwin_same_delta": event_delay(river_first(x, error_delta)),
            "one_adwin_delta_0.002": event_delay(river_first(x, 0.002)),
            "delta": error_delta,
        },
        "category_share": {
            "monitor": event_delay(monitor_share[0]) if monitor_share else None,
            "monitor_severity": monitor_share[1] if monitor_share else None,
            "one_adwin_same_delta": event_delay(river_first(share, share_delta)),
            "one_adwin_delta_0.002": event_delay(river_first(share, 0.002)),
            "delta": share_delta,
        },
        "pages": {k: v[1] for k, v in pages.items()},
        "core_us_per_event": round(run["cpu_s"] / n * 1e6, 1),
    }
    for name in ("error_rate", "mean_shift", "category_share"):
        row = out[name]
        row["ratio"] = _ratio(row["monitor"], row["one_adwin_same_delta"])
        row["ratio_vs_delta_0.002"] = _ratio(row["monitor"], row["one_adwin_delta_0.002"])
    return out


def slow_drift_run(
    kind: str, n: int, seed: int, policy: MonitorPolicy, version: ModelVersion
) -> dict[str, Any]:
    s = core_stream(n, seed)
    i = np.arange(n, dtype=np.float64)[:, None]
    width = SLOW_FEATURES.stop - SLOW_FEATURES.start
    if kind == "trend":
        s.numeric[:, SLOW_FEATURES] += TREND_SD_PER_EVENT * i
    elif kind == "seasonal":
        phase = np.linspace(0, np.pi, width)[None, :]
        s.numeric[:, SLOW_FEATURES] += SEASON_AMPLITUDE_SD * np.sin(
            2 * np.pi * i / SEASON_PERIOD + phase
        )
    elif kind == "random_walk":
        steps = np.random.default_rng(seed + 11).normal(0.0, WALK_STEP_SD, size=(n, width))
        s.numeric[:, SLOW_FEATURES] += np.cumsum(steps, axis=0)
    run = run_core(s, version, policy)
    levels = highest(run["transitions"])
    above_info = {k: v for k, v in levels.items() if severity_rank(v) > severity_rank("info")}
    drifted = s.numeric[:, SLOW_FEATURES]
    return {
        "kind": kind,
        "events": n,
        "seen": run["seen"],
        "inputs_moved_sd": round(
            float(np.abs(drifted[-10_000:].mean(0) - drifted[:10_000].mean(0)).max()), 2
        ),
        "alerts_by_severity": {
            sev: sum(1 for v in levels.values() if v == sev)
            for sev in ("info", "warning", "critical")
        },
        "above_info": above_info,
        "score_signals": {k: v for k, v in levels.items() if "score" in k or k == "class_shift"},
        "core_us_per_event": round(run["cpu_s"] / n * 1e6, 1),
        "stage2_us_per_event": round(run["stage2_cpu_s"] / n * 1e6, 1),
    }


def core_bench(args: argparse.Namespace) -> dict[str, Any]:
    policy = MonitorPolicy()
    version = core_version(args.seed)
    rounds_n = 30_000 if args.quick else 200_000
    rounds = 3 if args.quick else 5
    long_n = args.stationary_events or (100_000 if args.quick else 1_000_000)
    say(f"core: {rounds} detection rounds of {rounds_n} events ...")
    detection = [detection_round(rounds_n, args.seed + r, policy, version) for r in range(rounds)]

    def median(name: str, field_name: str) -> float | None:
        values = [r[name][field_name] for r in detection]
        if any(v is None for v in values):
            return None
        return float(np.median(values))

    summary = {
        name: {
            "monitor_median": median(name, "monitor"),
            "baseline_median": median(name, "one_adwin_same_delta"),
            "ratio_median": median(name, "ratio"),
            "baseline_delta_0.002_median": median(name, "one_adwin_delta_0.002"),
            "ratio_vs_delta_0.002_median": median(name, "ratio_vs_delta_0.002"),
            "severities": [r[name]["monitor_severity"] for r in detection],
        }
        for name in ("error_rate", "mean_shift", "category_share")
    }
    say(f"core: stationary stream of {long_n} events ...")
    stationary = slow_drift_run("stationary", long_n, args.seed + 100, policy, version)
    slow = []
    for kind in ("trend", "seasonal", "random_walk"):
        say(f"core: {kind} inputs, {long_n} events ...")
        slow.append(slow_drift_run(kind, long_n, args.seed + 200, policy, version))
    verdicts = {
        "error_rate_ratio_le_1.5": summary["error_rate"]["ratio_median"] is not None
        and summary["error_rate"]["ratio_median"] <= 1.5,
        "mean_shift_warns_within_2x": summary["mean_shift"]["ratio_median"] is not None
        and summary["mean_shift"]["ratio_median"] <= 2.0,
        "category_share_warns_within_2x": summary["category_share"]["ratio_median"] is not None
        and summary["category_share"]["ratio_median"] <= 2.0,
        "stationary_no_warning_or_critical": stationary["seen"] == long_n
        and not stationary["above_info"],
        "slow_drift_at_most_info": all(r["seen"] == long_n and not r["above_info"] for r in slow),
    }
    return {
        "setup": {
            "numeric_features": CORE_NUMERIC,
            "categorical_features": len(CORE_CATEGORIES),
            "partitions": CORE_PARTITIONS,
            "monitor_replicas": CORE_REPLICAS,
            "poll_events": POLL_EVENTS,
            "label_lag_events": list(LABEL_LAG_EVENTS),
            "error_rate": [ERROR_BEFORE, ERROR_AFTER],
            "mean_shift": {"feature": f"x{SHIFT_FEATURE:02d}", "sd": SHIFT_SD},
            "category_share": {
                "feature": f"c{SHARE_FEATURE}",
                "code": SHARE_CODE,
                "share": [round(1 / CORE_CATEGORIES[SHARE_FEATURE], 3), SHARE_AFTER],
            },
            "slow_drift": {
                "features": "x00..x04 (the score reads x15..x19)",
                "trend_sd_per_event": TREND_SD_PER_EVENT,
                "season": {"amplitude_sd": SEASON_AMPLITUDE_SD, "period_events": SEASON_PERIOD},
                "random_walk_step_sd": WALK_STEP_SD,
            },
            "family_delta": policy.budget.family_delta,
            "delay": "events after the change the detector had seen when it paged (warning or "
            "critical); labels in arrival order. Baseline: one River ADWIN fed the whole "
            "stream value by value in arrival order, with the delta the monitor's detector of "
            "that signal has (its share of the family budget; the verdicts) and with River's "
            "default 0.002 (no budget: the cost of the budget, for information)",
        },
        "detection": summary,
        "detection_rounds": detection,
        "stationary": stationary,
        "slow_drift": slow,
        "verdicts": verdicts,
        "passed": all(verdicts.values()),
    }


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

    def __init__(self, loop: BatchLoop, topic: str | None = None) -> None:
        self.loop = loop
        self.topic = topic  # count only this topic's records (the monitor reads its own too)
        self.first: float | None = None
        self.cpu_first: float | None = None
        self.cumulative = [0]
        self._inner: ProcessFn = loop.process
        loop.process = self._process

    async def _process(self, records: list[Record]) -> list[Out]:
        if self.first is None:
            self.first, self.cpu_first = time.perf_counter(), time.process_time()
        counted = [r for r in records if self.topic is None or r.topic == self.topic]
        self.cumulative.append(self.cumulative[-1] + len(counted))
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
            seen = sum(st.bank.score[0].seen for st in service.core.states.values())
            state = (assigned, probe.first is not None, seen)
            if state != reported:
                first = None
                if probe.first is not None:
                    first = time.time() - (time.perf_counter() - probe.first)
                print(
                    json.dumps(
                        {"assigned": assigned, "at": time.time(), "first": first, "seen": seen}
                    ),
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
    seen = [0, 0]  # predictions through each worker's whole-stream detectors
    settled: list[float] = []  # when both workers held 3 partitions each (final split)

    async def follow(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                return
            info = json.loads(line)
            assignments[i] = info["assigned"]
            seen[i] = info["seen"]
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
        # and through the second stage (whichever worker owns the model's signals)
        while sum(seen) < len(items):
            if time.monotonic() > deadline:
                raise TimeoutError(f"two monitors' detectors saw {sum(seen)}/{len(items)}")
            await asyncio.sleep(0.01)
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
        "from the first batch of either to every prediction through the whole-stream "
        "detectors (includes the group's rebalance when the second worker joins); "
        "after_the_split from the moment both held 3 partitions",
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
    probe = Probe(monitor.loop, settings.topic("predictions"))
    async with running(monitor) as task:
        monitored = await drain(probe, args.events, task, args.timeout)
        # and through the second stage: every prediction seen by the whole-stream detectors
        deadline = time.monotonic() + args.timeout
        while sum(st.bank.score[0].seen for st in monitor.core.states.values()) < args.events:
            if time.monotonic() > deadline:
                raise TimeoutError("the second stage did not see every prediction")
            await asyncio.sleep(0.005)
        assert probe.first is not None
        wall = time.perf_counter() - probe.first
        monitored["through_detectors_seconds"] = round(wall, 3)
        monitored["through_detectors_events_per_s"] = round(args.events / wall, 1)
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
        "monitor_keeps_up_with_one_process": monitored["through_detectors_events_per_s"]
        >= scored["events_per_s"],
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
    parser.add_argument("--quick", action="store_true", help="short seeded core run (CI)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--core-only", action="store_true", help="part 1 only (no broker)")
    parser.add_argument("--broker", action="store_true", help="part 2 with --quick too")
    parser.add_argument("--stationary-events", type=int, default=0, help=argparse.SUPPRESS)
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
    report: dict[str, Any] = {"core": core_bench(args)}
    say(f"core verdicts: {report['core']['verdicts']}")
    if args.core_only or (args.quick and not args.broker):
        shutil.rmtree(BENCH_HOME, ignore_errors=True)  # made at import, unused without a stack
        return _write(args, report)
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
        report["broker"] = runner(run_all(args, settings))
    finally:
        stack.down()
        shutil.rmtree(BENCH_HOME, ignore_errors=True)
    return _write(args, report)


def _write(args: argparse.Namespace, report: dict[str, Any]) -> int:
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0 if report["core"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
