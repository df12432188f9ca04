"""A burst of 10x the normal rate against a scorer that was down: memory stays bounded
(fetches are bounded by the consumer's byte limits, batches by SCOREMESH_BATCH_MAX_RECORDS)
and nothing is lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from scoremesh.contract.codec import codec
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import ServiceProcess, consume_until, produce, register_model, wait_for_log

pytestmark = pytest.mark.fault

BACKLOG = 60_000  # ~10x a 1k/s stream for 6 s, all waiting when the scorer comes up
RSS_LIMIT_MB = 600


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_backlog_burst_keeps_memory_bounded_and_loses_nothing(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    encode = codec("Event").encode
    events = [
        {**e, "rule_set": "t", "flags": []}
        for e, _ in credit_events(BACKLOG, seed=123, id_prefix="burst")
    ]
    await produce(settings, "events.valid", [(e["entity_id"].encode(), encode(e)) for e in events])
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        scorer = ServiceProcess("scorer", settings, tmp_path)
        scorer.start()
        peak = 0.0
        try:
            await wait_for_log(scorer, "service started")
            deadline = time.monotonic() + 180
            while await _count(settings) < BACKLOG and time.monotonic() < deadline:
                peak = max(peak, rss_mb(scorer.proc.pid))
                await asyncio.sleep(0.25)
            peak = max(peak, rss_mb(scorer.proc.pid))
        finally:
            scorer.terminate()
    assert peak < RSS_LIMIT_MB, f"scorer RSS peaked at {peak:.0f} MB"
    predictions = await consume_until(
        settings, "predictions", lambda r: len(r) >= BACKLOG, timeout_s=60
    )
    assert {p["event_id"] for p in predictions} == {e["event_id"] for e in events}
    print(f"\nburst: {BACKLOG} backlog events, scorer RSS peak {peak:.0f} MB, 0 lost")


async def _count(settings: Settings) -> int:
    from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry

    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "burst-count", settings)
    try:
        tps = await assign_all(consumer, settings.topic("predictions"))
        return await read_to_end(consumer, tps, lambda _r: None, timeout_s=60)
    finally:
        await consumer.stop()
