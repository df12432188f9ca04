"""The closed loop, told as a stream: drift injected at a known event, detected, retrained,
shadowed, promoted, hot-loaded — and measured from the labelled predictions themselves.

``stream_with_labels`` produces events at a steady rate with labels arriving late (some
never), switching the concept at ``drift_at``; ``Observer`` follows the mesh's own topics
(labelled predictions, alerts, retrain requests and results, the deployment log) and
places every signal on the stream's event index.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import orjson

from scoremesh.contract.codec import codec
from scoremesh.contract.records import DeploymentEvent
from scoremesh.contract.topics import TopicName
from services.common.commands import describe
from services.common.kafka import assign_all, make_consumer, make_producer, start_with_retry
from services.common.settings import Settings
from services.trainer.datasets import agrawal_rows, envelope

START_MS = 1_767_225_600_000
STEP_MS = 1_000  # one event per second of event time
CONCEPT_BEFORE, CONCEPT_AFTER = 0, 2  # Agrawal labelling functions


def event_index(event_id: str) -> int | None:
    if event_id.startswith("e") and event_id[1:].isdigit():
        return int(event_id[1:])
    return None


def stream(seed: int, drift_at: int) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(index, event, true label) forever; the concept changes at ``drift_at``."""
    rows = itertools.chain(
        agrawal_rows(drift_at, seed, CONCEPT_BEFORE),
        agrawal_rows(10**9, seed + 1, CONCEPT_AFTER),
    )
    for i, (features, label) in enumerate(rows):
        yield i, envelope(i, f"e{i:08d}", features, seed, START_MS, STEP_MS), label


