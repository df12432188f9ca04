"""monitor: predictions, labels, stats and deployments in; alerts, Redis and metrics out.

An aiokafka batch loop (ADR 0001, 0007) in the consumer group ``<prefix>scoremesh-monitor``
over predictions, predictions.labeled, monitoring.stats, deployments.log, retrain.results
and its own ``monitor.signals``. The first stage turns input partitions into signal
records keyed by model; the consumer of a model's signals partition runs its detectors
over the whole stream (``core``). Signal, snapshot and alert records are outputs of the
batch, so a batch's offsets are committed only after all of them are on the broker.
State survives restarts and rebalances without pickle:

- alert state: the alerts topic (the monitor's own output) is folded at start and then
  followed, so sibling processes see each other's alerts (and never page twice);
- detector state: JSON snapshots on ``monitor.state`` (periodic, and when a signals
  partition is revoked or the monitor stops). A newly assigned signals partition is
  restored from them and the signals after the snapshot are replayed with alerting off:
  their alerts were committed before the offsets were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from scoremesh.contract.codec import CodecError, codec
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import (
    assign_all,
    enqueue_records,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
)
from services.common.policies.monitor import MonitorPolicy, load_policy, with_sinks
from services.common.registry_view import RegistryView
from services.common.settings import Settings
from services.monitor import metrics as m
from services.monitor.alerts import Transition
from services.monitor.core import ALERTS, SIGNALS, SOURCES, STATE, MonitorCore
from services.monitor.lag import LagCollector
from services.monitor.performance import PerformanceCheck
from services.monitor.sinks import Sink, SinkHub, sinks_from_policy
from services.monitor.store import AlertStore

log = logging.getLogger(__name__)

REPLAY_CHUNK = 5_000


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Batches in flight settle, then the revoked signals partitions are snapshotted so
    their next owner resumes where this one stopped."""

    def __init__(self, service: MonitorService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.service.loop.settle()
        await self.service.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.service.loop.assigned = list(assigned)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{t.topic}/{t.partition}" for t in assigned]},
        )


