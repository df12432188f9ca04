"""POST /v1/predict: validate like the validator, score like the scorer, micro-batched."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from scoremesh.contract.featurespec import RuleSet
from scoremesh.contract.records import Event
from services.common.serving.scoring import ScoringError
from services.query.deps import read_access
from services.query.middleware import PayloadTooLarge, too_large_response
from services.query.problems import Problem, internal_error, response_for
from services.query.runtime import Backlogged, EventPredictions, QueryRuntime
from services.query.schemas import (
    EventBatchIn,
    EventIn,
    PredictionBatchOut,
    PredictionOut,
    problem_responses,
)

router = APIRouter(prefix="/v1", tags=["predict"])

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/EventIn"},
                        {"$ref": "#/components/schemas/EventBatchIn"},
                    ]
                },
                "examples": {
                    "one event": {
                        "value": {
                            "event_id": "e-1",
                            "entity_id": "customer-42",
                            "event_time": "2026-11-02T10:00:00Z",
                            "features": {"salary": 52000.0, "age": 41, "elevel": 2},
                            "attributes": {"channel": "web"},
                        }
                    }
                },
            }
        },
    }
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One prediction per event; a single event gets a single object",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/PredictionOut"},
                        {"$ref": "#/components/schemas/PredictionBatchOut"},
                    ]
                }
            }
        },
    },
    **problem_responses(400, 404, 413, 422, 503),
}

DOC_MODELS = (EventIn, EventBatchIn, PredictionOut, PredictionBatchOut)
JSON = "application/json"
JSON_BYTES = JSON.encode()


def _event_errors(index: int, raw: Any, violations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return [
        {**v, "index": index, "event_id": event_id if isinstance(event_id, str) else None}
        for v in violations
    ]


def _check_events(
    raws: list[Any], rules: RuleSet, size_limit: int, sizes_known_small: bool, model: str
) -> list[Event]:
    """Checked events, or a 422 Problem naming every invalid event's reasons."""
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    for index, raw in enumerate(raws):
        if not sizes_known_small:
            size = len(orjson.dumps(raw))
            if size > size_limit:
                errors += _event_errors(
                    index,
                    raw,
                    [
                        {
                            "code": "too_large",
                            "field": None,
                            "message": f"{size} bytes exceeds the {size_limit}-byte limit",
                        }
                    ],
                )
                continue
        checked = rules.check(raw, model=model)
        if checked.event is None:
            errors += _event_errors(index, raw, [v.as_record() for v in checked.rejections])
        elif not errors:
            events.append(checked.event)  # type: ignore[arg-type]
    if errors:
        bad = len({e["index"] for e in errors})
        raise Problem(
            422,
            "invalid-events",
            f"{bad} of {len(raws)} events are invalid; nothing was scored. The errors list "
            "names each event (index, event_id) and what to fix (code, field, message)",
            errors=errors,
            rule_set=rules.version,
        )
    return events


def _out(event: Event, variants: EventPredictions) -> dict[str, Any]:
    served = next((p for p in variants if p["served"]), variants[0])
    return {
        "event_id": served["event_id"],
        "entity_id": served["entity_id"],
        "decision": served["decision"],
        "score": served["score"],
        "scores": served["scores"],
        "model": served["model"],
        "model_version": served["model_version"],
        "variant": served["variant"],
        "served": True,
        "flags": event.get("flags", []),
    }


@router.post(
    "/predict",
    summary="Score one event or a batch",
    description=(
        "Validates each event with the serving versions' rule set (the validator's reason "
        "codes), scores with the champion (and the canary for its share of entities), and "
        "publishes every variant's prediction to the predictions topic with source=sync. "
        "If any event is invalid, nothing is scored and the answer is 422."
    ),
    openapi_extra=REQUEST_BODY,
    responses=RESPONSES,
    response_class=Response,
)
async def predict(request: Request) -> Response:
    # The server dispatches POST /v1/predict to PredictEndpoint before FastAPI routing; this
    # route answers when the app is called some other way and documents the operation.
    body = await predict_body(request.app.state.runtime, await request.body(), None)
    return Response(body, media_type=JSON)


@router.post(
    "/models/{name}/predict",
    summary="Score one event or a batch with a named model",
    description=(
        "As POST /v1/predict, for the model in the path: every event is for this model "
        "(an event naming another model is refused). POST /v1/predict serves the events' "
        "own model, else the default model."
    ),
    openapi_extra=REQUEST_BODY,
    responses=RESPONSES,
    response_class=Response,
)
async def predict_model(name: str, request: Request) -> Response:
    body = await predict_body(request.app.state.runtime, await request.body(), name)
    return Response(body, media_type=JSON)


