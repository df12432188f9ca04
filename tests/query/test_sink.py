"""The sync-prediction sink is bounded: backpressure first, counted drops past a hard cap."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY

from services.common.settings import Settings
from services.query.runtime import Backlogged, QueryRuntime
from services.query.sink import OVERSHOOT, PredictionSink
from tests.query.conftest import events


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def predictions(n: int) -> list[dict[str, Any]]:
    return [{"event_id": f"e-{i}", "entity_id": "c", "variant": "champion"} for i in range(n)]


async def test_a_full_backlog_refuses_the_request_before_it_is_scored(settings: Settings) -> None:
    config = settings.replace(api_publish_max_inflight=4, api_publish_wait_ms=20).api
    runtime = QueryRuntime(settings, config)
    refused = sample("scoremesh_api_publish_backpressure_total")
    runtime.sink.inflight = 4  # four predictions await Kafka: no room
    submitted: list[Any] = []
    runtime.batcher("credit").process = lambda items, first_at: submitted.append(items) or []  # type: ignore[assignment,func-returns-value]
    try:
        await runtime.predict("credit", events(1))
    except Backlogged as exc:
        assert "4 sync predictions" in str(exc)
    else:
        raise AssertionError("a full backlog must refuse the request")
    finally:
        runtime.sink.inflight = 0
        await runtime.stop()
        await runtime.producer.stop()  # created but never started
    assert submitted == [] and runtime.batcher("credit").pending == 0  # nothing was scored
    assert sample("scoremesh_api_publish_backpressure_total") == refused + 1


async def test_a_request_goes_on_when_room_frees_up_while_it_waits() -> None:
    sink = PredictionSink(None, "predictions", None, max_inflight=2)  # type: ignore[arg-type]
    sink.inflight = 2

    def acknowledged() -> None:  # what the Kafka pump does after a round
        sink.inflight = 0
        sink._room.set()

    asyncio.get_running_loop().call_later(0.01, acknowledged)
    assert await sink.wait_for_room(5.0) is True
    sink.inflight = 2
    assert await sink.wait_for_room(0.01) is False


async def test_past_the_hard_cap_predictions_are_dropped_and_counted() -> None:
    store: Any = object()  # only its presence matters: the pumps are not running
    sink = PredictionSink(None, "predictions", store, max_inflight=3)  # type: ignore[arg-type]
    labels = {"reason": "backpressure"}
    dropped = sample("scoremesh_api_published_dropped_total", labels)
    store_dropped = sample("scoremesh_api_store_dropped_total")
    sink.publish(predictions(OVERSHOOT * 3))  # admission was outrun: still queued
    assert sink.inflight == OVERSHOOT * 3
    assert sample("scoremesh_api_published_dropped_total", labels) == dropped
    sink.publish(predictions(2))  # past the hard cap: dropped from Kafka, counted
    assert sink.inflight == OVERSHOOT * 3
    assert sample("scoremesh_api_published_dropped_total", labels) == dropped + 2
    # the store's queue keeps the newest, and counts the oldest it let go
    assert len(sink._to_store) == OVERSHOOT * 3
    assert sink._to_store[-1]["event_id"] == "e-1"
    assert sample("scoremesh_api_store_dropped_total") == store_dropped + 2
