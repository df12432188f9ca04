"""SIGKILL the hot path mid-stream: nothing is lost, duplicates are bounded and counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from scoremesh.contract.codec import codec
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import ServiceProcess, consume_until, produce_steadily, register_model

pytestmark = pytest.mark.fault

N = 15_000
RATE = 1_500.0


async def produce_raw(settings: Settings, n: int, rate: float) -> dict[str, bool]:
    """Steady traffic to events.raw, 2% deliberately invalid; returns event_id -> valid?"""
    expected: dict[str, bool] = {}
    encode = codec("Event").encode
    values: list[tuple[bytes | None, bytes]] = []
    for i, (event, _) in enumerate(credit_events(n, seed=44)):
        valid = i % 50 != 7
        if not valid:
            event = {**event, "features": {**event["features"], "age": "old"}}
        values.append(
            (event["entity_id"].encode(), encode(event) if valid and i % 2 else orjson.dumps(event))
        )
        expected[event["event_id"]] = valid
    await produce_steadily(settings, "events.raw", values, rate)
    return expected


def account(
    expected: dict[str, bool],
    valid: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    predictions: list[dict[str, Any]],
) -> dict[str, int]:
    valid_ids = [v["event_id"] for v in valid]
    rejected_ids = [r["event_id"] for r in rejected]
    champion_ids = [p["event_id"] for p in predictions if p["variant"] == "champion"]
    assert set(valid_ids) == {e for e, ok in expected.items() if ok}, "valid events lost"
    assert set(rejected_ids) == {e for e, ok in expected.items() if not ok}, "rejections lost"
    assert set(champion_ids) == set(valid_ids), "valid events without a champion prediction"
    return {
        "sent": len(expected),
        "duplicated_valid": len(valid_ids) - len(set(valid_ids)),
        "duplicated_rejected": len(rejected_ids) - len(set(rejected_ids)),
        "duplicated_predictions": len(champion_ids) - len(set(champion_ids)),
    }


async def wait_all(
    settings: Settings, expected: dict[str, bool]
) -> tuple[list[Any], list[Any], list[Any]]:
    n_valid = sum(expected.values())
    valid = await consume_until(
        settings, "events.valid", lambda r: len({v["event_id"] for v in r}) >= n_valid, 120
    )
    rejected = await consume_until(
        settings,
        "events.rejected",
        lambda r: len({v["event_id"] for v in r}) >= len(expected) - n_valid,
        60,
    )
    predictions = await consume_until(
        settings,
        "predictions",
        lambda r: len({p["event_id"] for p in r if p["variant"] == "champion"}) >= n_valid,
        120,
    )
    return valid, rejected, predictions


async def test_sigkill_validator_and_scorer_mid_stream(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        validator = ServiceProcess("validator", settings, tmp_path)
        scorer = ServiceProcess("scorer", settings, tmp_path)
        validator.start()
        scorer.start()
        try:
            traffic = asyncio.create_task(produce_raw(settings, N, RATE))
            await asyncio.sleep(3)
            validator.kill()
            validator.start()
            await asyncio.sleep(3)
            scorer.kill()
            scorer.start()
            expected = await traffic
            started = time.monotonic()
            valid, rejected, predictions = await wait_all(settings, expected)
            recovery_s = time.monotonic() - started
        finally:
            for svc in (validator, scorer):
                if svc.proc.poll() is None:
                    assert svc.terminate() == 0, svc.log()[-3000:]
    counts = account(expected, valid, rejected, predictions)
    # At-least-once: replays are bounded by what was in flight (a few batches per partition).
    assert counts["duplicated_valid"] <= 6 * 512 and counts["duplicated_predictions"] <= 6 * 512
    print(
        f"\nfault sigkill validator+scorer: {counts}, drained {recovery_s:.1f}s after traffic ended"
    )


async def test_two_scorers_one_killed_the_other_takes_over(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        validator = ServiceProcess("validator", settings, tmp_path)
        scorers = [ServiceProcess("scorer", settings, tmp_path / f"s{i}") for i in range(2)]
        for s in scorers:
            s.log_dir.mkdir()
        validator.start()
        for s in scorers:
            s.start()
        try:
            traffic = asyncio.create_task(produce_raw(settings, 10_000, RATE))
            await asyncio.sleep(4)
            killed_at = time.monotonic()
            scorers[0].kill()
            expected = await traffic
            valid, rejected, predictions = await wait_all(settings, expected)
            recovery_s = time.monotonic() - killed_at
        finally:
            for svc in (validator, scorers[1]):
                if svc.proc.poll() is None:
                    assert svc.terminate() == 0, svc.log()[-3000:]
    counts = account(expected, valid, rejected, predictions)
    assert "partitions assigned" in scorers[1].log()
    print(f"\nfault kill one of two scorers: {counts}, all scored {recovery_s:.1f}s after the kill")
