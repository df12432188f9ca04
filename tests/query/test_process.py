"""The query API as a real process (`scoremesh run query`: uvicorn, uvloop, httptools),
and a schemathesis fuzz of the committed OpenAPI document against it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scoremesh.contract.featurespec import REASONS, FeatureRule
from services.common.settings import Settings
from services.trainer.datasets import CREDIT_SPEC
from tests.query.conftest import ROOT, ApiProcess, api_process, events, with_champion

pytestmark = pytest.mark.integration

schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.json")


@pytest.fixture(scope="module")
async def champion(module_settings: Settings, trained_model: Any) -> Settings:
    await with_champion(module_settings, trained_model.onnx)
    return module_settings


@pytest.fixture(scope="module")
def served(champion: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    log_path = tmp_path_factory.mktemp("query") / "query.log"
    with api_process(champion, log_path) as process:
        yield process


def test_the_process_serves_predictions_and_logs_json_lines(served: ApiProcess) -> None:
    event = events(1, seed=51)[0]
    with httpx.Client(base_url=served.base_url, timeout=10) as client:
        response = client.post(
            "/v1/predict", content=orjson.dumps(event), headers={"X-Request-ID": "proc-1"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "1.0.0"
        assert response.headers["x-request-id"] == "proc-1"
        assert "server" not in response.headers
        assert client.get("/healthz").json()["status"] == "alive"
        assert client.get("/openapi.json").json() == orjson.loads(
            (ROOT / "docs" / "openapi.json").read_bytes()
        )
    lines = [orjson.loads(line) for line in served.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "proc-1"]
    assert access and access[0]["route"] == "/v1/predict" and access[0]["status"] == 200
    assert access[0]["service"] == "query" and access[0]["duration_ms"] > 0


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzzing_the_openapi_finds_no_server_error(case: Any, served: ApiProcess) -> None:
    case.call_and_validate(
        base_url=served.base_url,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


def _feature(rule: FeatureRule) -> st.SearchStrategy[Any]:
    if rule.categories:
        valid: st.SearchStrategy[Any] = st.sampled_from(rule.categories)
    elif rule.dtype == "double":
        valid = st.floats(rule.min, rule.max, allow_nan=False)
    else:
        valid = st.integers(int(rule.min or 0), int(rule.max or 1000))
    odd = st.one_of(
        st.none(),
        st.booleans(),
        st.text(max_size=5),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    return st.one_of(valid, valid, valid, odd)  # mostly valid, sometimes anything


credit_events = st.fixed_dictionaries(
    {
        "event_id": st.text(min_size=1, max_size=20),
        "entity_id": st.text(min_size=1, max_size=20),
        "event_time": st.one_of(st.integers(0, 2**45), st.just("2026-11-02T10:00:00Z")),
        "features": st.fixed_dictionaries(
            {rule.name: _feature(rule) for rule in CREDIT_SPEC.features},
            optional={"surprise": st.integers()},
        ),
        "attributes": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(credit_events, min_size=1, max_size=8), single=st.booleans())
def test_events_near_the_spec_are_scored_or_refused_with_reason_codes(
    served: ApiProcess, batch: list[dict[str, Any]], single: bool
) -> None:
    payload: Any = batch[0] if single else {"events": batch}
    response = served.client.post("/v1/predict", json=payload)
    assert response.status_code in (200, 422), response.text
    body = response.json()
    if response.status_code == 422:
        assert {e["code"] for e in body["errors"]} <= set(REASONS)
        return
    predictions = [body] if single else body["predictions"]
    assert [p["event_id"] for p in predictions] == [
        e["event_id"] for e in batch[: len(predictions)]
    ]
    assert all(0.0 <= p["score"] <= 1.0 and p["model_version"] == "1.0.0" for p in predictions)


def test_sigterm_finishes_cleanly(
    champion: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_path: Path = tmp_path_factory.mktemp("query-stop") / "query.log"
    with api_process(champion, log_path) as process:
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(30) == 0
    messages = [orjson.loads(line)["msg"] for line in process.log().splitlines() if line[:1] == "{"]
    assert "service stopped" in messages
