"""Three models in one mesh: shared topics, every event scored by its own model's champion.

Event ids are unique per model (docs/adr/0015): the three models' events reuse the same ids.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.commands import command, new_command
from services.common.dlq import replay_dlq
from services.common.kafka import make_producer, start_with_retry
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, register_model

pytestmark = pytest.mark.integration

N = 3_000  # events per model
CHURN_SPEC = CREDIT_SPEC.model_copy(
    update={"features": [r for r in CREDIT_SPEC.features if r.name in ("salary", "age", "loan")]}
)


def churn_model(spec: FeatureSpec) -> bytes:
    """A model of the test's own: logistic regression on three of the credit features."""
    pairs = list(credit_events(2000, seed=41))
    x = Vectoriser(spec).transform([{n: e["features"][n] for n in spec.names} for e, _ in pairs])
    y = [spec.classes.index(label) for _, label in pairs]
    est = LogisticRegression(max_iter=500).fit(x, y)
    onnx = convert_sklearn(
        est,
        initial_types=[(spec.input_name, FloatTensorType([None, len(spec.features)]))],
        options={id(est): {"zipmap": False}},
        target_opset=17,
    )
    return bytes(onnx.SerializeToString())


def event_for(model: str, event: dict[str, Any]) -> dict[str, Any]:
    """The same business event id for every model; credit's events name no model (the
    default model takes them)."""
    if model == "credit":
        return dict(event)
    features = event["features"]
    if model == "churn":
        features = {n: features[n] for n in CHURN_SPEC.names}
    return {**event, "model": model, "features": features}


