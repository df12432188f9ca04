"""/readyz asks the broker itself: a broker lost while no request comes in still shows."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError

from services.common.settings import Settings
from services.query.runtime import QueryRuntime


async def test_readiness_follows_the_broker_without_traffic(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = QueryRuntime(settings.model_copy(update={"redis_url": None}))
    runtime.producer_started = True  # started earlier; no request has been sent since

    async def gone() -> None:
        raise KafkaConnectionError("connection refused")

    async def back() -> None:
        return None

    monkeypatch.setattr(runtime.producer.client, "fetch_all_metadata", gone)
    ready = await runtime.readiness()
    assert not ready.ready
    assert ready.checks["kafka"].startswith("not ready: broker does not answer")

    monkeypatch.setattr(runtime.producer.client, "fetch_all_metadata", back)
    ready = await runtime.readiness()
    assert ready.checks["kafka"] == "ok: broker answers"
