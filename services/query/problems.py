"""Errors as RFC 9457 problem details (``application/problem+json``), one shape everywhere."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Problem types are tag URIs (RFC 4151): stable identifiers that need not resolve.
TYPE_PREFIX = "tag:scoremesh.dev,2026:problems/"

TITLES: dict[str, str] = {
    "bad-request": "Bad request",
    "malformed-body": "The request body is not valid JSON",
    "invalid-events": "Some events are invalid",
    "too-many-events": "Too many events in one request",
    "invalid-request": "The request does not match the API",
    "payload-too-large": "Request body too large",
    "unauthorized": "Missing or wrong bearer token",
    "mutations-disabled": "This route is disabled on this server",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "command-refused": "The registry refused the command",
    "no-model": "No model is loaded",
    "not-ready": "The service is not ready",
    "store-unavailable": "The query store is unavailable",
    "kafka-unavailable": "Kafka is unavailable",
    "publish-backlog": "Too many predictions are waiting for Kafka",
    "registry-timeout": "The registry did not answer in time",
    "request-timeout": "The request took too long",
    "scoring-error": "The model could not score the events",
    "internal-error": "Internal server error",
}


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        errors: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = headers
        self.extensions = extensions


def problem_body(
    status: int,
    kind: str,
    detail: str,
    instance: str,
    request_id: str | None = None,
    errors: Sequence[dict[str, Any]] | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + kind,
        "title": TITLES.get(kind, kind.replace("-", " ").capitalize()),
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if request_id:
        body["request_id"] = request_id
    if errors is not None:
        body["errors"] = list(errors)
    body.update(extensions)
    return body


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


def problem_response(
    scope: Scope,
    status: int,
    kind: str,
    detail: str,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body = problem_body(
        status,
        kind,
        detail,
        scope.get("path", ""),
        request_id_of(scope),
        errors,
        **extensions,
    )
    return Response(
        orjson.dumps(body, default=str),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def response_for(scope: Scope, exc: Problem) -> Response:
    return problem_response(
        scope, exc.status, exc.kind, exc.detail, exc.errors, exc.headers, **exc.extensions
    )


def internal_error(scope: Scope, exc: BaseException) -> Response:
    """500 for an error nobody handled; the traceback goes to the log with the request id."""
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"path": scope.get("path", ""), "request_id": request_id_of(scope)},
    )
    return problem_response(
        scope,
        500,
        "internal-error",
        "an unexpected error happened; the request id in this body is in the server log",
    )


_STATUS_KINDS = {
    400: "bad-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
}


def install_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return response_for(request.scope, exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = _STATUS_KINDS.get(exc.status_code, "bad-request")
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path!r}; see /docs or /openapi.json for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path!r}"
        return problem_response(
            request.scope, exc.status_code, kind, detail, headers=dict(exc.headers or {})
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "code": "invalid_request",
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None,
                "message": str(err.get("msg", "invalid")),
            }
            for err in exc.errors()
        ]
        where = ", ".join(e["field"] or "request" for e in errors[:3])
        return problem_response(
            request.scope, 422, "invalid-request", f"invalid {where}", errors=errors
        )

    async def on_error(request: Request, exc: Exception) -> Response:
        return internal_error(request.scope, exc)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_error)