class MonitorLoop(BatchLoop):
    def __init__(self, service: MonitorService, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener = _Rebalance(service)

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return self._listener


class MonitorService:
    name = "monitor"

    def __init__(
        self,
        settings: Settings,
        policy: MonitorPolicy | None = None,
        *,
        sinks: list[Sink] | None = None,
        performance_check: PerformanceCheck | None = None,
        store: AlertStore | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        configured = settings.monitor.policy
        if settings.monitor.policy_file is not None:
            configured = load_policy(settings.monitor.policy_file)
        self.policy = policy or with_sinks(
            configured,
            webhook_url=settings.monitor.webhook_url,
            slack_webhook_url=settings.monitor.slack_webhook_url,
            pagerduty_routing_key=settings.monitor.pagerduty_routing_key,
        )
        self.core = MonitorCore(settings, self.policy, performance_check)
        self.view = RegistryView(settings, on_change=self.core.on_registry)
        self.producer = make_producer(settings)
        self.group_id = f"{settings.topic_prefix}scoremesh-monitor"
        self.loop = MonitorLoop(
            self,
            settings,
            self.name,
            self.group_id,
            [settings.topic(name) for name in SOURCES],
            self.producer,
            self._process,
        )
        if store is None and settings.redis_url:
            store = AlertStore(
                settings, self.policy.redis_alert_ttl_s, self.policy.redis_recent_alerts
            )
        self.store = store
        cooldown_ms = int(self.policy.alerts.cooldown_s * 1000)

        async def gate(transition: Transition) -> bool:
            assert self.store is not None
            return await self.store.claim(transition, cooldown_ms)

        self.hub = SinkHub(
            sinks if sinks is not None else sinks_from_policy(self.policy.sinks),
            self.policy.sinks,
            gate=gate if store is not None else None,
            client=http_client,
        )
        self.lag = LagCollector(settings) if self.policy.lag_interval_s > 0 else None
        self.alerts_ready = asyncio.Event()
        self._alert_codec = codec("Alert")
        self._alerts_consumer: AIOKafkaConsumer | None = None
        self._replay_consumer: AIOKafkaConsumer | None = None
        self._restored: set[int] = set()  # monitor.signals partitions whose state is here
        self._signals_topic = settings.topic(SIGNALS)
        self._state_topic = settings.topic(STATE)
        self.restores: list[dict[str, Any]] = []  # what each restore did (tests, logs)
        self._tasks: list[asyncio.Task[None]] = []
        self._store_write: asyncio.Task[None] | None = None
        self._drift_written_at = 0.0

    # --- lifecycle ------------------------------------------------------------------

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        health.add_check(
            "alerts",
            lambda: (
                self.alerts_ready.is_set(),
                f"alerts folded: {len(self.core.manager.book.open_alerts())} open",
            ),
        )
        self.loop.add_checks(health)
        if self.store is not None:
            store = self.store
            health.add_check("redis", lambda: (store.healthy, "alert store writable"))

    async def start(self) -> None:
        await start_with_retry(self.producer.start, "monitor-producer", self.settings)
        await self.view.start()
        await self._fold_alerts()
        self._replay_consumer = make_consumer(
            self.settings, group_id=None, max_poll_records=REPLAY_CHUNK
        )
        await start_with_retry(self._replay_consumer.start, "monitor-replay", self.settings)
        if self.store is not None:
            await self.store.ping()
        await self.hub.start()
        if self.lag is not None:
            await self.lag.start()
            self._tasks.append(
                asyncio.create_task(self.lag.run(self.policy.lag_interval_s), name="consumer-lag")
            )

    async def run(self, stop: asyncio.Event) -> None:
        await self.loop.start(stop)
        await self.loop.run(stop)

    async def stop(self) -> None:
        await self.loop.settle()
        with contextlib.suppress(Exception):
            await self.release(
                [TopicPartition(self._signals_topic, p) for p in sorted(self._restored)],
                timeout_s=10,
            )
        await self.loop.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.lag is not None:
            await self.lag.stop()
        for consumer in (self._alerts_consumer, self._replay_consumer):
            if consumer is not None:
                await consumer.stop()
        await self.hub.stop()
        if self._store_write is not None:
            with contextlib.suppress(Exception):
                await self._store_write
        if self.store is not None:
            await self.store.close()
        await self.view.stop()
        await self.producer.stop()

    # --- alert state from the topic -------------------------------------------------

    async def _fold_alerts(self) -> None:
        consumer = make_consumer(self.settings, group_id=None, max_poll_records=REPLAY_CHUNK)
        await start_with_retry(consumer.start, "monitor-alerts", self.settings)
        self._alerts_consumer = consumer
        tps = await assign_all(consumer, self.settings.topic(ALERTS))
        folded = await read_to_end(consumer, tps, self._apply_alert, timeout_s=120)
        self.core.export_open()
        self.alerts_ready.set()
        log.info(
            "alerts folded",
            extra={"records": folded, "open": len(self.core.manager.book.open_alerts())},
        )
        self._tasks.append(asyncio.create_task(self._follow_alerts(consumer), name="alerts-follow"))

    def _apply_alert(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            self.core.manager.book.apply_record(self._alert_codec.decode(record.value or b""))
        except (CodecError, KeyError, ValueError) as exc:
            m.SKIPPED.labels(ALERTS, "undecodable").inc()
            log.error(
                "skipping unreadable alert record",
                extra={"offset": record.offset, "error": str(exc)},
            )

    async def _follow_alerts(self, consumer: AIOKafkaConsumer) -> None:
        """Sibling monitors' records (and our own, which change nothing) keep the book whole."""
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                log.warning("alerts follow error, retrying", extra={"error": str(exc)})
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self._apply_alert(record)

    # --- the batch ------------------------------------------------------------------

    async def _process(self, records: list[Record]) -> list[Out]:
        await self._sync_partitions(records)
        result = self.core.process(records)
        for transition in result.transitions:
            self.hub.submit(transition)
        self._schedule_store_write(result.transitions)
        return result.outs

    async def release(self, revoked: list[TopicPartition], timeout_s: float = 30.0) -> None:
        """Snapshot the state of revoked signals partitions (after their batches settled),
        then forget every revoked partition's state."""
        parts = sorted(
            tp.partition
            for tp in revoked
            if tp.topic == self._signals_topic and tp.partition in self._restored
        )
        outs = self.core.snapshot_outs(parts)
        if outs:
            futures, _ = await enqueue_records(
                self.producer,
                [(o.topic, o.partition, o.key, o.value) for o in outs],
                close_batches=True,
            )
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
            log.info(
                "detector state snapshotted", extra={"partitions": parts, "versions": len(outs)}
            )
        for tp in revoked:
            self.core.drop_partition(tp.topic, tp.partition)
            if tp.topic == self._signals_topic:
                self._restored.discard(tp.partition)

    async def _sync_partitions(self, records: list[Record]) -> None:
        """Restore the second stage's state of newly seen signals partitions."""
        assigned = {tp.partition for tp in self.loop.assigned if tp.topic == self._signals_topic}
        for part in [p for p in self._restored if p not in assigned]:
            self.core.drop_partition(self._signals_topic, part)
            self._restored.discard(part)
        firsts: dict[int, int] = {}
        for record in records:
            if record.topic != self._signals_topic or record.partition in self._restored:
                continue
            firsts[record.partition] = min(
                firsts.get(record.partition, record.offset), record.offset
            )
        if not firsts:
            return
        snapshots = await self._fold_state(set(firsts))
        for part, first in sorted(firsts.items()):
            await self._restore(part, first, snapshots.get(part, []))
            self._restored.add(part)

    async def _fold_state(self, parts: set[int]) -> dict[int, list[dict[str, Any]]]:
        """The newest snapshot of every version whose signals are on these partitions."""
        consumer = self._replay_consumer
        assert consumer is not None
        newest: dict[bytes, dict[str, Any]] = {}

        def keep(record: ConsumerRecord[bytes, bytes]) -> None:
            if record.key is None:
                return
            if record.value is None:
                newest.pop(record.key, None)
                return
            try:
                value = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                m.SKIPPED.labels(STATE, "undecodable").inc()
                return
            if isinstance(value, dict) and value.get("signals_partition") in parts:
                newest[record.key] = value
            else:
                newest.pop(record.key, None)

        tps = await assign_all(consumer, self._state_topic)
        await read_to_end(consumer, tps, keep, timeout_s=self.policy.state.timeout_s)
        out: dict[int, list[dict[str, Any]]] = {}
        for value in newest.values():
            out.setdefault(int(value["signals_partition"]), []).append(value)
        return out

    async def _restore(self, part: int, first: int, snapshots: list[dict[str, Any]]) -> None:
        """Versions from their snapshots, then the signals between the oldest snapshot and
        this batch replayed with alerting off (or, with no snapshot, the last
        ``state.cold_replay_records``)."""
        starts = []
        for snapshot in snapshots:
            start = self.core.restore(snapshot)
            m.SNAPSHOT_RESTORES.labels("restored" if start is not None else "unusable").inc()
            if start is not None:
                starts.append(start)
        if starts and len(starts) == len(snapshots):
            begin = min(starts)
        else:
            begin = max(0, first - self.policy.state.cold_replay_records)
            if snapshots:
                begin = min([begin, *starts])
        replayed = await self._replay(TopicPartition(self._signals_topic, part), begin, first)
        info = {
            "partition": part,
            "snapshots": len(snapshots),
            "restored": len(starts),
            "replayed_from": begin,
            "first": first,
            "replayed": replayed,
        }
        self.restores.append(info)
        log.info("detector state restored", extra=info)

    async def _replay(self, tp: TopicPartition, start: int, before: int) -> int:
        if start >= before:
            return 0
        consumer = self._replay_consumer
        assert consumer is not None
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + self.policy.state.timeout_s
        replayed = 0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=REPLAY_CHUNK)
            chunk = [r for r in batches.get(tp, []) if r.offset < before]
            if chunk:
                self.core.process(chunk, warm=True)
                replayed += len(chunk)
            if await consumer.position(tp) >= before:
                break
        else:
            log.warning(
                "replay did not reach the batch in time; detectors start partly cold",
                extra={"partition": f"{tp.topic}/{tp.partition}", "replayed": replayed},
            )
        m.REPLAYED.labels(tp.topic).inc(replayed)
        return replayed

    def _schedule_store_write(self, transitions: list[Transition]) -> None:
        store = self.store
        if store is None:
            return
        drift: dict[str, list[dict[str, Any]]] = {}
        versions: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        if now - self._drift_written_at >= self.policy.drift_state_interval_s:
            for model, version in self.core.drift_changed:
                rows = self.core.drift.get((model, version), {})
                drift[f"{model}@{version}"] = [row.as_dict() for row in rows.values()]
            self.core.drift_changed.clear()
            versions = self.core.version_rows()
            self._drift_written_at = now
        if not transitions and not drift and not versions:
            return
        previous = self._store_write

        async def write() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await store.write(transitions, drift, versions)

        self._store_write = asyncio.create_task(write())
