"""Replaying the dead-letter topic: rejected events go back to events.raw after a fix.

A rejection is replayed when it matches the filters (reason codes, time, model), its
original bytes were kept whole, it has not been replayed before (each replay carries the
rejected record's source as a header on events.raw) and, for a validation rejection, the
event has not passed validation since. Rejections from scoring (a model with no loadable
champion, a batch the model could not score) are replayed too: the event is validated
and scored again by the mesh as it is now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import CodecError, decode_any
from scoremesh.contract.records import Rejection
from scoremesh.contract.topics import TopicName
from services.common.kafka import make_producer, start_with_retry
from services.common.service import fold_topics
from services.common.settings import Settings

REPLAY_HEADER = "scoremesh-replay-of"
REPLAYABLE_STAGES = ("validation", "scoring")


@dataclass
class ReplaySummary:
    matched: int = 0
    replayed: int = 0
    already_valid: int = 0
    already_replayed: int = 0
    truncated: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)


def model_of(rejection: Rejection, default: str) -> str | None:
    """The model a rejected event was for: named in its original bytes, else the default
    model; None when the original cannot be read (it is then matched by no --model)."""
    try:
        original = decode_any("events.raw", rejection["original"])
    except (CodecError, ValueError):
        return None
    model = original.get("model")
    return model if isinstance(model, str) and model else default


async def replay_dlq(
    settings: Settings,
    reasons: set[str],
    since_ms: int | None,
    dry_run: bool,
    models: set[str] | None = None,
    on_sent: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Replay the matching rejections (see the module docstring); ``on_sent(acknowledged,
    total)`` follows the sending."""
    summary = ReplaySummary()
    candidates: list[tuple[Rejection, str | None]] = []
    valid: set[tuple[str, str]] = set()
    replayed_sources: set[str] = set()
    default = settings.model_name

    def on_rejected(record: ConsumerRecord[bytes, bytes]) -> None:
        value: Any = decode_any("events.rejected", record.value or b"")
        if value["stage"] not in REPLAYABLE_STAGES:
            return
        codes = {r["code"] for r in value["reasons"]}
        if reasons and not codes & reasons:
            return
        if since_ms is not None and value["rejected_at"] < since_ms:
            return
        model = model_of(value, default)
        if models and model not in models:
            return
        candidates.append((value, model))

    def on_valid(record: ConsumerRecord[bytes, bytes]) -> None:
        event = decode_any("events.valid", record.value or b"")
        valid.add((event.get("model") or default, event["event_id"]))

    def on_raw(record: ConsumerRecord[bytes, bytes]) -> None:
        for key, value in record.headers or ():
            if key == REPLAY_HEADER:
                replayed_sources.add(value.decode())

    folds: list[tuple[TopicName, Any]] = [
        ("events.rejected", on_rejected),
        ("events.valid", on_valid),
        ("events.raw", on_raw),
    ]
    await fold_topics(settings, folds, "dlq-replay", timeout_s=300)
    to_send: list[tuple[str, Rejection]] = []
    for rejection, model in candidates:
        summary.matched += 1
        source = (
            f"{rejection['source_topic']}/{rejection['source_partition']}/"
            f"{rejection['source_offset']}"
        )
        event_id = rejection.get("event_id")
        if rejection["truncated"]:
            summary.truncated += 1
        elif (
            rejection["stage"] == "validation"
            and event_id
            and (model or default, event_id) in valid
        ):
            summary.already_valid += 1
        elif source in replayed_sources:
            summary.already_replayed += 1
        else:
            to_send.append((source, rejection))
            code = rejection["reasons"][0]["code"]
            summary.by_reason[code] = summary.by_reason.get(code, 0) + 1
            name = model or "(unreadable)"
            summary.by_model[name] = summary.by_model.get(name, 0) + 1
    if dry_run or not to_send:
        summary.replayed = len(to_send) if dry_run else 0  # what a real run would send
        return summary
    producer = make_producer(
        settings, max_request_size=max(settings.kafka_max_request_bytes, 8 * 1024 * 1024)
    )
    await start_with_retry(producer.start, "dlq-replay", settings)
    try:
        futures = []
        acknowledged = 0

        def acked(_: Any) -> None:
            nonlocal acknowledged
            acknowledged += 1
            if on_sent is not None:
                on_sent(acknowledged, len(to_send))

        for source, rejection in to_send:
            entity_id = rejection.get("entity_id")
            future = await producer.send(
                settings.topic("events.raw"),
                rejection["original"],
                key=entity_id.encode() if entity_id else None,
                headers=[
                    (REPLAY_HEADER, source.encode()),
                    ("scoremesh-replayed-at", str(int(time.time() * 1000)).encode()),
                ],
            )
            future.add_done_callback(acked)
            futures.append(future)
        await asyncio.gather(*futures)
        summary.replayed = len(futures)
    finally:
        await producer.stop()
    return summary
