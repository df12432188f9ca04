"""The health endpoint of every stream service: /healthz, /readyz and /metrics.

A small Starlette app on uvicorn in the service's own loop (services/common/http.py), on
``SCOREMESH_METRICS_PORT`` (0 = a free port). Process CPU, memory and open-file metrics
come with prometheus-client's default collectors, so infrastructure is watched with the
same scrape as the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.common.http import CannotListen, Server, bind_socket, cannot_listen

__all__ = ["CannotListen", "HealthServer", "ReadinessCheck", "cannot_listen"]

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], tuple[bool, str]]


class HealthServer:
    def __init__(self, service: str, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def readiness(self) -> tuple[bool, dict[str, str]]:
        if not self._checks:  # listening before the service has said what "ready" means
            return False, {"service": "not ready: starting"}
        details: dict[str, str] = {}
        ready = True
        for name, check in self._checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # a broken check means not ready, never a crash
                ok, detail = False, f"check failed: {exc}"
            ready &= ok
            details[name] = ("ok: " if ok else "not ready: ") + detail
        return ready, details

    def app(self) -> Starlette:
        async def healthz(_: Request) -> Response:
            return JSONResponse({"status": "alive", "service": self.service})

        async def readyz(_: Request) -> Response:
            ready, details = self.readiness()
            body = {"ready": ready, "service": self.service, "checks": details}
            return JSONResponse(body, status_code=200 if ready else 503)

        async def metrics(_: Request) -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        async def elsewhere(_: Request, __: Exception) -> Response:
            return PlainTextResponse("try /healthz, /readyz or /metrics\n", status_code=404)

        return Starlette(
            routes=[
                Route("/healthz", healthz, methods=["GET"]),
                Route("/readyz", readyz, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
            ],
            exception_handlers={404: elsewhere},
        )

    async def start(self) -> None:
        sock = bind_socket(
            self.host,
            self.port,
            self.service,
            "/healthz, /readyz and /metrics",
            "SCOREMESH_METRICS_PORT",
            backlog=64,
        )
        self.port = sock.getsockname()[1]
        self._server = Server.of(self.app(), graceful_s=1, lifespan="off")
        self._task = await self._server.serve_until_stopped(sock)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        log.info(
            "health and metrics endpoint up",
            extra={"port": self.port, "url": f"http://{host}:{self.port}/readyz"},
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 3)
