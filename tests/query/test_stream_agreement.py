"""A prediction made by the stream is visible through the API, and the API agrees with it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.common.query_store import QueryStore
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model
from tests.query.conftest import api, events, wait_ready

pytestmark = pytest.mark.integration


async def test_stream_predictions_are_looked_up_and_sync_agrees_exactly(
    settings: Settings, trained_model: Any
) -> None:
    batch = events(50, seed=41)
    batch[3]["features"]["commission"] = None  # imputed the same way on both paths
    batch[4]["features"]["car"] = 25  # a flagged event
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        async with (
            Running(ValidatorService(settings)),
            Running(ScorerService(settings, store=QueryStore(settings))),
        ):
            await produce(
                settings,
                "events.raw",
                [(e["entity_id"].encode(), orjson.dumps(e)) for e in batch],
            )
            stream = await consume_until(settings, "predictions", lambda r: len(r) >= len(batch))
        async with api(settings) as client:
            await wait_ready(client)
            by_id = {p["event_id"]: p for p in stream}
            assert set(by_id) == {e["event_id"] for e in batch}
            for event in batch[:5]:
                found = await client.get(f"/v1/predictions/{event['event_id']}")
                assert found.status_code == 200, found.text
                stored = found.json()["variants"]["champion"]
                assert stored["source"] == "stream"
                assert stored["score"] == by_id[event["event_id"]]["score"]
                entity = await client.get(f"/v1/entities/{event['entity_id']}/predictions")
                assert event["event_id"] in [p["event_id"] for p in entity.json()["predictions"]]

            # The same features through the sync door, as new events (new ids, same entity).
            sync_events = [{**e, "event_id": f"sync-{e['event_id']}"} for e in batch]
            response = await client.post("/v1/predict", json={"events": sync_events})
            assert response.status_code == 200, response.text
            sync = response.json()["predictions"]
            alone = (await client.post("/v1/predict", json=sync_events[9])).json()
    for event, answer in zip(batch, sync, strict=True):
        streamed = by_id[event["event_id"]]
        assert answer["score"] == streamed["score"], event["event_id"]
        assert answer["scores"] == streamed["scores"]
        assert answer["decision"] == streamed["decision"]
        assert (answer["model"], answer["model_version"]) == ("credit", streamed["model_version"])
        assert answer["variant"] == streamed["variant"] == "champion"
    assert sync[4]["flags"] == ["out_of_range"]
    assert alone["score"] == by_id[batch[9]["event_id"]]["score"]
