"""Broker unreachable at start: services retry with backoff, say so, and resume."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from services.common.devstack import DEV_KAFKA_SETTINGS, free_port
from services.common.kafka import ensure_topics
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from tests.conftest import Running
from tests.helpers import (
    ServiceProcess,
    consume_until,
    health,
    produce,
    register_model,
    start_broker,
)

pytestmark = pytest.mark.fault

RETRIES = 4


def retries(service: ServiceProcess) -> list[tuple[float, float]]:
    """(when, announced wait) of each "Kafka not reachable, retrying" line in its log, for
    the first Kafka client that logged one."""
    out, client = [], None
    for line in service.log().splitlines():
        if "Kafka not reachable, retrying" not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:  # the last line, half written
            continue
        client = client or entry.get("client")
        if entry.get("client") == client:
            when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
            out.append((when, float(entry["retry_in_s"])))
    return out


async def test_scorer_waits_for_a_late_broker_and_then_serves(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    kafka_port, metrics_port = free_port(), free_port()
    s = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{kafka_port}", **DEV_KAFKA_SETTINGS}
    )
    scorer = ServiceProcess(
        "scorer",
        s,
        tmp_path,
        SCOREMESH_KAFKA_CONNECT_TIMEOUT_S="90",
        SCOREMESH_METRICS_PORT=str(metrics_port),
    )
    scorer.start()
    broker = None
    try:
        # Until it has retried a few times (its start-up alone can take seconds while another
        # test's services share the cores): a condition, not "6 s after the start"
        deadline = time.monotonic() + 90
        while len(retries(scorer)) < RETRIES and scorer.proc.poll() is None:
            assert time.monotonic() < deadline, f"never retried:\n{scorer.log()[-2000:]}"
            await asyncio.sleep(0.2)
        assert scorer.proc.poll() is None, scorer.log()[-2000:]
        assert health(metrics_port, "/healthz")[0] == 200
        status, body = health(metrics_port, "/readyz")
        assert status == 503 and not body["ready"]
        # the backoff, from the log rather than a count in a wall-clock window: the first
        # wait is short, each one doubles, and the process did wait that long between tries
        tries = retries(scorer)[:RETRIES]
        waits = [w for _, w in tries]
        assert 0 < waits[0] <= 1.0, f"first wait {waits[0]} s: backoff is wrong"
        assert all(b == min(2 * a, 5.0) for a, b in itertools.pairwise(waits)), waits
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(tries)]
        assert all(g >= 0.9 * w for g, w in zip(gaps, waits, strict=False)), (gaps, waits)

        broker = start_broker(kafka_port, tmp_path / "tansu.log")
        await ensure_topics(s)
        async with Running(RegistryService(s)):
            assert (await register_model(s, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
            events = [{**e, "rule_set": "t", "flags": []} for e, _ in credit_events(100, seed=5)]
            from scoremesh.contract.codec import codec

            await produce(
                s,
                "events.valid",
                [(e["entity_id"].encode(), codec("Event").encode(e)) for e in events],
            )
            predictions = await consume_until(
                s, "predictions", lambda r: len(r) >= 100, timeout_s=90
            )
        assert len({p["event_id"] for p in predictions}) == 100
        assert health(metrics_port, "/readyz")[0] == 200
        assert "connected to Kafka" in scorer.log()
    finally:
        if scorer.proc.poll() is None:
            scorer.terminate()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