def _model_of(raws: list[Any], named: str | None, default: str) -> str:
    """The one model a request is for: the path's, else the events' own, else the default."""
    given = {raw.get("model") for raw in raws if isinstance(raw, dict) and raw.get("model")}
    if named is not None:
        others = sorted(str(m) for m in given - {named})
        if others:
            raise Problem(
                422,
                "wrong-model",
                f"this route scores with model {named!r}; events name {', '.join(others)}",
                errors=[{"code": "wrong_model", "field": "model", "message": "model mismatch"}],
            )
        return named
    if len(given) > 1:
        raise Problem(
            422,
            "mixed-models",
            "one request scores with one model; these events name "
            + ", ".join(sorted(map(str, given)))
            + ": send them to POST /v1/models/{name}/predict per model",
            errors=[{"code": "mixed_models", "field": "model", "message": "several models"}],
        )
    model = given.pop() if given else default
    if not isinstance(model, str):
        raise Problem(
            422,
            "invalid-request",
            "model must be a string (a model name)",
            errors=[{"code": "invalid_envelope", "field": "model", "message": "not a string"}],
        )
    return model


async def predict_body(runtime: QueryRuntime | None, body: bytes, named: str | None) -> bytes:
    """The JSON answer to a predict body, or a ``Problem``. ``named``: the model in the
    path (POST /v1/models/{name}/predict), None for POST /v1/predict."""
    if runtime is None:
        raise Problem(503, "not-ready", "the service is starting; retry in a moment")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            400,
            "malformed-body",
            f'the body is not JSON ({exc}); send one event object or {{"events": [...]}}',
            errors=[{"code": "undecodable", "field": None, "message": str(exc)}],
        ) from None
    batch = isinstance(payload, dict) and "events" in payload and "event_id" not in payload
    if batch:
        raws = payload["events"]
        limit = runtime.config.max_batch
        if not isinstance(raws, list) or not raws:
            raise Problem(
                422,
                "invalid-request",
                "'events' must be a non-empty list of event objects",
                errors=[{"code": "invalid_envelope", "field": "events", "message": "not a list"}],
            )
        if len(raws) > limit:
            raise Problem(
                422,
                "too-many-events",
                f"{len(raws)} events in one request; the limit is {limit}; split them",
                errors=[
                    {
                        "code": "too_many_events",
                        "field": "events",
                        "message": f"at most {limit} events per request",
                    }
                ],
            )
    else:
        raws = [payload]
    model = _model_of(raws, named, runtime.settings.model_name)
    serving, rules = runtime.rules(model)
    if rules is None or serving is None:
        if model not in runtime.holder.current.known and model != runtime.settings.model_name:
            raise Problem(
                404,
                "unknown-model",
                f"no model {model!r} in the registry; GET /v1/models lists them",
            )
        raise Problem(
            503,
            "no-model",
            f"no champion of model {model!r} is loaded yet; promote one "
            "(`scoremesh models promote`) or wait for it to load",
            headers={"Retry-After": "5"},
        )
    size_limit = min(
        runtime.settings.max_event_bytes,
        rules.spec.max_event_bytes or runtime.settings.max_event_bytes,
    )
    events = _check_events(raws, rules, size_limit, len(body) <= size_limit, model)
    try:
        results = await runtime.predict(model, events)
    except ScoringError as exc:
        raise Problem(500, "scoring-error", f"the model could not score the events: {exc}") from exc
    except Backlogged as exc:
        raise Problem(
            503,
            "publish-backlog",
            f"{exc}, the most this server holds; nothing was scored. Retry in a moment",
            headers={"Retry-After": "1"},
        ) from None
    if batch:
        out: Any = {"predictions": [_out(e, r) for e, r in zip(events, results, strict=True)]}
    else:
        out = _out(events[0], results[0])
    return orjson.dumps(out)


class PredictEndpoint:
    """POST /v1/predict (and /v1/models/{name}/predict) as a plain ASGI app, dispatched
    before FastAPI's routing.

    It does for this one route what FastAPI's stack does (read access, the body, problem
    answers for every error), without the router's matching, dependency solving and
    exception middleware, which measured ~40 % of a sync prediction's CPU. The route
    above stays registered: it documents the operation and answers when the app is
    called without the dispatch.
    """

    def __init__(
        self, state: State, route: BaseRoute | None, model_route: BaseRoute | None = None
    ) -> None:
        self.state = state
        self.route = route
        self.model_route = model_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # for the access log and the latency histogram
        scope["route"] = self.model_route if scope.get("scoremesh_model") else self.route
        state = self.state
        try:
            if state.config.require_token_for_reads:
                await read_access(Request(scope, receive))
            content = await predict_body(
                state.runtime, await _read_body(receive), scope.get("scoremesh_model")
            )
        except Problem as exc:
            response = response_for(scope, exc)
        except PayloadTooLarge as exc:
            response = too_large_response(scope, exc)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:
            response = internal_error(scope, exc)
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-length", str(len(content)).encode()),
                        (b"content-type", JSON_BYTES),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": content})
            return
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
