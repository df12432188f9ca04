"""A tiny HTTP endpoint per stream service: /healthz, /readyz and /metrics.

Process CPU, memory and open-file metrics come with prometheus-client's default
collectors, so infrastructure is watched with the same scrape as the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.settings import ConfigError

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], tuple[bool, str]]


class CannotListen(ConfigError):
    """A port a service must listen on is taken (or not this process's to take)."""


def cannot_listen(
    service: str, serving: str, host: str, port: int, setting: str, exc: OSError
) -> CannotListen:
    """One line: which service, which address, why, and the setting that changes it."""
    fix = f"set {setting} to a free port (0 picks one)"
    if exc.errno == errno.EADDRNOTAVAIL:
        fix += f", or {setting.replace('_PORT', '_HOST')} to an address of this machine"
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return CannotListen(f"{service} cannot listen on {host}:{port} for {serving} ({reason}); {fix}")


class HealthServer:
    def __init__(self, service: str, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: asyncio.Server | None = None

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

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise cannot_listen(
                self.service,
                "/healthz, /readyz and /metrics",
                self.host,
                self.port,
                "SCOREMESH_METRICS_PORT",
                exc,
            ) from None
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        log.info(
            "health and metrics endpoint up",
            extra={"port": self.port, "url": f"http://{host}:{self.port}/readyz"},
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = self._route(parts[0] if parts else "", path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path == "/healthz":
            return (
                "200 OK",
                "application/json",
                orjson.dumps({"status": "alive", "service": self.service}),
            )
        if path == "/readyz":
            ready, details = self.readiness()
            body = orjson.dumps({"ready": ready, "service": self.service, "checks": details})
            return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"try /healthz, /readyz or /metrics\n"
