"""Serving HTTP inside a service's own event loop: a socket bound up front (a taken port is a
clear start-up error naming its setting) and uvicorn with httptools, leaving signals to the
lifecycle. Shared by every service's health endpoint and the query API."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Generator
from typing import Any, Literal

import uvicorn

from services.common.settings import ConfigError


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


def bind_socket(
    host: str, port: int, service: str, serving: str, setting: str, backlog: int = 2048
) -> socket.socket:
    """A listening, non-blocking socket, or ``CannotListen`` naming ``setting``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(service, serving, host, port, setting, exc) from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Server(uvicorn.Server):
    """uvicorn in the caller's loop; the lifecycle owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    @classmethod
    def of(cls, app: Any, graceful_s: float = 5.0, lifespan: Literal["on", "off"] = "on") -> Server:
        return cls(
            uvicorn.Config(
                app,
                http="httptools",
                loop="none",  # the lifecycle's loop (uvloop) is already running
                lifespan=lifespan,
                access_log=False,
                log_config=None,  # keep the JSON logging the lifecycle configured
                server_header=False,
                timeout_graceful_shutdown=max(1, int(graceful_s)),
            )
        )

    async def serve_until_stopped(
        self, sock: socket.socket, started_timeout_s: float = 10.0
    ) -> asyncio.Task[None]:
        """Start serving on ``sock`` as a task; return once it accepts connections."""
        task = asyncio.create_task(self.serve(sockets=[sock]), name="http")
        deadline = asyncio.get_running_loop().time() + started_timeout_s
        while not self.started and not task.done():
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # raises what stopped it
        return task
