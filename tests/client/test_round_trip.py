"""The client with the whole mesh: the client produces events and labels, the validator,
scorer and label join (each its own `scoremesh run` process) score and join them, and the
client's consumers read typed predictions and labelled predictions — on aiokafka and on
confluent-kafka, against one mesh."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from scoremesh.client import (
    ClientConfig,
    Event,
    Label,
    LabeledPrediction,
    Prediction,
    aio,
    confluent,
)
from services.common.kafka import client_config
from services.common.settings import Settings
from services.trainer.datasets import credit_events
from tests.helpers import ServiceProcess, register_model, wait_for_log

pytestmark = pytest.mark.e2e

N = 60  # events per client


def workload(seed: int, tag: str) -> tuple[list[Event], list[Label]]:
    events: list[Event] = []
    labels: list[Label] = []
    for event, truth in credit_events(N, seed=seed, id_prefix=tag):
        events.append(event)  # type: ignore[arg-type]
        labels.append(
            {
                "event_id": event["event_id"],
                "value": truth,
                "label_time": event["event_time"] + 60_000,
            }
        )
    return events, labels


async def read_aio(consumer: aio.Consumer[Any], wanted: set[str]) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(120), consumer:
        async for record in consumer:
            if record["event_id"] in wanted:
                out.append(record)
                if {r["event_id"] for r in out} == wanted:
                    break
    return out


def read_confluent(consumer: confluent.Consumer[Any], wanted: set[str]) -> list[Any]:
    out: list[Any] = []
    with consumer:
        for record in consumer:
            if record["event_id"] in wanted:
                out.append(record)
                if {r["event_id"] for r in out} == wanted:
                    break
    return out


def check(
    events: list[Event],
    labels: list[Label],
    predictions: list[Prediction],
    labelled: list[LabeledPrediction],
) -> None:
    ids = sorted(e["event_id"] for e in events)
    assert sorted(p["event_id"] for p in predictions) == ids  # exactly one each, typed
    assert {(p["model"], p["model_version"], p["variant"], p["served"]) for p in predictions} == {
        ("credit", "1.0.0", "champion", True)
    }
    assert all(0.0 <= p["score"] <= 1.0 and p["decision"] in ("0", "1") for p in predictions)
    truth = {label["event_id"]: label["value"] for label in labels}
    decided = {p["event_id"]: p["decision"] for p in predictions}
    assert sorted(r["event_id"] for r in labelled) == ids
    for r in labelled:
        assert r["label"] == truth[r["event_id"]]
        assert r["decision"] == decided[r["event_id"]]
        assert r["correct"] == (r["decision"] == r["label"])
        assert r["label_delay_ms"] == 60_000


async def test_client_round_trip_through_the_mesh(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    mesh = [
        ServiceProcess(name, settings, tmp_path)
        for name in ("registry", "validator", "scorer", "label-join")
    ]
    for service in mesh:
        service.start()
    try:
        for service in mesh:
            await wait_for_log(service, "service started", timeout_s=90)
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        config: ClientConfig = client_config(settings)

        # aiokafka: events (Avro, and a few as JSON), then labels once scored
        events, labels = workload(31, "aio")
        async with aio.EventProducer(config) as producer:
            await producer.send_many(events[:-5])
        async with aio.EventProducer(config, value_format="json") as producer:
            await producer.send_many(events[-5:])
        wanted = {e["event_id"] for e in events}
        group = f"downstream-{uuid.uuid4().hex[:6]}"
        predictions = await read_aio(aio.PredictionConsumer(config, group_id=group), wanted)
        async with aio.LabelProducer(config) as label_producer:
            await label_producer.send_many(labels)
        labelled = await read_aio(aio.LabeledPredictionConsumer(config, group_id=group), wanted)
        check(events, labels, predictions, labelled)

        # confluent-kafka: the same, in a worker thread (its calls block)
        events, labels = workload(32, "ck")
        wanted = {e["event_id"] for e in events}

        def confluent_side() -> tuple[list[Prediction], list[LabeledPrediction]]:
            with confluent.EventProducer(config) as producer:
                producer.send_many(events)
            found = read_confluent(
                confluent.PredictionConsumer(config, group_id=group + "-ck", idle_timeout_s=90),
                wanted,
            )
            with confluent.LabelProducer(config) as producer:
                producer.send_many(labels)
            joined = read_confluent(
                confluent.LabeledPredictionConsumer(
                    config, group_id=group + "-ck", idle_timeout_s=90
                ),
                wanted,
            )
            return found, joined

        predictions, labelled = await asyncio.to_thread(confluent_side)
        check(events, labels, predictions, labelled)
    finally:
        for service in mesh:
            service.terminate()
