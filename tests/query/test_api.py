"""The query API in-process (ASGI, lifespan run) against the embedded broker and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from scoremesh.contract.codec import codec
from services.common.performance import latest_stats_key, stats_index_key
from services.common.query_store import QueryStore
from services.common.routing import in_canary
from services.common.settings import Settings
from services.registry.service import RegistryService
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model
from tests.query.conftest import TOKEN, api, events, wait_ready
from tests.query.test_http_edges import assert_problem

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Served:
    settings: Settings
    client: httpx.AsyncClient


@pytest.fixture(scope="module")
async def served(module_settings: Settings, trained_model: Any) -> AsyncIterator[Served]:
    """Registry running, credit@1.0.0 champion, the API up with a token configured."""
    settings = module_settings.replace(api_token=SecretStr(TOKEN))
    async with Running(RegistryService(settings)):
        outcome = await register_model(
            settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
        )
        assert outcome["outcome"] == "applied", outcome
        async with api(settings) as client:
            await wait_ready(client)
            yield Served(settings, client)


async def poll(client: httpx.AsyncClient, path: str, timeout_s: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(path)
        if response.status_code != 404 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def test_one_event_gets_the_champion_decision(served: Served) -> None:
    event = events(1, seed=1)[0]
    response = await served.client.post("/v1/predict", content=orjson.dumps(event))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["event_id"] == event["event_id"] and body["entity_id"] == event["entity_id"]
    assert body["model"] == "credit" and body["model_version"] == "1.0.0"
    assert body["variant"] == "champion" and body["served"] is True and body["flags"] == []
    assert set(body["scores"]) == {"0", "1"} and body["scores"]["1"] == body["score"]
    assert body["decision"] == max(body["scores"], key=body["scores"].get)
    assert response.headers["x-request-id"]


async def test_a_batch_gets_one_prediction_per_event_in_order(served: Served) -> None:
    batch = events(40, seed=2)
    response = await served.client.post("/v1/predict", json={"events": batch})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["event_id"] for p in predictions] == [e["event_id"] for e in batch]
    # the same event alone scores the same as inside a batch
    alone = await served.client.post("/v1/predict", json=batch[7])
    assert alone.json()["score"] == predictions[7]["score"]


async def test_concurrent_requests_are_answered_each_with_its_own_prediction(
    served: Served,
) -> None:
    batch = events(64, seed=3)
    responses = await asyncio.gather(*(served.client.post("/v1/predict", json=e) for e in batch))
    assert [r.json()["event_id"] for r in responses] == [e["event_id"] for e in batch]
    metrics = (await served.client.get("/metrics")).text
    assert 'scoremesh_batch_size_count{service="query"}' in metrics


async def test_invalid_events_are_422_with_the_validators_reason_codes(served: Served) -> None:
    good, typed, missing, timeless = events(4, seed=4)
    typed["features"]["salary"] = "lots"
    del missing["features"]["age"]
    timeless["event_time"] = "yesterday"
    response = await served.client.post(
        "/v1/predict", json={"events": [good, typed, missing, timeless]}
    )
    body = assert_problem(response, 422, "invalid-events")
    assert body["rule_set"].startswith("credit@1.0.0#g")
    assert "3 of 4" in body["detail"]
    found = {(e["index"], e["code"], e["field"]) for e in body["errors"]}
    assert found == {
        (1, "wrong_type", "salary"),
        (2, "missing_feature", "age"),
        (3, "invalid_envelope", "event_time"),
    }
    assert {e["event_id"] for e in body["errors"]} == {
        typed["event_id"],
        missing["event_id"],
        timeless["event_id"],
    }
    # nothing was scored, not even the valid event
    await asyncio.sleep(0.3)
    assert (await served.client.get(f"/v1/predictions/{good['event_id']}")).status_code == 404


async def test_a_flag_rule_lets_the_event_through_marked(served: Served) -> None:
    event = events(1, seed=5)[0]
    event["features"]["car"] = 25  # car has range_action=flag
    response = await served.client.post("/v1/predict", json=event)
    assert response.status_code == 200 and response.json()["flags"] == ["out_of_range"]


async def test_request_errors_are_problems(served: Served) -> None:
    client = served.client
    malformed = assert_problem(
        await client.post("/v1/predict", content=b"{nope"), 400, "malformed-body"
    )
    assert malformed["errors"][0]["code"] == "undecodable"
    too_many = {"events": events(257, seed=6)}
    assert_problem(await client.post("/v1/predict", json=too_many), 422, "too-many-events")
    assert_problem(await client.post("/v1/predict", json={"events": []}), 422, "invalid-request")
    not_object = assert_problem(
        await client.post("/v1/predict", json=[1, 2]), 422, "invalid-events"
    )
    assert not_object["errors"][0]["code"] == "invalid_envelope"
    bad_name = assert_problem(await client.get("/v1/models/Not A Name"), 422, "invalid-request")
    assert bad_name["errors"][0]["field"] == "path.name"


async def test_sync_predictions_reach_the_store_and_the_predictions_topic(
    served: Served,
) -> None:
    event = events(1, seed=7)[0]
    assert (await served.client.post("/v1/predict", json=event)).status_code == 200
    found = await poll(served.client, f"/v1/predictions/{event['event_id']}")
    assert found.status_code == 200, found.text
    champion = found.json()["variants"]["champion"]
    assert champion["source"] == "sync" and champion["features"] == event["features"]
    entity = await poll(served.client, f"/v1/entities/{event['entity_id']}/predictions?limit=5")
    assert event["event_id"] in [p["event_id"] for p in entity.json()["predictions"]]
    published = await consume_until(
        served.settings,
        "predictions",
        lambda r: any(p["event_id"] == event["event_id"] for p in r),
        timeout_s=20,
    )
    record = next(p for p in published if p["event_id"] == event["event_id"])
    assert record["source"] == "sync" and record["score"] == champion["score"]


async def test_unknown_lookups_are_404_problems(served: Served) -> None:
    body = assert_problem(await served.client.get("/v1/predictions/never-seen"), 404, "not-found")
    assert "never-seen" in body["detail"]
    assert_problem(await served.client.get("/v1/entities/nobody/predictions"), 404, "not-found")


async def test_models_versions_and_history(served: Served) -> None:
    client = served.client
    listed = (await client.get("/v1/models")).json()["models"]
    assert {"name": "credit", "champion": "1.0.0", "challengers": [], "versions": 1} in listed
    model = (await client.get("/v1/models/credit")).json()
    assert model["champion"] == "1.0.0" and model["versions"][0]["stage"] == "champion"
    assert model["serving"]["champion"] == "credit@1.0.0"
    version = (await client.get("/v1/models/credit/versions/1.0.0")).json()
    assert version["stage"] == "champion" and version["feature_spec"]["classes"] == ["0", "1"]
    assert "f1" in version["metadata"]["holdout_metrics"]
    assert_problem(await client.get("/v1/models/nomodel"), 404, "not-found")
    assert_problem(await client.get("/v1/models/credit/versions/9.9.9"), 404, "not-found")
    history = (await client.get("/v1/models/credit/history")).json()["events"]
    assert [(e["action"], e["outcome"]) for e in history[:2]] == [
        ("register", "applied"),
        ("promote", "applied"),
    ]


async def test_commands_with_the_right_token_get_the_registrys_answer(served: Served) -> None:
    client = served.client
    refused = await client.post(
        "/v1/models/credit/promote", json={"version": "1.0.0", "stage": "champion"}, headers=AUTH
    )
    body = assert_problem(refused, 409, "command-refused")
    assert "already champion" in body["detail"] and body["event"]["actor"] == "api"
    nothing = await client.post("/v1/models/credit/rollback", headers=AUTH)
    assert "no earlier champion" in assert_problem(nothing, 409, "command-refused")["detail"]
    bad_body = await client.post(
        "/v1/models/credit/promote", json={"version": "1", "stage": "x"}, headers=AUTH
    )
    fields = {e["field"] for e in assert_problem(bad_body, 422, "invalid-request")["errors"]}
    assert fields == {"version", "stage"}
    history = (await client.get("/v1/models/credit/history")).json()["events"]
    assert history[-1]["actor"] == "api" and history[-1]["action"] == "rollback"


async def test_a_retrain_request_reaches_the_trainers_topic_and_its_answer_is_served(
    served: Served,
) -> None:
    client = served.client
    assert (await client.post("/v1/models/credit/retrain")).status_code == 401
    unknown = await client.post("/v1/models/nope/retrain", headers=AUTH)
    assert_problem(unknown, 404, "not-found")
    bad = await client.post("/v1/models/credit/retrain", json={"window_days": 0}, headers=AUTH)
    assert {e["field"] for e in assert_problem(bad, 422, "invalid-request")["errors"]} == {
        "window_days"
    }

    accepted = await client.post(
        "/v1/models/credit/retrain",
        json={"reason": "labels say so", "window_days": 1, "window_end": "2026-12-01T00:00:00Z"},
        headers=AUTH,
    )
    assert accepted.status_code == 202, accepted.text
    request = accepted.json()["request"]
    url = accepted.json()["result_url"]
    assert (
        accepted.headers["location"] == url == f"/v1/models/credit/retrains/{request['request_id']}"
    )
    assert request["actor"] == "api" and request["reason"] == "manual: labels say so"
    assert request["window_end"] == 1_796_083_200_000
    assert request["window_end"] - request["window_start"] == 86_400_000
    published = await consume_until(
        served.settings,
        "retrain.requests",
        lambda records: any(r["request_id"] == request["request_id"] for r in records),
    )
    assert request in published  # the trainer reads exactly what the API answered

    waiting = await client.get(url)
    assert (
        "is `scoremesh run trainer` running?" in assert_problem(waiting, 404, "not-found")["detail"]
    )
    answer = {
        "request_id": request["request_id"],
        "model": "credit",
        "status": "rejected",
        "attempt": 1,
        "version": None,
        "parent_version": "1.0.0",
        "detail": "only 3 labelled examples in the window; need 500",
        "metrics": {},
        "champion_metrics": {},
        "examples": 3,
        "window_start": request["window_start"],
        "window_end": request["window_end"],
        "trainer": "trainer:test",
        "at": int(time.time() * 1000),
    }
    await produce(
        served.settings,
        "retrain.results",
        [(b"credit", codec("RetrainResult").encode(answer))],
    )
    result = await client.get(url)
    assert result.status_code == 200 and result.json() == answer


async def test_health_and_metrics(served: Served) -> None:
    ready = await served.client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert set(checks) == {"registry", "model", "kafka", "redis"}
    assert checks["model"] == "ok: credit@1.0.0"
    await served.client.get("/v1/predictions/not-there")
    text = (await served.client.get("/metrics")).text
    assert (
        'scoremesh_api_request_seconds_count{method="GET",route="/v1/predictions/{event_id}",'
        'status="404"}' in text
    )
    assert "scoremesh_api_requests_in_flight" in text
    assert 'champion="credit@1.0.0"' in text  # scoremesh_active_model_info
    assert 'source="sync",variant="champion",version="1.0.0"' in text


async def test_monitoring_and_alerts_show_what_the_monitor_wrote(served: Served) -> None:
    client = served.client
    empty = (await client.get("/v1/monitoring/credit")).json()
    assert empty["stats"] == [] and empty["segments"] == [] and "monitor" in empty["note"]
    assert (await client.get("/v1/alerts")).json()["alerts"] == []
    store = QueryStore(served.settings)
    p = served.settings.redis_key_prefix
    drift = {"model": "credit", "version": "1.0.0", "signal": "psi:salary", "state": "warning"}
    alert = {
        "alert_key": "credit/1.0.0/psi:salary",
        "kind": "drift",
        "severity": "warning",
        "state": "firing",
        "model": "credit",
        "summary": "PSI 0.3 on salary",
        "last_seen": 5,
    }
    resolved = {**alert, "alert_key": "credit/1.0.0/f1", "state": "resolved", "last_seen": 4}
    await store.client.hset(f"{p}monitor:drift:credit@1.0.0", "psi:salary", orjson.dumps(drift))
    await store.client.sadd(f"{p}monitor:versions", "credit@1.0.0")
    await store.client.hset(f"{p}alerts:by-key:{alert['alert_key']}", "alert", orjson.dumps(alert))
    await store.client.zadd(f"{p}alerts:open", {alert["alert_key"]: 5})
    await store.client.lpush(f"{p}alerts:recent", orjson.dumps(resolved), orjson.dumps(alert))
    performance = {"model": "credit", "model_version": "1.0.0", "segment": "all", "count": 3}
    await store.client.hset(
        latest_stats_key(p, "credit", "1.0.0", "champion", "all"),
        "sliding",
        orjson.dumps(performance),
    )
    await store.client.sadd(stats_index_key(p, "credit"), "1.0.0:champion:all")
    try:
        got = (await client.get("/v1/monitoring/credit")).json()
        assert got["stats"] == [drift] and got["note"] is None
        assert got["segments"] == [performance]  # as the label join published it
        assert (await client.get("/v1/monitoring/credit?version=2.0.0")).json()["segments"] == []
        assert (await client.get("/v1/monitoring/credit?version=2.0.0")).json()["stats"] == []
        assert (await client.get("/v1/alerts?model=credit")).json()["alerts"] == [alert]
        assert (await client.get("/v1/alerts?state=resolved")).json()["alerts"] == [resolved]
        everything = (await client.get("/v1/alerts?state=all")).json()["alerts"]
        assert everything == [alert, resolved]
        assert (await client.get("/v1/alerts?severity=critical")).json()["alerts"] == []
    finally:
        keys = await store.client.keys(f"{p}monitor:*") + await store.client.keys(f"{p}alerts:*")
        await store.client.delete(*keys)
        await store.close()


async def test_not_ready_and_503_without_a_champion(settings: Settings) -> None:
    async with api(settings) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "no champion" in ready.json()["checks"]["model"]
        body = assert_problem(await client.post("/v1/predict", json=events(1)[0]), 503, "no-model")
        assert "promote" in body["detail"]


async def test_canary_promoted_through_the_api_serves_its_share(
    settings: Settings, trained_model: Any
) -> None:
    settings = settings.replace(api_token=SecretStr(TOKEN))
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        assert (await register_model(settings, trained_model.onnx, "1.1.0", stage=None))[
            "outcome"
        ] == "applied"
        async with api(settings) as client:
            await wait_ready(client)
            promoted = await client.post(
                "/v1/models/credit/promote",
                json={"version": "1.1.0", "stage": "canary", "percent": 50, "reason": "try"},
                headers=AUTH,
            )
            assert promoted.status_code == 200, promoted.text
            event = promoted.json()
            assert (event["outcome"], event["to_stage"], event["actor"]) == (
                "applied",
                "canary",
                "api",
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                serving = (await client.get("/v1/models/credit")).json()["serving"]
                if serving["challengers"] == ["credit@1.1.0:canary"]:
                    break
                await asyncio.sleep(0.2)
            batch = events(60, seed=8)
            predictions = (await client.post("/v1/predict", json={"events": batch})).json()[
                "predictions"
            ]
            for e, p in zip(batch, predictions, strict=True):
                expected = "canary" if in_canary(e["entity_id"], 50) else "champion"
                assert p["variant"] == expected and p["served"]
                assert p["model_version"] == ("1.1.0" if expected == "canary" else "1.0.0")
            assert {p["variant"] for p in predictions} == {"canary", "champion"}
            both = await poll(client, f"/v1/predictions/{batch[0]['event_id']}")
            assert set(both.json()["variants"]) == {"champion", "canary"}
            rolled = await client.post(
                "/v1/models/credit/rollback", json={"version": "1.1.0"}, headers=AUTH
            )
            assert rolled.status_code == 200 and rolled.json()["to_stage"] == "rolled_back"
