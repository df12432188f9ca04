"""HTTP behaviour that needs no broker: problems, request ids, limits, timeouts, auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.common.settings import Settings
from services.query.app import QueryApp, create_app
from services.query.middleware import (
    BodyLimitMiddleware,
    ObservabilityMiddleware,
    PayloadTooLarge,
    TimeoutMiddleware,
)
from services.query.problems import PROBLEM_JSON, TYPE_PREFIX, problem_response

PROMOTE = {"version": "1.0.0", "stage": "champion"}


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://query")


def settings(**overrides: Any) -> Settings:
    """Defaults and the given flat names; no environment, no dev-stack file."""
    return Settings.model_validate(overrides)


@pytest.fixture
async def no_runtime() -> AsyncIterator[httpx.AsyncClient]:
    """The app with no runtime behind it (as while it starts)."""
    async with client_for(create_app(settings())) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["type"] == TYPE_PREFIX + kind
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["instance"] == response.request.url.path
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_healthz_answers_and_request_ids_go_in_and_out(
    no_runtime: httpx.AsyncClient,
) -> None:
    response = await no_runtime.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert response.json() == {"status": "alive", "service": "query"}
    assert response.headers["x-request-id"] == "trace-42"
    generated = await no_runtime.get("/healthz", headers={"X-Request-ID": "bad id\twith tab"})
    assert len(generated.headers["x-request-id"]) == 32  # a fresh one replaces garbage
    other = await no_runtime.get("/healthz")
    assert other.headers["x-request-id"] != generated.headers["x-request-id"]


async def test_not_ready_until_the_runtime_is_there(no_runtime: httpx.AsyncClient) -> None:
    ready = await no_runtime.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert_problem(await no_runtime.get("/v1/models"), 503, "not-ready")


async def test_unknown_routes_and_methods_are_problems(no_runtime: httpx.AsyncClient) -> None:
    body = assert_problem(await no_runtime.get("/v2/nothing"), 404, "not-found")
    assert "/openapi.json" in body["detail"]
    assert_problem(await no_runtime.delete("/v1/predict"), 405, "method-not-allowed")


async def test_a_body_over_the_limit_is_413_before_it_is_read(
    no_runtime: httpx.AsyncClient,
) -> None:
    big = b'{"x": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    body = assert_problem(
        await no_runtime.post("/v1/predict", content=big), 413, "payload-too-large"
    )
    assert "limit" in body["detail"]


async def test_mutating_routes_are_off_without_a_token(no_runtime: httpx.AsyncClient) -> None:
    for path, payload in (("promote", PROMOTE), ("rollback", {})):
        response = await no_runtime.post(
            f"/v1/models/credit/{path}", json=payload, headers={"Authorization": "Bearer x"}
        )
        body = assert_problem(response, 403, "mutations-disabled")
        assert "SCOREMESH_API_TOKEN" in body["detail"]


async def test_a_missing_or_wrong_token_is_401() -> None:
    app = create_app(settings(api_token=SecretStr("right")))
    async with client_for(app) as client:
        missing = await client.post("/v1/models/credit/promote", json=PROMOTE)
        assert_problem(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.post(
            "/v1/models/credit/promote", json=PROMOTE, headers={"Authorization": "Bearer wrong"}
        )
        assert "wrong" in assert_problem(wrong, 401, "unauthorized")["detail"]
        # the right token passes auth; with no runtime behind it the answer is "not ready"
        right = await client.post(
            "/v1/models/credit/promote", json=PROMOTE, headers={"Authorization": "Bearer right"}
        )
        assert_problem(right, 503, "not-ready")


async def test_reads_can_require_the_token_too() -> None:
    app = create_app(settings(api_token=SecretStr("right"), api_require_token_for_reads=True))
    async with client_for(app) as client:
        assert_problem(await client.get("/v1/models"), 401, "unauthorized")
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(5)
    return JSONResponse({})


def _small_app() -> Any:
    async def too_large(request: Request, exc: Exception) -> Any:
        return problem_response(request.scope, 413, "payload-too-large", str(exc))

    app = Starlette(
        routes=[Route("/echo", _echo, methods=["POST"]), Route("/slow", _slow)],
        exception_handlers={PayloadTooLarge: too_large},
    )
    return ObservabilityMiddleware(
        TimeoutMiddleware(BodyLimitMiddleware(app, max_body_bytes=1000), timeout_s=0.2)
    )


async def test_a_streamed_body_is_cut_off_at_the_limit() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 300

    async with client_for(_small_app()) as client:
        small = await client.post("/echo", content=b"x" * 900)
        assert small.json() == {"size": 900}
        streamed = await client.post("/echo", content=chunks())  # no Content-Length
        assert_problem(streamed, 413, "payload-too-large")


async def test_a_slow_request_gets_504() -> None:
    async with client_for(_small_app()) as client:
        body = assert_problem(await client.get("/slow"), 504, "request-timeout")
        assert "0.2 s" in body["detail"]


async def test_cors_is_off_by_default_and_on_when_configured() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with client_for(create_app(settings())) as client:
        response = await client.options("/v1/predict", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    app = create_app(settings(api_cors_origins=["https://app.example"]))
    async with client_for(app) as client:
        response = await client.options("/v1/predict", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"


async def test_predict_dispatch_answers_as_the_fastapi_route_does() -> None:
    """POST /v1/predict skips FastAPI's routing; its answers must not change for that."""

    class Stub:  # enough runtime for the answers given before anything is scored
        config = settings().api

    app = create_app(settings())
    assert isinstance(app, QueryApp)
    cases = {
        b"{not json": (400, "malformed-body"),
        b'{"events": "x"}': (422, "invalid-request"),
        orjson.dumps({"events": [{}] * 300}): (422, "too-many-events"),
    }
    fast, routed = client_for(app), client_for(app.fastapi_call)  # with / without dispatch
    async with fast, routed:
        for runtime, bodies in ((None, {b"{}": (503, "not-ready")}), (Stub(), cases)):
            app.state.runtime = runtime
            for body, (status, kind) in bodies.items():
                answer = assert_problem(await fast.post("/v1/predict", content=body), status, kind)
                plain = await routed.post("/v1/predict", content=body)
                assert plain.status_code == status
                assert {k: v for k, v in answer.items() if k != "request_id"} == plain.json()


async def test_predict_dispatch_keeps_read_auth_and_answers_500_as_a_problem() -> None:
    app = create_app(settings(api_token=SecretStr("right"), api_require_token_for_reads=True))
    async with client_for(app) as client:
        assert_problem(await client.post("/v1/predict", content=b"{}"), 401, "unauthorized")

    class Broken:
        config = app.state.config

        def rules(self) -> Any:
            raise RuntimeError("boom")

    app = create_app(settings())
    app.state.runtime = Broken()
    async with client_for(app) as client:
        body = assert_problem(
            await client.post("/v1/predict", json={"event_id": "e-1"}), 500, "internal-error"
        )
        assert "request id" in body["detail"]
