"""The validator, scorer and registry against the real embedded broker and Redis."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import pytest

from scoremesh.contract.codec import codec
from services.common.health import HealthServer
from services.common.query_store import QueryStore
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import credit_events
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model

pytestmark = pytest.mark.integration


def events(n: int, seed: int = 21) -> list[dict[str, Any]]:
    return [e for e, _ in credit_events(n, seed=seed)]


async def test_poison_inputs_are_dead_lettered_and_the_validator_keeps_running(
    settings: Settings, trained_model: Any
) -> None:
    async with Running(RegistryService(settings)):
        outcome = await register_model(settings, trained_model.onnx, "1.0.0")
        assert outcome["outcome"] == "applied", outcome
        async with Running(ValidatorService(settings)):
            good = events(3)
            bad_type = {**good[1], "features": {**good[1]["features"], "salary": "lots"}}
            await produce(
                settings,
                "events.raw",
                [
                    (b"k", os.urandom(100)),  # garbage bytes
                    (b"k", b"{" + b" " * (5 * 1024 * 1024) + b"}"),  # a 5 MB message
                    (b"k", orjson.dumps(bad_type)),  # a string where a number belongs
                    (b"k", codec("Event").encode(good[0])),  # and valid events still pass
                    (b"k", orjson.dumps(good[2])),
                ],
                max_request_size=8 * 1024 * 1024,
            )
            rejected = await consume_until(settings, "events.rejected", lambda r: len(r) >= 3)
            valid = await consume_until(settings, "events.valid", lambda r: len(r) >= 2)
    reasons = sorted(r["reasons"][0]["code"] for r in rejected)
    assert reasons == ["too_large", "undecodable", "wrong_type"]
    too_large = next(r for r in rejected if r["reasons"][0]["code"] == "too_large")
    assert too_large["size"] > 5 * 1024 * 1024 and too_large["truncated"]
    typed = next(r for r in rejected if r["reasons"][0]["code"] == "wrong_type")
    assert typed["reasons"][0]["field"] == "salary" and typed["event_id"] == bad_type["event_id"]
    assert sorted(v["event_id"] for v in valid) == sorted(
        [good[0]["event_id"], good[2]["event_id"]]
    )
    assert all(v["rule_set"].startswith("credit@1.0.0#g") for v in valid)


async def test_validator_is_not_ready_and_does_not_consume_without_a_champion(
    settings: Settings,
) -> None:
    service = ValidatorService(settings)
    health = HealthServer("validator", "127.0.0.1", 0)
    service.register_checks(health)
    async with Running(service):
        await produce(settings, "events.raw", [(b"k", orjson.dumps(events(1)[0]))])
        await asyncio.sleep(2)
        ready, checks = health.readiness()
        assert not ready and "no model has a champion" in checks["rules"]
        assert not service.loop.consuming
    assert await consume_until(settings, "events.valid", lambda r: False, timeout_s=1) == []


async def test_scorer_predicts_and_fills_the_query_store(
    settings: Settings, trained_model: Any
) -> None:
    batch = events(300)
    store = QueryStore(settings)
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        async with Running(ScorerService(settings, store=QueryStore(settings))):
            valid = [{**e, "rule_set": "credit@1.0.0#g2", "flags": []} for e in batch]
            await produce(
                settings,
                "events.valid",
                [(e["entity_id"].encode(), codec("Event").encode(e)) for e in valid],
            )
            predictions = await consume_until(settings, "predictions", lambda r: len(r) >= 300)
    by_id = {p["event_id"]: p for p in predictions}
    assert set(by_id) == {e["event_id"] for e in batch}
    sample = by_id[batch[0]["event_id"]]
    assert sample["model"] == "credit" and sample["model_version"] == "1.0.0"
    assert sample["variant"] == "champion" and sample["served"] and sample["source"] == "stream"
    assert sample["decision"] in ("0", "1") and 0.0 <= sample["score"] <= 1.0
    assert sample["scores"]["1"] == pytest.approx(sample["score"])
    assert sample["features"] == batch[0]["features"]
    stored = await store.prediction("credit", batch[0]["event_id"])
    assert stored is not None and stored["champion"]["score"] == pytest.approx(sample["score"])
    entity = batch[0]["entity_id"]
    history = await store.entity_predictions(entity, limit=50)
    assert batch[0]["event_id"] in {h["event_id"] for h in history}
    removed = await store.forget_entity(entity)
    assert removed >= 2 and await store.prediction("credit", batch[0]["event_id"]) is None
    await store.close()


async def test_registry_refuses_with_a_clear_reason(settings: Settings, trained_model: Any) -> None:
    async with Running(RegistryService(settings)):
        ok = await register_model(settings, trained_model.onnx, "1.0.0", stage=None)
        assert ok["outcome"] == "applied"
        dup = await register_model(settings, trained_model.onnx, "1.0.0", stage=None)
        assert dup["outcome"] == "refused" and "already exists" in dup["detail"]
        bad = await register_model(
            settings, trained_model.onnx, "1.0.1", stage=None, sha256="0" * 64
        )
        assert bad["outcome"] == "refused" and "checksum" in bad["detail"]
