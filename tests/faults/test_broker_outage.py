"""Broker unreachable at start: services retry with backoff, say so, and resume."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.common.devstack import DEV_KAFKA_SETTINGS, free_port
from services.common.kafka import ensure_topics
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import (
    ServiceProcess,
    consume_until,
    health,
    produce,
    register_model,
    start_broker,
)

pytestmark = pytest.mark.fault


async def test_scorer_waits_for_a_late_broker_and_then_serves(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    kafka_port, metrics_port = free_port(), free_port()
    s = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{kafka_port}", **DEV_KAFKA_SETTINGS}
    )
    scorer = ServiceProcess(
        "scorer",
        s,
        tmp_path,
        SCOREMESH_KAFKA_CONNECT_TIMEOUT_S="90",
        SCOREMESH_METRICS_PORT=str(metrics_port),
    )
    scorer.start()
    broker = None
    try:
        await asyncio.sleep(6)
        assert scorer.proc.poll() is None, scorer.log()[-2000:]
        assert health(metrics_port, "/healthz")[0] == 200
        status, body = health(metrics_port, "/readyz")
        assert status == 503 and not body["ready"]
        retries = scorer.log().count("Kafka not reachable, retrying")
        assert 2 <= retries <= 10, f"{retries} retries in 6 s: backoff is wrong"

        broker = start_broker(kafka_port, tmp_path / "tansu.log")
        await ensure_topics(s)
        async with Running(RegistryService(s)):
            assert (await register_model(s, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
            events = [{**e, "rule_set": "t", "flags": []} for e, _ in credit_events(100, seed=5)]
            from scoremesh.contract.codec import codec

            await produce(
                s,
                "events.valid",
                [(e["entity_id"].encode(), codec("Event").encode(e)) for e in events],
            )
            predictions = await consume_until(
                s, "predictions", lambda r: len(r) >= 100, timeout_s=90
            )
        assert len({p["event_id"] for p in predictions}) == 100
        assert health(metrics_port, "/readyz")[0] == 200
        assert "connected to Kafka" in scorer.log()
    finally:
        if scorer.proc.poll() is None:
            scorer.terminate()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
