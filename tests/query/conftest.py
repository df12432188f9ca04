"""Fixtures for the query API: the app in-process (ASGI) and as a real uvicorn process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.devstack import StackState
from services.common.kafka import delete_topics, ensure_topics
from services.common.settings import Settings
from services.query.app import create_app
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import register_model

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"


def events(n: int, seed: int = 31) -> list[dict[str, Any]]:
    return [e for e, _ in credit_events(n, seed=seed)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this event loop, its lifespan run as a server would run it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://query") as client:
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get("/readyz")
        body = response.json()
        if response.status_code == 200:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"query API not ready in {timeout_s:.0f}s: {body}")


async def with_champion(settings: Settings, onnx: bytes, version: str = "1.0.0") -> None:
    async with Running(RegistryService(settings)):
        outcome = await register_model(settings, onnx, version)
        assert outcome["outcome"] == "applied", outcome


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that makes ``Settings()`` in a child process equal these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env["SCOREMESH_HOME"] = os.environ["SCOREMESH_HOME"]
    for name in (
        "kafka_bootstrap",
        "redis_url",
        "topic_prefix",
        "redis_key_prefix",
        "artifact_dir",
        "kafka_idempotence",
        "kafka_fetch_max_wait_ms",
        "kafka_session_timeout_ms",
        "kafka_heartbeat_interval_ms",
        "kafka_rebalance_timeout_ms",
    ):
        value = getattr(settings, name)
        if value is not None:
            env[f"SCOREMESH_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    env.update(extra)
    return env


@dataclass
class ApiProcess:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


SERVE = (
    "from services.common.lifecycle import run_service\n"
    "from services.common.settings import Settings\n"
    "from services.query.service import QueryService\n"
    "s = Settings()\n"
    "raise SystemExit(run_service('query', lambda: QueryService(s), s))\n"
)


@contextlib.contextmanager
def api_process(settings: Settings, log_path: Path, **env: str) -> Iterator[ApiProcess]:
    """``scoremesh run query`` as a child process (uvicorn, uvloop, httptools)."""
    port = free_port()
    environ = env_for(
        settings,
        SCOREMESH_API_HOST="127.0.0.1",
        SCOREMESH_API_PORT=str(port),
        SCOREMESH_METRICS_PORT="0",
        **env,
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE],
            cwd=ROOT,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base_url = f"http://127.0.0.1:{port}"
    running = ApiProcess(base_url, process, log_path, httpx.Client(base_url=base_url, timeout=10))
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"query process exited {process.returncode}:\n{running.log()}")
            try:
                if httpx.get(f"{running.base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"query process not ready:\n{running.log()}")
            time.sleep(0.3)
        yield running
    finally:
        running.client.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
async def module_settings(
    stack: StackState, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """Module-wide settings (own topics and keys) for tests that share one served model."""
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        **stack.settings_overrides(),
        topic_prefix=f"q-{tag}.",
        redis_key_prefix=f"test:{tag}:",
        artifact_dir=tmp_path_factory.mktemp("artifacts"),
        metrics_port=0,
        kafka_connect_timeout_s=20,
    )
    await ensure_topics(s)
    yield s
    with contextlib.suppress(Exception):
        from scoremesh.contract.catalog import catalog

        await delete_topics(s, list(catalog()))
