"""query: the FastAPI app on uvicorn, run like every other service (``scoremesh run query``).

uvicorn runs inside the service's own event loop (uvloop when ``run_service`` starts it),
with httptools for HTTP; the socket is bound in ``start()`` so a taken port fails start-up
with a clear error. Signals stay with the lifecycle: ``run(stop)`` asks uvicorn to finish
its in-flight requests when ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack

import uvicorn

from services.common.health import HealthServer
from services.common.http import Server, bind_socket
from services.common.service import StreamService
from services.common.settings import Settings
from services.query.app import create_app
from services.query.runtime import QueryRuntime

log = logging.getLogger(__name__)


class QueryService(StreamService):
    """The HTTP door: serves from ``QueryRuntime`` (models, rules, Kafka, Redis)."""

    name = "query"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.runtime = QueryRuntime(settings)
        self.app = create_app(settings, runtime=self.runtime)
        self.server: uvicorn.Server | None = None
        self.socket: socket.socket | None = None
        self.port: int | None = None

    def register_checks(self, health: HealthServer) -> None:
        for name in ("registry", "model", "kafka", "redis"):
            health.add_check(name, self._check(name))
        health.add_check(
            "http",
            lambda: (
                self.server is not None and self.server.started,
                f"serving on {self.settings.api.host}:{self.port}",
            ),
        )

    def _check(self, name: str) -> Callable[[], tuple[bool, str]]:
        return lambda: self.runtime.quick_checks()[name]

    async def setup(self, stack: AsyncExitStack) -> None:
        stack.push_async_callback(self.runtime.stop)  # its producer exists from the start
        self.socket = bind_socket(
            self.settings.api.host,
            self.settings.api.port,
            "query",
            "the HTTP API",
            "SCOREMESH_API_PORT",
        )
        stack.callback(self._close_socket)
        self.port = self.socket.getsockname()[1]
        await self.runtime.start()
        stack.callback(self._stop_serving)
        # ObservabilityMiddleware writes the access log (the server's own is off).
        self.server = Server.of(self.app, graceful_s=self.settings.shutdown_deadline_s / 2)
        # Everything allocated so far lives as long as the process: move it out of the
        # collector's way. Without this, full collections walking the start-up heap
        # (FastAPI, pydantic, aiokafka, onnxruntime) put p99 at ~100 ms under load; with
        # it p99 is ~7 ms and CPU per request drops ~20 % (scripts/bench_api.py).
        gc.collect()
        gc.freeze()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.server is not None and self.socket is not None, "start() first"
        serving = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="uvicorn")
        stopping = asyncio.create_task(stop.wait())
        log.info("query API listening", extra={"host": self.settings.api.host, "port": self.port})
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self.server.should_exit = True
        stopping.cancel()
        await serving  # returns after in-flight requests finish (or the graceful timeout)
        if stopping not in done and not stop.is_set():
            raise RuntimeError("the HTTP server stopped on its own; see the log above")

    def _stop_serving(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
