"""Asking for a retrain by hand and reading its outcome: the CLI (`models retrain`), the query
API (`POST /v1/models/{name}/retrain`) and tests use these; the trainer answers each request
on retrain.results under its request id (docs/adr/0008-retraining.md)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from scoremesh.contract.codec import codec
from scoremesh.contract.topics import TopicName
from services.common.kafka import (
    assign_all,
    make_consumer,
    read_to_end,
    send_one,
    start_with_retry,
)
from services.common.settings import Settings

REQUESTS: TopicName = "retrain.requests"
RESULTS: TopicName = "retrain.results"
TERMINAL = ("succeeded", "rejected", "failed", "needs_person")


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
    await send_one(
        settings,
        settings.topic(REQUESTS),
        codec("RetrainRequest").encode(request),
        request["model"].encode(),
        "retrain-request",
        producer,
    )


@contextlib.asynccontextmanager
async def _results(settings: Settings) -> AsyncIterator[tuple[AIOKafkaConsumer, list[Any]]]:
    """A consumer of every partition of retrain.results, from the beginning."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "retrain-results", settings)
    try:
        yield consumer, await assign_all(consumer, settings.topic(RESULTS))
    finally:
        await consumer.stop()


async def wait_for_result(
    settings: Settings,
    request_id: str,
    timeout_s: float = 600.0,
    terminal: bool = True,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The latest RetrainResult of a request (its final one when ``terminal``);
    ``on_progress`` sees each newer record of the request as it arrives."""
    decode = codec("RetrainResult").decode
    latest: dict[str, Any] | None = None
    async with _results(settings) as (consumer, tps):
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
    raise RetrainTimeout(
        f"no {'final ' if terminal else ''}result for retrain {request_id} in "
        f"{timeout_s:.0f}s; is `scoremesh run trainer` running? (the request stays on "
        "retrain.requests: a trainer started later picks it up)"
    )


async def latest_result(settings: Settings, request_id: str) -> dict[str, Any] | None:
    """The newest RetrainResult of a request on retrain.results now, or None."""
    decode = codec("RetrainResult").decode
    latest: dict[str, Any] | None = None

    def keep(record: Any) -> None:
        nonlocal latest
        result = decode(record.value)
        if result["request_id"] == request_id:
            latest = result

    async with _results(settings) as (consumer, tps):
        await read_to_end(consumer, tps, keep)
    return latest


class RetrainTimeout(TimeoutError):
    """No (final) answer from the trainer in time."""
