"""The monitor on the embedded broker and Redis: real Prediction records in, Alerts out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from scoremesh.contract.codec import codec
from services.common.kafka import make_consumer, make_producer, start_with_retry
from services.common.policies.monitor import AlertPolicy, MonitorPolicy, StatePolicy, WindowPolicy
from services.common.settings import Settings
from services.monitor.alerts import Transition
from services.monitor.lag import LagCollector
from services.monitor.service import MonitorService
from services.monitor.sinks import LogSink
from services.monitor.status import ALERT_COLUMNS, format_table, monitor_status
from services.registry.service import RegistryService
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model
from tests.monitor.streams import credit_version, loaded, predictions

pytestmark = pytest.mark.integration

DRIFT_KEY = "credit/1.0.0/reference_drift.salary"
STREAM_KEY = "credit/1.0.0/stream_drift.salary"
VERSION = ("credit", "1.0.0")


class RecordingSink(LogSink):
    """Notifications as people would get them, kept for assertions."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__("info")
        self.seen: list[Transition] = []

    def emit(self, transition: Transition) -> None:
        self.seen.append(transition)


def small_policy(**overrides: Any) -> MonitorPolicy:
    return MonitorPolicy(
        window=WindowPolicy(size=1_000, hop=250, min_samples=500),
        alerts=AlertPolicy(cooldown_s=3_600, heartbeat_s=600),
        state=StatePolicy(snapshot_every_records=20, snapshot_interval_s=600),
        lag_interval_s=0.5,
        drift_state_interval_s=0,
        **overrides,
    )


def _first_partition(key: bytes, partitions: list[int], available: list[int]) -> int:
    return partitions[0]


async def publish(
    settings: Settings, values: list[dict[str, Any]], one_partition: bool = False
) -> None:
    """``one_partition``: the stream in one order, whatever the monitor's fetches hold."""
    encode = codec("Prediction").encode
    opts = {"partitioner": _first_partition} if one_partition else {}
    pairs = [(p["event_id"].encode(), encode(p)) for p in values]
    await produce(settings, "predictions", pairs, **opts)


def scored(trained: Any, n: int, seed: int, drift_at: int | None = None) -> list[dict[str, Any]]:
    version = credit_version(trained.onnx, trained.metadata)
    model = loaded(trained.onnx, version)
    return list(predictions(model, n, seed, drift_at=drift_at, drift={"salary": 1.5}))


