"""Consumer lag of every consumer group, from committed offsets and true end offsets.

Committed offsets come from the admin client's ``list_consumer_group_offsets`` with the
partitions named explicitly (without them the embedded broker drops the connection,
docs/benchmarks/embedded-broker.md). End offsets are the high watermarks a fetch reports,
not ``end_offsets()`` (which some brokers answer with the first offset of the last batch
+ 1): the collector's own consumer seeks one record before that answer, fetches, and
reads ``highwater``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from scoremesh.contract.catalog import catalog
from services.common.kafka import ask_broker, client_options, make_consumer, start_with_retry
from services.common.settings import Settings
from services.monitor import metrics as m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lag:
    group: str
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


class LagCollector:
    def __init__(self, settings: Settings, topics: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.topics = list(topics or [settings.topic(name) for name in catalog()])
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._exported: set[tuple[str, str, str]] = set()
        self._exported_groups: set[tuple[str, str]] = set()

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(
            **client_options(self.settings), request_timeout_ms=30_000
        )
        await start_with_retry(self._admin.start, "lag-admin", self.settings)
        self._consumer = make_consumer(
            self.settings, group_id=None, max_partition_fetch_bytes=1, fetch_max_bytes=1
        )
        await start_with_retry(self._consumer.start, "lag-consumer", self.settings)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def groups(self) -> list[str]:
        assert self._admin is not None
        listed = await self._admin.list_consumer_groups()
        names = sorted({str(g[0]) for g in listed})
        prefix = self.settings.topic_prefix
        return [g for g in names if g.startswith(prefix)] if prefix else names

    async def partitions(self) -> list[TopicPartition]:
        assert self._consumer is not None
        cluster = await ask_broker(self._consumer._client, self.topics)
        out: list[TopicPartition] = []
        for topic in self.topics:
            for p in sorted(cluster.partitions_for_topic(topic) or ()):
                out.append(TopicPartition(topic, p))
        return out

    async def end_offsets(
        self, tps: Sequence[TopicPartition], timeout_s: float = 10.0
    ) -> dict[TopicPartition, int]:
        """True end offsets: fetch one record at (reported end - 1), read the high watermark."""
        consumer = self._consumer
        assert consumer is not None
        reported: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
        ends = {tp: 0 for tp in tps if reported.get(tp, 0) <= 0}
        probe = [tp for tp in tps if reported.get(tp, 0) > 0]
        if not probe:
            return ends
        consumer.assign(probe)
        before = {tp: consumer.last_poll_timestamp(tp) for tp in probe}
        for tp in probe:
            consumer.seek(tp, reported[tp] - 1)
        deadline = time.monotonic() + timeout_s
        waiting = set(probe)
        while waiting and time.monotonic() < deadline:
            await consumer.getmany(*waiting, timeout_ms=200)
            for tp in list(waiting):
                hw = consumer.highwater(tp)
                if hw is not None and consumer.last_poll_timestamp(tp) != before[tp]:
                    ends[tp] = hw
                    waiting.discard(tp)
        for tp in waiting:  # no fetch answered in time: the reported end is the best we have
            ends[tp] = reported[tp]
        return ends

    async def collect(self) -> list[Lag]:
        assert self._admin is not None
        tps = await self.partitions()
        if not tps:
            return []
        groups = await self.groups()
        ends = await self.end_offsets(tps)
        out: list[Lag] = []
        for group in groups:
            committed = await self._admin.list_consumer_group_offsets(group, partitions=tps)
            for tp, meta in committed.items():
                offset = getattr(meta, "offset", -1)
                if offset is None or offset < 0:
                    continue
                out.append(Lag(group, tp.topic, tp.partition, offset, ends.get(tp, offset)))
        return out

    def export(self, lags: Sequence[Lag]) -> None:
        seen: set[tuple[str, str, str]] = set()
        totals: dict[tuple[str, str], int] = {}
        for lag in lags:
            labels = (lag.group, lag.topic, str(lag.partition))
            m.CONSUMER_LAG.labels(*labels).set(lag.lag)
            seen.add(labels)
            totals[(lag.group, lag.topic)] = totals.get((lag.group, lag.topic), 0) + lag.lag
        for labels in self._exported - seen:
            with contextlib.suppress(KeyError):
                m.CONSUMER_LAG.remove(*labels)
        for key, total in totals.items():
            m.CONSUMER_GROUP_LAG.labels(*key).set(total)
        for key in self._exported_groups - set(totals):
            with contextlib.suppress(KeyError):
                m.CONSUMER_GROUP_LAG.remove(*key)
        self._exported = seen
        self._exported_groups = set(totals)

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                self.export(await self.collect())
            except (TimeoutError, KafkaError, OSError) as exc:
                m.LAG_SCRAPE_ERRORS.inc()
                log.warning("consumer lag collection failed", extra={"error": str(exc)})
            await asyncio.sleep(interval_s)
