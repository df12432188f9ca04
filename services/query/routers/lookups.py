"""Lookups in the Redis query store: what the scorer (and sync predictions) wrote."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from redis.exceptions import RedisError

from scoremesh.contract.featurespec import MAX_ID_LEN
from services.common.query_store import QueryStore
from services.common.settings import MODEL_NAME_PATTERN
from services.query.deps import Runtime
from services.query.problems import Problem
from services.query.runtime import QueryRuntime
from services.query.schemas import EntityPredictionsOut, EventPredictionsOut, problem_responses

router = APIRouter(prefix="/v1", tags=["lookups"])

Id = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN)]
ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="a model name")]


def _store(runtime: QueryRuntime) -> QueryStore:
    if runtime.store is None:
        raise Problem(
            503,
            "store-unavailable",
            "this server has no query store; set SCOREMESH_REDIS_URL",
        )
    return runtime.store


def _unavailable(exc: Exception) -> Problem:
    return Problem(
        503,
        "store-unavailable",
        f"the query store (Redis) did not answer: {exc}; retry later",
        headers={"Retry-After": "5"},
    )


@router.get(
    "/predictions/{event_id}",
    summary="Every variant's latest prediction of the default model for an event",
    response_model=EventPredictionsOut,
    responses=problem_responses(404, 503),
)
async def prediction(event_id: Id, runtime: Runtime) -> Any:
    return await _prediction(runtime, runtime.settings.model_name, event_id)


@router.get(
    "/models/{name}/predictions/{event_id}",
    summary="Every variant's latest prediction of a model for an event",
    response_model=EventPredictionsOut,
    responses=problem_responses(404, 503),
)
async def model_prediction(name: ModelName, event_id: Id, runtime: Runtime) -> Any:
    return await _prediction(runtime, name, event_id)


async def _prediction(runtime: QueryRuntime, model: str, event_id: str) -> dict[str, Any]:
    store = _store(runtime)
    try:
        variants = await store.prediction(model, event_id)
    except (RedisError, OSError) as exc:
        raise _unavailable(exc) from exc
    if not variants:
        raise Problem(
            404,
            "not-found",
            f"no prediction of model {model!r} for event {event_id!r}: it was never scored, "
            "is still on its way through the stream, or expired "
            f"(kept {runtime.settings.redis_prediction_ttl_s} s)",
        )
    return {"model": model, "event_id": event_id, "variants": variants}


@router.get(
    "/entities/{entity_id}/predictions",
    summary="An entity's most recent predictions, newest event time first",
    response_model=EntityPredictionsOut,
    responses=problem_responses(404, 503),
)
async def entity_predictions(
    entity_id: Id,
    runtime: Runtime,
    limit: Annotated[int, Query(ge=1, le=1000, description="events to return")] = 10,
) -> Any:
    store = _store(runtime)
    try:
        found = await store.entity_predictions(entity_id, limit=limit)
    except (RedisError, OSError) as exc:
        raise _unavailable(exc) from exc
    if not found:
        raise Problem(
            404,
            "not-found",
            f"no predictions for entity {entity_id!r}: unknown, expired, or forgotten",
        )
    return {"entity_id": entity_id, "predictions": found}
