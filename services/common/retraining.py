"""Asking for a retrain by hand and reading its outcome: the CLI (`models retrain`), the query
API (`POST /v1/models/{name}/retrain`) and tests use these; the trainer answers each request
on retrain.results under its request id (docs/adr/0008-retraining.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from scoremesh.contract.codec import codec
from scoremesh.contract.topics import TopicName
from services.common.kafka import (
    assign_all,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
)
from services.common.settings import Settings

REQUESTS: TopicName = "retrain.requests"
RESULTS: TopicName = "retrain.results"
TERMINAL = ("succeeded", "rejected", "failed")


def manual_request(
    model: str, actor: str, reason: str, window_end_ms: int, window_s: float, now_ms: int
) -> dict[str, Any]:
    """A RetrainRequest from a person: train on the events of ``window_s`` before the end."""
    return {
        "request_id": str(uuid.uuid4()),
        "model": model,
        "reason": f"manual: {reason}".rstrip(": "),
        "evidence": {},
        "window_start": int(window_end_ms - window_s * 1000),
        "window_end": window_end_ms,
        "actor": actor,
        "requested_at": now_ms,
    }


async def publish_request(
    settings: Settings, request: dict[str, Any], producer: AIOKafkaProducer | None = None
) -> None:
    """Send a request to retrain.requests (keyed by model) and wait for the acknowledgement."""
    own = producer is None
    producer = producer or make_producer(settings)
    if own:
        await start_with_retry(producer.start, "retrain-request", settings)
    try:
        await producer.send_and_wait(
            settings.topic(REQUESTS),
            codec("RetrainRequest").encode(request),
            key=request["model"].encode(),
        )
    finally:
        if own:
            await producer.stop()


async def wait_for_result(
    settings: Settings,
    request_id: str,
    timeout_s: float = 600.0,
    terminal: bool = True,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The latest RetrainResult of a request (its final one when ``terminal``);
    ``on_progress`` sees each newer record of the request as it arrives."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "retrain-results", settings)
    decode = codec("RetrainResult").decode
    latest: dict[str, Any] | None = None
    try:
        tps = await assign_all(consumer, settings.topic(RESULTS))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                for record in records:
                    result = decode(record.value)
                    if result["request_id"] == request_id:
                        latest = result
                        if on_progress is not None:
                            on_progress(result)
            if latest is not None and (not terminal or latest["status"] in TERMINAL):
                return latest
    finally:
        await consumer.stop()
    raise RetrainTimeout(
        f"no {'final ' if terminal else ''}result for retrain {request_id} in "
        f"{timeout_s:.0f}s; is `scoremesh run trainer` running? (the request stays on "
        "retrain.requests: a trainer started later picks it up)"
    )


async def latest_result(settings: Settings, request_id: str) -> dict[str, Any] | None:
    """The newest RetrainResult of a request on retrain.results now, or None."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "retrain-results", settings)
    decode = codec("RetrainResult").decode
    latest: dict[str, Any] | None = None
    try:
        tps = await assign_all(consumer, settings.topic(RESULTS))

        def keep(record: Any) -> None:
            nonlocal latest
            result = decode(record.value)
            if result["request_id"] == request_id:
                latest = result

        await read_to_end(consumer, tps, keep)
    finally:
        await consumer.stop()
    return latest


class RetrainTimeout(TimeoutError):
    """No (final) answer from the trainer in time."""
