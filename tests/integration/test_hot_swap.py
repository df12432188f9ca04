"""Hot-loading under a continuous stream: promote, roll back, refuse bad artifacts."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest

from scoremesh.contract.codec import codec
from services.common.commands import command, new_command, read_history
from services.common.kafka import make_producer, start_with_retry
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import consume_until, register_model

pytestmark = pytest.mark.integration


async def stream_events(
    settings: Settings, n: int, rate: float, sent: dict[str, tuple[int, int]]
) -> None:
    """Produce valid events at a steady rate, remembering each one's partition and offset."""
    producer = make_producer(settings)
    await start_with_retry(producer.start, "stream", settings)
    encode = codec("Event").encode
    topic = settings.topic("events.valid")
    started = time.monotonic()
    try:
        pending = []
        for i, (event, _) in enumerate(credit_events(n, seed=31)):
            record = {**event, "rule_set": "test", "flags": []}
            pending.append(
                (
                    event["event_id"],
                    await producer.send(topic, encode(record), key=event["entity_id"].encode()),
                )
            )
            if len(pending) >= 100:
                for event_id, fut in pending:
                    meta = await fut
                    sent[event_id] = (meta.partition, meta.offset)
                pending.clear()
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        for event_id, fut in pending:
            meta = await fut
            sent[event_id] = (meta.partition, meta.offset)
    finally:
        await producer.stop()


async def test_promote_and_rollback_under_load_switch_between_batches_and_lose_nothing(
    settings: Settings, trained_model: Any, trained_model_b: Any
) -> None:
    n = 12_000
    sent: dict[str, tuple[int, int]] = {}
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        assert (await register_model(settings, trained_model_b.onnx, "1.1.0", stage="shadow"))[
            "outcome"
        ] == "applied"
        async with Running(ScorerService(settings)) as scorer:
            deadline = time.monotonic() + 30
            while not scorer.loop.assigned and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            producer = asyncio.create_task(stream_events(settings, n, rate=2_000, sent=sent))
            await asyncio.sleep(2.0)
            promoted = await command(
                settings,
                new_command("credit", "promote", "test", version="1.1.0", target_stage="champion"),
            )
            assert promoted["outcome"] == "applied"
            await asyncio.sleep(2.0)
            assert scorer.holder.current.of("credit").champion.key == "credit@1.1.0"
            rolled = await command(
                settings, new_command("credit", "rollback", "test", reason="test")
            )
            assert rolled["outcome"] == "applied" and rolled["new_champion"] == "1.0.0"
            await producer
            predictions = await consume_until(
                settings,
                "predictions",
                lambda r: len({p["event_id"] for p in r if p["variant"] == "champion"}) >= n,
                timeout_s=90,
            )
    champion = {}
    duplicates = 0
    for p in predictions:
        if p["variant"] != "champion":
            continue
        if p["event_id"] in champion:
            duplicates += 1
            assert champion[p["event_id"]] == p["model_version"]
        champion[p["event_id"]] = p["model_version"]
    assert set(champion) == set(sent), "every event scored by a champion"
    counts = defaultdict(int)
    for version in champion.values():
        counts[version] += 1
    assert sum(counts.values()) == n and counts["1.0.0"] > 0 and counts["1.1.0"] > 0
    # Per partition, in offset order, the champion only ever follows the registry's changes
    # 1.0.0 -> 1.1.0 -> 1.0.0: one switch per change, never back and forth within a change.
    allowed = {
        ("1.0.0", "1.1.0", "1.0.0"),
        ("1.0.0", "1.1.0"),
        ("1.1.0", "1.0.0"),
        ("1.0.0",),
        ("1.1.0",),
    }
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for event_id, (partition, offset) in sent.items():
        by_partition[partition].append((offset, champion[event_id]))
    for partition, seq in by_partition.items():
        versions = [v for _, v in sorted(seq)]
        runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        assert tuple(runs) in allowed, (partition, runs)
    assert duplicates == 0


async def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    settings: Settings, trained_model: Any
) -> None:
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        async with Running(ScorerService(settings)) as scorer:
            # A record no registry would write: champion with a checksum its bytes do not have.
            view = scorer.view.state
            good = view.champion("credit")
            bogus = {
                **good.to_record(),
                "version": "9.9.9",
                "generation": good.generation + 100,
                "artifact_sha256": "f" * 64,
                "request_id": "tampered",
            }
            producer = make_producer(settings)
            await start_with_retry(producer.start, "bogus", settings)
            await producer.send_and_wait(
                settings.topic("models.registry"),
                codec("ModelVersion").encode(bogus),
                key=b"credit@9.9.9",
            )
            await producer.stop()
            deadline = time.monotonic() + 20
            while (
                "credit@9.9.9" not in scorer.holder.current.failures and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.2)
            assert "credit@9.9.9" in scorer.holder.current.failures
            assert scorer.holder.current.of("credit").champion.key == "credit@1.0.0"
            history: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not any(
                e["action"] == "load_failed" for e in history
            ):
                history = await read_history(settings, "credit")
            entry = next(e for e in history if e["action"] == "load_failed")
            assert entry["version"] == "9.9.9" and entry["actor"].startswith("scorer:")
            assert entry["outcome"] == "refused" and "not registered" in entry["detail"]
            assert "sha256 does not match" in entry["detail"] or "checksum" in entry["detail"]
