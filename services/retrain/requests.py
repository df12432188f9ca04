"""Publishing retrain requests and reading their outcome (CLI, API, tests)."""

from __future__ import annotations

import time
from typing import Any

from scoremesh.contract.codec import codec
from services.common.kafka import assign_all, make_consumer, make_producer, start_with_retry
from services.common.settings import Settings


async def publish_request(settings: Settings, request: dict[str, Any]) -> None:
    producer = make_producer(settings)
    await start_with_retry(producer.start, "retrain-request", settings)
    try:
        await producer.send_and_wait(
            settings.topic("retrain.requests"),
            codec("RetrainRequest").encode(request),
            key=request["model"].encode(),
        )
    finally:
        await producer.stop()


async def wait_for_result(
    settings: Settings, request_id: str, timeout_s: float = 600.0, terminal: bool = True
) -> dict[str, Any]:
    """The latest RetrainResult of a request (its final one when ``terminal``)."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "retrain-results", settings)
    decode = codec("RetrainResult").decode
    latest: dict[str, Any] | None = None
    try:
        tps = await assign_all(consumer, settings.topic("retrain.results"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                for record in records:
                    result = decode(record.value)
                    if result["request_id"] == request_id:
                        latest = result
            if latest is not None and (not terminal or latest["status"] != "started"):
                return latest
    finally:
        await consumer.stop()
    raise TimeoutError(
        f"no {'final ' if terminal else ''}result for retrain {request_id} in "
        f"{timeout_s:.0f}s; is `scoremesh run trainer` running?"
    )