async def wait_for(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


def alerts_of(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [r for r in records if r["alert_key"] == key]


async def test_injected_drift_in_real_predictions_raises_one_alert(
    settings: Settings, trained_model: Any
) -> None:
    sink = RecordingSink()
    async with Running(RegistryService(settings)):
        outcome = await register_model(
            settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
        )
        assert outcome["outcome"] == "applied", outcome
        async with Running(MonitorService(settings, small_policy(), sinks=[sink])) as monitor:
            stream = scored(trained_model, 6_000, seed=5, drift_at=3_000)
            # as a live stream arrives: the change after what came before it. Published at
            # once, a fetch may hold one partition's rows from both sides of the change
            # before another's from before it, and the detectors would see several steps;
            # on one partition the detectors see the same sequence in every run (the size
            # measured after a detection depends on which rows come after it)
            await publish(settings, stream[:3_000], one_partition=True)
            await wait_for(lambda: seen(monitor) >= 3_000)
            await publish(settings, stream[3_000:], one_partition=True)
            records = await consume_until(
                settings, "alerts", lambda rs: bool(alerts_of(rs, DRIFT_KEY)), timeout_s=90
            )
            await wait_for(lambda: monitor.loop.batches > 0 and monitor.store.healthy)
            # the whole stream is in: nothing more may open for this key
            await wait_for(lambda: seen(monitor) >= 6_000)
            for _ in range(100):  # the read model is written after the batch, off the loop
                status = await monitor_status(settings, alerts_from="redis")
                if [v for v in status.versions if v["predictions"] == 6_000]:
                    break
                await asyncio.sleep(0.1)
            await wait_for(lambda: _gauge("scoremesh_consumer_group_lag", monitor.group_id) == 0)
    opened = [t for t in sink.seen if t.key == DRIFT_KEY and t.event == "opened"]
    assert len(opened) == 1, [t.event for t in sink.seen if t.key == DRIFT_KEY]
    first = alerts_of(records, DRIFT_KEY)[0]
    assert first["state"] == "firing" and first["kind"] == "drift"
    assert first["subject"]["feature"] == "salary" and first["model_version"] == "1.0.0"
    assert float(first["evidence"]["psi"]) >= 0.1 and first["evidence"]["sample"]
    # the score held: reference drift of an input alone is worth knowing, not a page
    assert first["severity"] == "info" and "capped at info" in first["evidence"]["rule"]
    assert first["evidence"]["runbook"] == "docs/operations.md#reference-drift"
    # the step itself (x1.5, ~1.1 sd) pages, from the size of the shift, with its evidence
    (step,) = {r["first_seen"]: r for r in alerts_of(records, STREAM_KEY)}.values()
    assert step["severity"] in ("warning", "critical")
    assert float(step["evidence"]["shift_sd"]) >= 0.5
    assert step["evidence"]["rule"].startswith("stream_drift.salary: shift_sd")
    # before the drift the stream matched its training reference: nothing fired
    assert all(r["first_seen"] >= _event_time(3_000) for r in records)
    keys = {r["alert_key"] for r in status.alerts}
    assert DRIFT_KEY in keys
    salary = [d for d in status.drift if d["signal"] == "reference_drift.salary"]
    assert salary and salary[0]["state"] == "info"
    assert "salary" in format_table(status.alerts, ALERT_COLUMNS, width=200)
    # per version over the whole stream: what `monitor status` and the API show
    (figures,) = status.versions
    assert (figures["model"], figures["version"], figures["segment"]) == ("credit", "1.0.0", "all")
    assert figures["predictions"] == 6_000 and figures["labels"] == 0
    assert abs(sum(figures["decisions"].values()) - 1.0) < 1e-9


def seen(monitor: MonitorService) -> int:
    """Predictions the whole-stream detectors of credit 1.0.0 have seen in this process."""
    state = monitor.core.states.get(VERSION)
    return state.bank.score[0].seen if state is not None else 0


def owner(*monitors: MonitorService) -> MonitorService | None:
    held = [m for m in monitors if VERSION in m.core.states]
    return held[0] if len(held) == 1 else None


async def test_restart_and_rebalance_mid_stream_page_once_and_lose_nothing(
    settings: Settings, trained_model: Any
) -> None:
    """The salary step comes at 5,000 of 9,000 predictions. Monitor A starts alone; B
    joins (rebalance) before the step, A leaves after it (rebalance), B restarts as C
    (restart). The detectors' state moves through monitor.state snapshots: the step is
    paged once, and the owner's detectors applied every prediction exactly once."""
    stream = scored(trained_model, 9_000, seed=6, drift_at=5_000)
    sinks = [RecordingSink(), RecordingSink(), RecordingSink()]
    async with Running(RegistryService(settings)):
        outcome = await register_model(
            settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
        )
        assert outcome["outcome"] == "applied", outcome
        a = MonitorService(settings, small_policy(), sinks=[sinks[0]])
        b = MonitorService(settings, small_policy(), sinks=[sinks[1]])
        running_a = Running(a)
        await running_a.__aenter__()
        try:
            await publish(settings, stream[:4_000])
            await wait_for(lambda: seen(a) == 4_000, 90)
            async with Running(b):
                await wait_for(lambda: b.loop.assigned and a.loop.assigned, 60)
                await publish(settings, stream[4_000:7_000])
                await wait_for(lambda: (o := owner(a, b)) is not None and seen(o) == 7_000, 90)
                await running_a.__aexit__(None, None, None)
                running_a = None  # type: ignore[assignment]
                await publish(settings, stream[7_000:8_000])
                await wait_for(lambda: seen(b) == 8_000, 90)
            c = MonitorService(settings, small_policy(), sinks=[sinks[2]])
            async with Running(c):
                await publish(settings, stream[8_000:])
                await wait_for(lambda: seen(c) >= 9_000, 90)
                final = seen(c)
                restores = c.restores
        finally:
            if running_a is not None:
                await running_a.__aexit__(None, None, None)
        records = await consume_until(
            settings, "alerts", lambda rs: bool(alerts_of(rs, STREAM_KEY)), timeout_s=30
        )
    # every prediction was applied once by the detectors, across two rebalances and a restart
    assert final == 9_000
    assert any(r["restored"] >= 1 and r["replayed"] <= 20 for r in restores), restores
    # one episode on the alerts topic, one page however many processes held the detector
    episodes = {r["first_seen"] for r in alerts_of(records, STREAM_KEY)}
    assert len(episodes) == 1
    (first_seen,) = episodes
    assert _event_time(5_000) <= first_seen <= _event_time(5_600)
    pages = [t for sink in sinks for t in sink.seen if t.key == STREAM_KEY and t.event == "opened"]
    assert len(pages) == 1
    # nothing opened on the stationary part before the step
    assert all(r["first_seen"] >= _event_time(5_000) for r in records if r["severity"] != "info")


async def test_consumer_lag_uses_committed_offsets_and_true_end(settings: Settings) -> None:
    topic = settings.topic("monitoring.stats")
    producer = make_producer(settings)
    await start_with_retry(producer.start, "lag-producer", settings)
    try:
        futures = [await producer.send(topic, b"x" * 10, partition=0) for _ in range(100)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    group = f"{settings.topic_prefix}lag-probe"
    consumer = make_consumer(settings, group_id=group)
    await start_with_retry(consumer.start, "lag-probe", settings)
    tp = TopicPartition(topic, 0)
    try:
        consumer.assign([tp])
        await consumer.commit({tp: 10})
    finally:
        await consumer.stop()
    collector = LagCollector(settings, topics=[topic])
    await collector.start()
    try:
        lags = {(x.group, x.topic, x.partition): x for x in await collector.collect()}
    finally:
        await collector.stop()
    probe = lags[(group, topic, 0)]
    assert (probe.committed, probe.end, probe.lag) == (10, 100, 90)


def _gauge(name: str, group: str) -> float | None:
    total = None
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and sample.labels.get("group") == group:
                total = (total or 0.0) + sample.value
    return total


def _event_time(index: int) -> int:
    return 1_767_225_600_000 + index * 1_000