async def stream(settings: Settings, rate: float) -> dict[str, set[str]]:
    """Events for the three models, interleaved, at a steady rate; returns ids per model."""
    producer = make_producer(settings)
    await start_with_retry(producer.start, "multi-model-stream", settings)
    sent: dict[str, set[str]] = {"credit": set(), "fraud": set(), "churn": set()}
    topic = settings.topic("events.raw")
    started = time.monotonic()
    try:
        futures = []
        for i, (event, _) in enumerate(credit_events(N, seed=43)):
            for model in ("credit", "fraud", "churn"):
                futures.append(
                    await producer.send(
                        topic,
                        orjson.dumps(event_for(model, event)),
                        key=event["entity_id"].encode(),
                    )
                )
                sent[model].add(event["event_id"])
            if i % 100 == 99:
                await asyncio.gather(*futures)
                futures.clear()
                delay = started + 3 * (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def champions(predictions: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(model, event_id) -> the version whose prediction served it; fails on a duplicate
    that disagrees."""
    out: dict[tuple[str, str], str] = {}
    for p in predictions:
        if p["variant"] != "champion":
            continue
        key = (p["model"], p["event_id"])
        assert out.setdefault(key, p["model_version"]) == p["model_version"], key
    return out


async def test_three_models_one_mesh_promote_rollback_and_a_broken_model_replayed(
    settings: Settings, trained_model: Any, trained_model_b: Any
) -> None:
    churn_onnx = churn_model(CHURN_SPEC)
    async with Running(RegistryService(settings)):
        for args in (
            (trained_model.onnx, "1.0.0", "champion", CREDIT_SPEC, "credit"),
            (trained_model_b.onnx, "1.1.0", "champion", CREDIT_SPEC, "credit"),
            (trained_model_b.onnx, "1.0.0", "champion", CREDIT_SPEC, "fraud"),
            (trained_model.onnx, "1.1.0", "shadow", CREDIT_SPEC, "fraud"),
            (churn_onnx, "1.0.0", "champion", CHURN_SPEC, "churn"),
        ):
            onnx, version, stage, spec, model = args
            outcome = await register_model(settings, onnx, version, stage, spec, model=model)
            assert outcome["outcome"] == "applied", outcome
    # A champion record whose artifact does not match its checksum (as if tampered with):
    # the only champion churn has when the scorer starts, so churn has none that loads.
    async with Running(RegistryService(settings)) as registry:
        good = registry.book.state.champion("churn")
        bogus = {
            **good.to_record(),
            "version": "1.0.1",
            "generation": registry.book.generation + 1,
            "artifact_sha256": "f" * 64,
            "request_id": "tampered",
        }
    producer = make_producer(settings)
    await start_with_retry(producer.start, "tamper", settings)
    await producer.send_and_wait(
        settings.topic("models.registry"),
        codec("ModelVersion").encode(bogus),
        key=b"churn@1.0.1",
    )
    await producer.stop()

    async with (
        Running(RegistryService(settings)),
        Running(ValidatorService(settings)),
        Running(ScorerService(settings)) as scorer,
    ):
        deadline = time.monotonic() + 30
        while not scorer.loop.assigned and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert scorer.holder.current.serving_models == ["credit", "fraud"]
        assert "churn@1.0.1" in scorer.holder.current.failures
        streaming = asyncio.create_task(stream(settings, rate=3_000))
        await asyncio.sleep(1.5)
        promoted = await command(
            settings,
            new_command("fraud", "promote", "test", version="1.1.0", target_stage="champion"),
        )
        assert promoted["outcome"] == "applied"
        await asyncio.sleep(1.0)
        rolled = await command(settings, new_command("credit", "rollback", "test", reason="test"))
        assert rolled["outcome"] == "applied" and rolled["new_champion"] == "1.0.0"
        sent = await streaming
        predictions = await consume_until(
            settings,
            "predictions",
            lambda r: len(champions(r)) >= 2 * N,
            timeout_s=120,
        )
        rejected = await consume_until(
            settings,
            "events.rejected",
            lambda r: sum(x["reasons"][0]["code"] == "model_unavailable" for x in r) >= N,
            timeout_s=60,
        )
        served = champions(predictions)
        per_model = Counter(model for model, _ in served)
        assert per_model == {"credit": N, "fraud": N}, per_model  # 0 lost, 0 mis-routed
        assert {e for (m, e) in served if m == "credit"} == sent["credit"]
        assert {e for (m, e) in served if m == "fraud"} == sent["fraud"]
        versions = Counter(served.values())
        assert versions["1.0.0"] > 0 and versions["1.1.0"] > 0
        for p in predictions:  # every prediction saw its own model's features
            expected = CHURN_SPEC.names if p["model"] == "churn" else CREDIT_SPEC.names
            assert sorted(p["features"]) == sorted(expected)
        unavailable = [x for x in rejected if x["reasons"][0]["code"] == "model_unavailable"]
        assert len(unavailable) == N and {x["event_id"] for x in unavailable} == sent["churn"]
        assert all(x["stage"] == "scoring" for x in unavailable)

        # The fix: a good churn version, then the dead-lettered events replayed.
        fixed = await register_model(
            settings, churn_onnx, "1.1.0", "champion", CHURN_SPEC, model="churn"
        )
        assert fixed["outcome"] == "applied", fixed
        deadline = time.monotonic() + 30
        while scorer.holder.current.of("churn") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        dry = await replay_dlq(settings, {"model_unavailable"}, None, True, models={"fraud"})
        assert dry.matched == 0  # the other models had nothing dead-lettered
        summary = await replay_dlq(settings, {"model_unavailable"}, None, False, models={"churn"})
        assert summary.replayed == N and summary.by_model == {"churn": N}
        predictions = await consume_until(
            settings,
            "predictions",
            lambda r: len(champions(r)) >= 3 * N,
            timeout_s=120,
        )
    served = champions(predictions)
    assert Counter(m for m, _ in served) == {"credit": N, "fraud": N, "churn": N}
    assert {v for (m, _), v in served.items() if m == "churn"} == {"1.1.0"}
    again = await replay_dlq(settings, {"model_unavailable"}, None, True, models={"churn"})
    assert again.replayed == 0 and again.already_replayed == N


def encode_v1(event: dict[str, Any]) -> bytes:
    """An Event as the previous release (Event v1) wrote it."""
    import io

    from fastavro import schemaless_writer

    from scoremesh.contract.codec import MAGIC, all_schema_versions

    v1 = all_schema_versions()["Event"][0]
    assert v1.version == 1
    buf = io.BytesIO()
    buf.write(MAGIC + v1.fingerprint)
    schemaless_writer(buf, v1.parsed, {k: v for k, v in event.items() if k != "model"})
    return buf.getvalue()


async def test_v1_events_written_before_the_upgrade_and_v2_events_are_both_scored(
    settings: Settings, trained_model: Any
) -> None:
    """The rolling upgrade: Event v1 bytes on events.raw and on events.valid (an old
    validator's output), and v2 events, all scored by the default model after it."""
    pairs = list(credit_events(90, seed=47))
    raw_v1 = [e for e, _ in pairs[:30]]
    valid_v1 = [{**e, "rule_set": "credit@1.0.0#g1", "flags": []} for e, _ in pairs[30:60]]
    raw_v2 = [{**e, "model": "credit"} for e, _ in pairs[60:]]
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        producer = make_producer(settings)
        await start_with_retry(producer.start, "upgrade", settings)
        try:
            for topic, events, encode in (
                ("events.raw", raw_v1, encode_v1),
                ("events.valid", valid_v1, encode_v1),
                ("events.raw", raw_v2, codec("Event").encode),
            ):
                for event in events:
                    await producer.send_and_wait(
                        settings.topic(topic), encode(event), key=event["entity_id"].encode()
                    )
        finally:
            await producer.stop()
        async with Running(ValidatorService(settings)), Running(ScorerService(settings)):
            predictions = await consume_until(
                settings, "predictions", lambda r: len(champions(r)) >= 90, timeout_s=60
            )
    served = champions(predictions)
    assert set(served) == {("credit", e["event_id"]) for e, _ in pairs}
    assert set(served.values()) == {"1.0.0"}
