"""Shared fixtures: one embedded stack per test session, unique topics per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before any Settings is built: never pick up a developer's own `scoremesh dev up` stack.
_HOME = Path(tempfile.mkdtemp(prefix="scoremesh-test-home-"))
os.environ["SCOREMESH_HOME"] = str(_HOME)
# ... nor the machine's own Redis: each test session starts a throwaway redis-server, so
# tests neither see nor leave keys in a Redis that something else uses (a closed port is
# what `dev up` probes before it starts one). SCOREMESH_REDIS_URL still wins when set.
os.environ.setdefault("SCOREMESH_DEV_REDIS_PROBE_URL", "redis://127.0.0.1:1/0")

from services.common.devstack import DevStack, StackState  # noqa: E402
from services.common.kafka import delete_topics, ensure_topics  # noqa: E402
from services.common.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def stack(home: Path) -> Iterator[StackState]:
    """The embedded broker + Redis, started once and stopped at the end of the session."""
    dev = DevStack(home, Settings())
    state, _ = dev.up()
    yield state
    dev.down()


@pytest.fixture
async def settings(stack: StackState, tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for one test: its own topic prefix, Redis key prefix and artifact cache."""
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        **stack.settings_overrides(),
        topic_prefix=f"t-{tag}.",
        redis_key_prefix=f"test:{tag}:",
        artifact_dir=tmp_path / "artifacts",
        metrics_port=0,
        kafka_connect_timeout_s=20,
    )
    await ensure_topics(s)
    yield s
    with contextlib.suppress(Exception):
        from scoremesh.contract.catalog import catalog

        await delete_topics(s, list(catalog()))


class Running:
    """A service running in this event loop, as `scoremesh run` would run it."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Any:
        await self.service.start()
        self.task = asyncio.create_task(self.service.run(self.stop))
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, 20)
        await self.service.stop()


@pytest.fixture(scope="session")
def s3_server(home: Path) -> Iterator[Any]:
    """moto's S3-compatible server, started once for the tests that ask for it."""
    from tests.helpers import S3Server

    server = S3Server(home / "moto.log")
    yield server
    server.stop()


def _train(seed: int) -> Any:
    from services.trainer.datasets import CREDIT_SPEC, credit_events
    from services.trainer.pipeline import builtin_recipe, train

    pairs = list(credit_events(3000, seed=seed))
    rows = [e["features"] for e, _ in pairs]
    return train(
        CREDIT_SPEC,
        rows,
        [y for _, y in pairs],
        recipe=builtin_recipe(),
        seed=seed,
        cv_folds=3,
        dataset="test",
    )


@pytest.fixture(scope="session")
def trained_model() -> Any:
    """A small credit model, trained once per session (the real pipeline, fewer rows)."""
    return _train(11)


@pytest.fixture(scope="session")
def trained_model_b() -> Any:
    """A second, different model for swaps and rollbacks."""
    return _train(12)


def ensure_topics_sync(env: dict[str, str]) -> None:
    """Create the catalog's topics for a subprocess configured by environment variables."""
    keys = {k[len("SCOREMESH_") :].lower(): v for k, v in env.items() if k.startswith("SCOREMESH_")}
    asyncio.run(ensure_topics(Settings(**keys)))