@dataclass
class Observer:
    """What the mesh said, on the stream's event index."""

    settings: Settings
    produced: int = 0  # events sent so far (the "now" of markers seen live)
    correct: dict[tuple[str, str], dict[int, bool]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    alerts: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    promoted_at: int | None = None
    promoted_version: str | None = None

    async def follow(self, stop: asyncio.Event) -> None:
        consumer = make_consumer(self.settings, group_id=None, max_poll_records=5000)
        await start_with_retry(consumer.start, "demo-observer", self.settings)
        names: tuple[TopicName, ...] = (
            "predictions.labeled",
            "alerts",
            "retrain.requests",
            "retrain.results",
            "deployments.log",
        )
        try:
            tps: list[Any] = []
            for name in names:
                tps += await assign_all(consumer, self.settings.topic(name))
                consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            prefix = len(self.settings.topic_prefix)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=300)
                for tp, records in batches.items():
                    name = tp.topic[prefix:]
                    value_codec = codec(
                        {
                            "predictions.labeled": "LabeledPrediction",
                            "alerts": "Alert",
                            "retrain.requests": "RetrainRequest",
                            "retrain.results": "RetrainResult",
                            "deployments.log": "DeploymentEvent",
                        }[name]
                    )
                    for record in records:
                        self._see(name, value_codec.decode(record.value))
        finally:
            await consumer.stop()

    def _see(self, name: str, value: dict[str, Any]) -> None:
        if name == "predictions.labeled":
            index = event_index(value["event_id"])
            if index is not None:
                self.correct[(value["model_version"], value["variant"])][index] = value["correct"]
        elif name == "alerts":
            self.alerts.append({**value, "seen_at_index": self.produced})
        elif name == "retrain.requests":
            self.requests.append({**value, "seen_at_index": self.produced})
        elif name == "retrain.results":
            self.results.append({**value, "seen_at_index": self.produced})
        else:
            self.deployments.append({**value, "seen_at_index": self.produced})
            # A promotion that replaces a champion (the bootstrap's first one replaces none).
            if (
                value["outcome"] == "applied"
                and value.get("to_stage") == "champion"
                and value["action"] == "promote"
                and value.get("previous_champion")
                and self.promoted_at is None
            ):
                self.promoted_at = self.produced
                self.promoted_version = value["version"]

    def index_of(self, event_time_ms: int) -> int:
        return max(0, (int(event_time_ms) - START_MS) // STEP_MS)

    def detection(self, drift_at: int) -> dict[str, Any] | None:
        """The first firing performance/drift alert at or after the injected change: the
        first page (warning or critical) if there is one; an info alert only says that
        something moved (docs/adr/0007)."""
        firing = [
            a
            for a in self.alerts
            if a["state"] == "firing"
            and a["kind"] in ("performance", "drift")
            and self.index_of(a["first_seen"]) >= drift_at
        ]
        pages = [a for a in firing if a["severity"] in ("warning", "critical")]
        firing = pages or firing
        if not firing:
            return None
        first = min(firing, key=lambda a: a["first_seen"])
        return {
            "alert_key": first["alert_key"],
            "kind": first["kind"],
            "severity": first["severity"],
            "index": self.index_of(first["first_seen"]),
            "summary": first["summary"],
        }

    def accuracy(self, version: str, variant: str, lo: int, hi: int) -> tuple[float | None, int]:
        marks = [ok for i, ok in self.correct.get((version, variant), {}).items() if lo <= i < hi]
        return (float(np.mean(marks)) if marks else None), len(marks)

    def rolling(self, window: int = 400, step: int = 100) -> dict[str, list[tuple[int, float]]]:
        series: dict[str, list[tuple[int, float]]] = {}
        for (version, variant), marks in sorted(self.correct.items()):
            if len(marks) < window // 2:
                continue
            indices = np.array(sorted(marks))
            values = np.array([marks[i] for i in indices], dtype=float)
            points = []
            for end in range(window, len(indices) + 1, step):
                points.append(
                    (int(indices[end - 1]), round(float(values[end - window : end].mean()), 4))
                )
            series[f"{version} ({variant})"] = points
        return series


@dataclass
class StreamStats:
    produced: int = 0
    invalid: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    labels_sent: int = 0
    labels_withheld: int = 0
    started: float = 0.0
    finished: float = 0.0


async def stream_with_labels(
    settings: Settings,
    observer: Observer,
    *,
    seed: int,
    minimum: int,
    drift_at: int,
    after_promotion: int,
    maximum: int,
    rate: float,
    invalid_share: float,
    label_delay_mean: float,
    label_missing_share: float,
    closed_loop: bool,
    invalid_value: Any,
    invalid_kinds: tuple[str, ...],
    progress: Any,
    events: Iterator[tuple[int, dict[str, Any], str]] | None = None,
    stop_when: Callable[[Observer], bool] | None = None,
) -> StreamStats:
    """``events``: another (index, event, label) stream than the demo's (``stream``);
    ``stop_when``: end the stream early once the observer has seen what it waits for."""
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "demo-stream", settings)
    rng = np.random.default_rng(seed)
    event_codec, label_codec = codec("Event"), codec("Label")
    raw, labels_topic = settings.topic("events.raw"), settings.topic("labels")
    due: list[tuple[int, str, bytes]] = []  # (index the label is due at, event_id, value)
    stats = StreamStats(started=time.time())
    futures: list[Any] = []
    try:
        for i, event, label in events if events is not None else stream(seed, drift_at):
            if rng.random() < invalid_share:
                kind = invalid_kinds[int(rng.integers(len(invalid_kinds)))]
                value = invalid_value(kind, event)
                stats.invalid += 1
                stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
            else:
                value = event_codec.encode(event) if i % 3 else orjson.dumps(event)
                stats.by_kind["valid"] = stats.by_kind.get("valid", 0) + 1
                if rng.random() < label_missing_share:
                    stats.labels_withheld += 1
                else:
                    delay = 1 + int(rng.exponential(label_delay_mean))
                    heapq.heappush(
                        due,
                        (
                            i + delay,
                            event["event_id"],
                            label_codec.encode(
                                {
                                    "event_id": event["event_id"],
                                    "value": label,
                                    "label_time": event["event_time"] + delay * STEP_MS,
                                }
                            ),
                        ),
                    )
            futures.append(await producer.send(raw, value, key=event["entity_id"].encode()))
            while due and due[0][0] <= i:
                _, event_id, label_value = heapq.heappop(due)
                futures.append(
                    await producer.send(labels_topic, label_value, key=event_id.encode())
                )
                stats.labels_sent += 1
            stats.produced = observer.produced = i + 1
            if len(futures) >= 200:
                await asyncio.gather(*futures)
                futures.clear()
                delay_s = stats.started + stats.produced / rate - time.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            target = minimum
            if closed_loop:
                target = (
                    maximum
                    if observer.promoted_at is None
                    else max(minimum, observer.promoted_at + after_promotion)
                )
            progress.bar("stream", stats.produced, min(target, maximum))
            if stats.produced >= min(target, maximum):
                break
            if stop_when is not None and i % 200 == 199 and stop_when(observer):
                break
        while due:  # the rest of the labels arrive after the stream ends
            _, event_id, label_value = heapq.heappop(due)
            futures.append(await producer.send(labels_topic, label_value, key=event_id.encode()))
            stats.labels_sent += 1
        await asyncio.gather(*futures)
        progress.end()
    finally:
        await producer.stop()
    stats.finished = time.time()
    return stats


