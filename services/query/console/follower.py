"""Feeds the console's ``StatsHistory`` from ``monitoring.stats``.

Every partition is assigned (no consumer group: each query replica keeps its own history),
starting at the first record written in the last ``console_history_s`` seconds, then
followed. It runs beside the query API and never holds up its readiness: until it has
caught up, the console says the history is still loading.

Where the broker answers a time lookup with "none" (no record that new, or a broker that
cannot look up by time and says timestamp -1), the follower starts at the end of that
partition; records older than the lookback that are read anyway are skipped by their
``emitted_at``, so the history holds the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.topics import TopicName
from services.common.kafka import assign_all, make_consumer, start_with_retry, true_end_offsets
from services.common.settings import Settings
from services.query.console.history import StatsHistory

log = logging.getLogger(__name__)

STATS_TOPIC: TopicName = "monitoring.stats"


class StatsFollower:
    def __init__(self, settings: Settings, history: StatsHistory, lookback_s: float) -> None:
        self.settings = settings
        self.history = history
        self.lookback_s = lookback_s
        self.caught_up = asyncio.Event()
        self.unreadable = 0
        self.error: str | None = None
        self._codec = codec("MonitoringStats")
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._since_ms = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="console-stats-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API goes on; the history retries
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "console history: following monitoring.stats failed; retrying",
                    extra={"error": self.error},
                )
                if self._consumer is not None:
                    with contextlib.suppress(Exception):
                        await self._consumer.stop()
                    self._consumer = None
                await asyncio.sleep(2.0)

    async def _follow(self) -> None:
        consumer = self._consumer = make_consumer(self.settings, group_id=None)
        await start_with_retry(consumer.start, "console-stats", self.settings)
        tps = await assign_all(consumer, self.settings.topic(STATS_TOPIC))
        self._since_ms = int(time.time() * 1000 - self.lookback_s * 1000)
        ends = await self._seek_to_lookback(consumer, tps)
        self.error = None
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    self._apply(record)
            if not self.caught_up.is_set() and await _reached(consumer, tps, ends):
                self.caught_up.set()
                log.info(
                    "console history caught up with monitoring.stats",
                    extra={
                        "records": self.history.records,
                        "series": self.history.series_count,
                    },
                )

    async def _seek_to_lookback(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Position each partition at the lookback; returns the ends to catch up with."""
        ends = await true_end_offsets(consumer, tps)  # leaves every partition at its end
        try:
            found = await consumer.offsets_for_times({tp: self._since_ms for tp in tps})
        except KafkaError as exc:
            log.info(
                "time lookup refused; reading monitoring.stats from the beginning",
                extra={"error": str(exc)},
            )
            await consumer.seek_to_beginning(*tps)
            return ends
        for tp in tps:
            hit = found.get(tp)
            if hit is not None and hit.timestamp >= 0 and hit.offset < ends[tp]:
                consumer.seek(tp, hit.offset)
        return ends

    def _apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None:
            return
        try:
            stats = self._codec.decode(record.value)
        except CodecError as exc:
            self.unreadable += 1
            log.warning(
                "console history: skipping an unreadable monitoring.stats record",
                extra={"partition": record.partition, "offset": record.offset, "error": str(exc)},
            )
            return
        if stats["emitted_at"] < self._since_ms:
            return
        self.history.add(stats)


async def _reached(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], ends: dict[TopicPartition, int]
) -> bool:
    for tp in tps:
        if await consumer.position(tp) < ends[tp]:
            return False
    return True
