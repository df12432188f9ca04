"""Feeds the console's ``StatsHistory`` from ``monitoring.stats``.

A ``TopicFollower`` (no consumer group: each query replica keeps its own history) that
starts at the first record written in the last ``console.history_s`` seconds, folds to the
end, then follows. It runs in the background and never holds up the API's readiness:
until it has caught up the console says the history is still loading, and if the broker
fails it starts again.

Where the broker cannot look records up by time, the fold may start earlier (or at the
end); records older than the lookback are skipped by their ``emitted_at``, so the history
holds the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.topics import TopicName
from services.common.service import TopicFollower
from services.common.settings import Settings
from services.query.console.history import StatsHistory

log = logging.getLogger(__name__)

STATS_TOPIC: TopicName = "monitoring.stats"
FOLD_TIMEOUT_S = 600.0  # a day of a busy mesh's stats; it runs in the background anyway
RETRY_S = 2.0


class StatsFollower:
    def __init__(self, settings: Settings, history: StatsHistory, lookback_s: float) -> None:
        self.settings = settings
        self.history = history
        self.lookback_s = lookback_s
        self.unreadable = 0
        self.error: str | None = None
        self._since_ms = 0
        self._codec = codec("MonitoringStats")
        self._follower = self._new_follower()
        self._task: asyncio.Task[None] | None = None

    @property
    def caught_up(self) -> asyncio.Event:
        """Set once the history holds everything the topic had when it was first read."""
        return self._follower.ready

    def _new_follower(self) -> TopicFollower:
        return TopicFollower(
            self.settings,
            STATS_TOPIC,
            self._apply,
            what="console-stats",
            fold_timeout_s=FOLD_TIMEOUT_S,
            since_ms=self._lookback,
        )

    def _lookback(self) -> int:
        self._since_ms = int((time.time() - self.lookback_s) * 1000)
        return self._since_ms

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="console-stats")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._follower.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self._follower.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API goes on; the history starts again
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "console history: reading monitoring.stats failed; retrying",
                    extra={"error": self.error},
                )
                await self._follower.stop()
                self._follower = self._new_follower()
                await asyncio.sleep(RETRY_S)
                continue
            self.error = None
            log.info(
                "console history caught up with monitoring.stats",
                extra={"records": self.history.records, "series": self.history.series_count},
            )
            return  # the follower goes on following in its own task

    def _apply(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        if record.value is None:
            return False
        try:
            stats = self._codec.decode(record.value)
        except CodecError as exc:
            self.unreadable += 1
            log.warning(
                "console history: skipping an unreadable monitoring.stats record",
                extra={"partition": record.partition, "offset": record.offset, "error": str(exc)},
            )
            return False
        if stats["emitted_at"] < self._since_ms:
            return False
        return self.history.add(stats)