def story(observer: Observer, drift_at: int, produced: int) -> dict[str, Any]:
    """Accuracy before drift, after drift, after promotion; detection; retrain; history."""
    first = min(
        (d for d in observer.deployments if d["to_stage"] == "champion"),
        key=lambda d: d["at"],
        default=None,
    )
    original = first["version"] if first else "1.0.0"
    new = observer.promoted_version
    end = produced
    promoted = observer.promoted_at
    before, n_before = observer.accuracy(original, "champion", 0, drift_at)
    after, n_after = observer.accuracy(original, "champion", drift_at, promoted or end)
    out: dict[str, Any] = {
        "drift_injected_at": drift_at,
        "accuracy_before_drift": {"version": original, "accuracy": before, "labels": n_before},
        "accuracy_after_drift": {"version": original, "accuracy": after, "labels": n_after},
    }
    if new and promoted is not None:
        post, n_post = observer.accuracy(new, "champion", promoted, end)
        old_post, n_old = observer.accuracy(original, "shadow", promoted, end)
        out["accuracy_after_promotion"] = {
            "version": new,
            "accuracy": post,
            "labels": n_post,
            "promoted_at": promoted,
        }
        if n_old:
            out["old_champion_on_same_events"] = {
                "version": original,
                "accuracy": old_post,
                "labels": n_old,
            }
    detection = observer.detection(drift_at)
    out["detection"] = (
        None if detection is None else {**detection, "delay_events": detection["index"] - drift_at}
    )
    out["retrain_requests"] = [
        {
            "request_id": r["request_id"],
            "reason": r["reason"],
            "actor": r["actor"],
            "window": [observer.index_of(r["window_start"]), observer.index_of(r["window_end"])],
            "seen_at_index": r["seen_at_index"],
        }
        for r in observer.requests
    ]
    finals = [r for r in observer.results if r["status"] != "started"]
    out["retrain_results"] = [
        {
            "request_id": r["request_id"],
            "status": r["status"],
            "version": r["version"],
            "detail": r["detail"],
            "candidate_accuracy": r["metrics"].get("accuracy"),
            "champion_accuracy": r["champion_metrics"].get("accuracy"),
            "examples": r["examples"],
        }
        for r in finals
    ]
    out["deployment_history"] = [
        describe(cast(DeploymentEvent, d)) + (f" — {d['reason']}" if d.get("reason") else "")
        for d in sorted(observer.deployments, key=lambda d: d["at"])
    ]
    return out


def markers(observer: Observer, drift_at: int) -> list[dict[str, Any]]:
    out = [{"label": "drift injected", "index": drift_at, "detail": "labelling function 0 -> 2"}]
    detection = observer.detection(drift_at)
    if detection:
        out.append(
            {"label": "drift detected", "index": detection["index"], "detail": detection["summary"]}
        )
    for r in observer.requests:
        out.append(
            {"label": "retrain requested", "index": r["seen_at_index"], "detail": r["reason"]}
        )
    for d in observer.deployments:
        if (
            d["outcome"] == "applied"
            and d["action"] == "promote"
            and d.get("to_stage") == "champion"
            and d.get("previous_champion")
        ):
            detail = describe(cast(DeploymentEvent, d))  # the record, seen_at_index added
            out.append({"label": "promoted", "index": d["seen_at_index"], "detail": detail})
    return out
