"""Redis down for 30 s: scoring to Kafka goes on, writes are counted as skipped, readiness
says so, and everything recovers without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from scoremesh.contract.codec import codec
from services.common.devstack import free_port, start_redis_server
from services.common.health import HealthServer
from services.common.query_store import QueryStore
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model

pytestmark = pytest.mark.fault

OUTAGE_S = 30


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    return start_redis_server(port, log)


def skipped() -> float:
    return (
        REGISTRY.get_sample_value("scoremesh_query_store_writes_total", {"outcome": "skipped"})
        or 0.0
    )


async def send_valid(settings: Settings, start: int, n: int) -> list[str]:
    events = [
        {**e, "event_id": f"r-{start + i}", "rule_set": "t", "flags": []}
        for i, (e, _) in enumerate(credit_events(n, seed=start))
    ]
    await produce(
        settings,
        "events.valid",
        [(e["entity_id"].encode(), codec("Event").encode(e)) for e in events],
    )
    return [e["event_id"] for e in events]


async def test_redis_outage(settings: Settings, trained_model: Any, tmp_path: Path) -> None:
    port = free_port()
    redis = start_redis(port, tmp_path / "redis.log")
    s = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    try:
        async with Running(RegistryService(s)):
            assert (await register_model(s, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
            scorer = ScorerService(s)
            health = HealthServer("scorer", "127.0.0.1", 0)
            scorer.register_checks(health)
            async with Running(scorer):
                before = await send_valid(s, 0, 200)
                await consume_until(s, "predictions", lambda r: len(r) >= 200)
                assert health.readiness()[0]

                redis.terminate()
                redis.wait(10)
                skipped_before = skipped()
                during: list[str] = []
                outage_started = time.monotonic()
                while time.monotonic() - outage_started < OUTAGE_S:
                    during += await send_valid(s, 1000 + len(during), 100)
                    await asyncio.sleep(2)
                predictions = await consume_until(
                    s,
                    "predictions",
                    lambda r: {p["event_id"] for p in r} >= set(during),
                    timeout_s=30,
                )
                assert {p["event_id"] for p in predictions} >= set(during), (
                    "scoring stopped with Redis down"
                )
                assert skipped() - skipped_before >= len(during) * 0.9
                ready, checks = health.readiness()
                assert not ready and checks["redis"].startswith("not ready")

                redis = start_redis(port, tmp_path / "redis.log")
                after = await send_valid(s, 100_000, 100)
                await consume_until(
                    s, "predictions", lambda r: {p["event_id"] for p in r} >= set(after)
                )
                deadline = time.monotonic() + 15
                while not health.readiness()[0] and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert health.readiness()[0], "did not recover without a restart"
                store = QueryStore(s)
                assert await store.prediction("credit", after[-1]) is not None
                assert await store.prediction("credit", before[0]) is None  # Redis restarted empty
                await store.close()
    finally:
        redis.terminate()
        redis.wait(10)
