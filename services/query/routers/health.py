"""/healthz, /readyz and /metrics: the probes and the Prometheus scrape."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.query.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])

SERVICE = "query"


@router.get("/healthz", summary="The process is alive", response_model=HealthOut)
async def healthz() -> Any:
    return {"status": "alive", "service": SERVICE}


@router.get(
    "/readyz",
    summary="Registry folded, champion loaded, Kafka producer up, Redis answering",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Not ready; checks say why"}},
)
async def readyz(request: Request) -> Response:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        ready, checks = False, {"runtime": "not ready: starting"}
    else:
        readiness = await runtime.readiness()
        ready, checks = readiness.ready, readiness.checks
    body = orjson.dumps({"ready": ready, "service": SERVICE, "checks": checks})
    return Response(body, status_code=200 if ready else 503, media_type="application/json")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
