"""Pure ASGI middleware (BaseHTTPMiddleware costs a task and a stream per request).

Outermost first: ``ObservabilityMiddleware`` (request id, metrics, access log), then
``TimeoutMiddleware`` (504 when a request runs too long) and ``BodyLimitMiddleware``
(413 for bodies over the limit, by Content-Length or while streaming).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.query.access_log import AccessLog
from services.query.problems import problem_response

access_log = logging.getLogger("services.query.access")
log = logging.getLogger(__name__)

REQUEST_SECONDS = Histogram(
    "scoremesh_api_request_seconds",
    "Query API request latency, by route template, method and status",
    ["route", "method", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IN_FLIGHT = Gauge("scoremesh_api_requests_in_flight", "Query API requests being handled")
TIMEOUTS = Counter("scoremesh_api_timeouts_total", "Requests answered 504 after the timeout")

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED = "<unmatched>"


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class ObservabilityMiddleware:
    """X-Request-ID in and out, latency histogram, in-flight gauge, one JSON log line."""

    def __init__(self, app: ASGIApp, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access = AccessLog(access_log) if access_log_enabled else None
        self._children: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if _VALID_REQUEST_ID.match(value):
                    request_id = value.decode()
                break
        if request_id is None:
            request_id = os.urandom(16).hex()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope["method"]
            key = (route, method, status)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = REQUEST_SECONDS.labels(route, method, str(status))
            child.observe(elapsed)
            if self.access is not None:
                client = scope.get("client")
                self.access.log(
                    {
                        "request_id": request_id,
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "client": client[0] if client else None,
                    }
                )


class TimeoutMiddleware:
    """Answer 504 when a request has not started its response within the limit.

    One watchdog timer per app instead of one per request (``asyncio.timeout`` costs a
    timer handle and a context manager on every request): it wakes every tenth of the
    limit and cancels the requests past their deadline, so a request is cut between
    1.0x and 1.1x the limit.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    def _scan(self) -> None:
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if self._deadlines:
            self._watchdog = loop.call_later(self.timeout_s / 10, self._scan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + self.timeout_s
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s / 10, self._scan)
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # not ours: the server is shutting down or the client went away
            task.uncancel()
            TIMEOUTS.inc()
            log.warning(
                "request timed out", extra={"path": scope["path"], "timeout_s": self.timeout_s}
            )
            if started:
                raise  # half a response is out; the server closes the connection
            response = problem_response(
                scope,
                504,
                "request-timeout",
                f"the request did not finish within {self.timeout_s:g} s; retry later",
            )
            await response(scope, receive, send)
        finally:
            del self._deadlines[task]
            self._expired.discard(task)


class PayloadTooLarge(Exception):
    """The request body grew past the limit while it was read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the {limit}-byte limit")
        self.limit = limit


def too_large_response(scope: Scope, exc: PayloadTooLarge) -> Response:
    return problem_response(
        scope, 413, "payload-too-large", f"{exc}; split the events over several requests"
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break
                if declared > limit:
                    await self._reject(scope, receive, send, declared)
                    return
                # The server delivers no more than Content-Length bytes: nothing to count.
                await self.app(scope, receive, send)
                return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, receive_limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = problem_response(
            scope,
            413,
            "payload-too-large",
            f"the request body is {size} bytes, over the {self.max_body_bytes}-byte limit; "
            "split the events over several requests",
        )
        await response(scope, receive, send)
