"""The query API as a FastAPI application: ``create_app(settings)``.

Without a runtime the app builds and starts its own in its lifespan (tests, ``uvicorn
--factory``); ``QueryService`` passes the runtime it owns, so the lifespan leaves it alone.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic.json_schema import models_json_schema
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

import services
from services.common.settings import Settings
from services.query.console import routes as console
from services.query.deps import ReadAuth
from services.query.middleware import (
    BodyLimitMiddleware,
    ObservabilityMiddleware,
    PayloadTooLarge,
    TimeoutMiddleware,
    too_large_response,
)
from services.query.problems import install_handlers
from services.query.routers import health, lookups, models, monitoring, predict
from services.query.runtime import QueryRuntime
from services.query.schemas import ProblemOut

DESCRIPTION = """\
The synchronous door to the scoremesh mesh.

* `POST /v1/predict` scores with the same rule set, vectorisation, champion and canary
  routing as the stream, micro-batched; every prediction is also published to the
  `predictions` topic with `source=sync`, so it is monitored like the stream's.
* Lookups read the query store the scorer fills; models and history read the registry.
* Promote and rollback need `Authorization: Bearer <SCOREMESH_API_TOKEN>`; a server with no
  token configured answers 403 on them.
* Errors are RFC 9457 problem details (`application/problem+json`); invalid events carry
  the validator's reason codes.
"""


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    # Models only referenced from openapi_extra (the raw-body predict route) still need to
    # be in the components, and problem+json bodies get their schema.
    _, defs = models_json_schema(
        [(m, "validation") for m in (*predict.DOC_MODELS, ProblemOut)],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses and "HTTPValidationError" in str(responses["422"]):
                responses["422"] = {"description": "Invalid request", "content": problem}
            if "requestBody" in operation:
                responses.setdefault("400", {"description": "Malformed body", "content": {}})
                responses.setdefault("413", {"description": "Body over the limit", "content": {}})
                responses["400"]["content"] = responses["413"]["content"] = problem
            for response in responses.values():
                if "application/problem+json" in response.get("content", {}):
                    response["content"] = dict(problem)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema


PREDICT_PATH = "/v1/predict"
MODEL_PREDICT_PATH = re.compile(r"/v1/models/(?P<name>[a-z0-9][a-z0-9_-]{0,63})/predict")


class QueryApp(FastAPI):
    """FastAPI, with HTTP requests going through ``http`` (the middleware stack) first."""

    http: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.http is not None:
            scope["app"] = self
            await self.http(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def fastapi_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


class _PredictDispatch:
    """POST /v1/predict and /v1/models/{name}/predict straight to their endpoint; everything
    else through FastAPI."""

    def __init__(self, predict: ASGIApp, other: ASGIApp) -> None:
        self.predict = predict
        self.other = other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            if path == PREDICT_PATH:
                await self.predict(scope, receive, send)
                return
            match = MODEL_PREDICT_PATH.fullmatch(path)
            if match is not None:
                scope["scoremesh_model"] = match["name"]
                await self.predict(scope, receive, send)
                return
        await self.other(scope, receive, send)


def create_app(settings: Settings, runtime: QueryRuntime | None = None) -> FastAPI:
    config = runtime.config if runtime is not None else settings.api

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            yield  # its owner (QueryService) starts and stops it
            return
        own = QueryRuntime(settings, config)
        await own.start()
        app.state.runtime = own
        try:
            yield
        finally:
            app.state.runtime = None
            await own.stop()

    app = QueryApp(
        title="scoremesh query API",
        version=services.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "predict", "description": "synchronous scoring"},
            {"name": "lookups", "description": "predictions from the query store"},
            {"name": "models", "description": "the registry, history and commands"},
            {"name": "monitoring", "description": "what the monitor publishes"},
            {"name": "health", "description": "probes and metrics"},
        ],
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.config = config
    # Reads are open unless configured otherwise; then every /v1 route checks the token.
    reads = [ReadAuth] if config.require_token_for_reads else []
    for router in (predict.router, lookups.router, models.router, monitoring.router):
        app.include_router(router, dependencies=reads)
    app.include_router(health.router)
    if settings.console.enabled:
        console.install(app)
    install_handlers(app)

    async def on_too_large(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PayloadTooLarge)
        return too_large_response(request.scope, exc)

    app.add_exception_handler(PayloadTooLarge, on_too_large)
    # The HTTP middleware runs outermost, before the POST /v1/predict dispatch, so the hot
    # route and every other route get the same request ids, access log, timeout and limit.
    routes = {getattr(r, "path", None): r for r in predict.router.routes}
    front: ASGIApp = _PredictDispatch(
        predict.PredictEndpoint(
            app.state, routes.get(PREDICT_PATH), routes.get("/v1/models/{name}/predict")
        ),
        app.fastapi_call,
    )
    front = BodyLimitMiddleware(front, max_body_bytes=config.max_body_bytes)
    front = TimeoutMiddleware(front, timeout_s=config.request_timeout_s)
    if config.cors_origins:
        front = CORSMiddleware(
            front,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id"],
        )
    app.http = ObservabilityMiddleware(front, access_log_enabled=config.access_log)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
