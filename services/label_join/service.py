"""label-join: predictions ⋈ labels -> predictions.labeled, training.examples, labels.unmatched,
and performance per version x variant x segment -> monitoring.stats, Redis, Prometheus.

Runtime (docs/adr/0006-label-join-state.md): the shared aiokafka batch loop over both
co-partitioned topics (range assignment, so partition p of each comes to the same owner),
the join state in memory per partition, and its own compacted changelog topic
(``label-join.changelog``, keyed by event_id, written to the input's partition number).
A third input, ``label-join.repartition``, brings the labels and predictions a producer put
on another partition than their event_id's (services/label_join/repartition.py, ADR 0019).

Per batch: join (pure) -> send every output and wait for the acknowledgements -> write the
changelog records of the events it changed and wait -> commit the input offsets. So the
changelog never says "joined" for a row whose output is not on the broker, and a crash at
any point replays the batch against a state that makes the replay idempotent. Metrics are
sums derived from the state, so a replay never counts twice; outputs are at-least-once,
deduplicated downstream by (event_id, variant) and for examples by event_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from redis.exceptions import RedisError

from scoremesh.contract.catalog import TopicSpec, catalog
from scoremesh.contract.codec import codec
from scoremesh.contract.topics import TopicName
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import (
    enqueue_records,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
    true_end_offsets,
)
from services.common.metrics import EVENTS_OUT
from services.common.performance import (
    GroupStats,
    latest_stats_key,
    merge_all,
    stats_index_key,
)
from services.common.redis_client import connect
from services.common.registry_view import RegistryState, RegistryView
from services.common.settings import ConfigError, Settings
from services.label_join import telemetry
from services.label_join.disk_store import DiskStore, DiskStoreConfig, DiskStores
from services.label_join.join import (
    GroupKey,
    JoinConfig,
    JoinCore,
    OutputTopics,
    VersionCatalog,
)
from services.label_join.repartition import Repartitioner
from services.label_join.store import JoinStore

log = logging.getLogger(__name__)

PREDICTIONS: TopicName = "predictions"
LABELS: TopicName = "labels"
LABELED: TopicName = "predictions.labeled"
EXAMPLES: TopicName = "training.examples"
UNMATCHED: TopicName = "labels.unmatched"
STATS: TopicName = "monitoring.stats"
CHANGELOG: TopicName = "label-join.changelog"
REPARTITION: TopicName = "label-join.repartition"

# Prometheus gets the headline metrics, never the per-feature bins (label cardinality).
GAUGE_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "log_loss",
    "brier",
    "coverage",
    "labeled",
    "predicted",
    "expired_unlabeled",
    "label_delay_p50_ms",
    "label_delay_p90_ms",
    "label_delay_p99_ms",
)


def changelog_spec() -> TopicSpec:
    """The changelog's catalog entry; until schemas/topics.yaml declares it, the same values."""
    try:
        return catalog()[CHANGELOG]
    except KeyError:
        predictions = catalog()[PREDICTIONS]
        return TopicSpec(
            name=CHANGELOG,
            key="event_id",
            value="LabelJoinState",
            partitions=predictions.partitions,
            retention_ms=-1,
            cleanup_policy="compact",
            max_message_bytes=1048576,
            replication_factor=3,
            min_insync_replicas=2,
            doc="label-join state: one record per event (JSON line + Avro fields), compacted",
            value_formats=("json",),
        )


# --- the batch loop over the co-partitioned inputs ----------------------------------------


class _StateListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: LabelJoinService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.service.on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.service.loop.assigned = list(assigned)
        await self.service.on_assigned({tp.partition for tp in assigned})


class JoinLoop(BatchLoop):
    """The shared loop, subscribed with range assignment and a state-restoring listener, and
    pipelined: while batches' outputs, changelog and commit wait for the broker, the next
    batch is already being joined.

    Per batch the order of ADR 0006 holds: outputs acknowledged -> changelog acknowledged ->
    offsets committed; batches finish in the order they were fetched (BatchLoop), so
    changelog records of one key never overtake each other and a commit never covers a
    batch that is not complete. At most ``DEPTH`` batches are in flight; a failure fails
    every later batch too, and the loop stops with the error.
    """

    DEPTH = 4

    def __init__(self, service: LabelJoinService, *args: Any) -> None:
        super().__init__(
            *args,
            pipeline_depth=self.DEPTH,
            max_records=service.settings.label_join.batch_max_records,
        )
        self._listener = _StateListener(service)
        self._service = service

    def consumer_options(self) -> dict[str, Any]:
        return {"partition_assignment_strategy": (RangePartitionAssignor,)}  # co-partitioning

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return self._listener

    async def _send(self, outs: list[Out]) -> Awaitable[object]:
        """The join queued its outputs and then its changelog itself (the order ADR 0006
        needs); the batch is complete when both are acknowledged."""
        assert not outs, "the join sends its own outputs"
        return self._service.take_durable()


# --- where partitions' statistics meet ----------------------------------------------------


class ShardStore:
    """Per-partition statistics of each (group, window), merged across partitions.

    In memory always; with Redis also there, so every process (each owning some partitions)
    publishes stats merged over all partitions, and a window closed by one partition keeps
    its final numbers after a restart.
    """

    def __init__(self, settings: Settings, config: JoinConfig, client: aioredis.Redis | None):
        self.prefix = settings.redis_key_prefix
        self.config = config
        self.client = client
        self.memory: dict[tuple[tuple[str, str, str, str], int], dict[int, GroupStats]] = {}
        self.ttl_s = max(
            1, (config.window_ms + config.grace_ms + config.sliding_ms + config.tumbling_ms) // 1000
        )
        self.healthy = client is not None

    def shard_key(self, group: tuple[str, str, str, str], start: int) -> str:
        model, version, variant, segment = group
        return f"{self.prefix}monitor:{model}:shard:{version}:{variant}:{segment}:{start}"

    def latest_key(self, group: tuple[str, str, str, str]) -> str:
        return latest_stats_key(self.prefix, *group)

    async def put(self, shards: dict[tuple[GroupKey, int], GroupStats]) -> None:
        for (key, partition), stats in shards.items():
            self.memory.setdefault((key[:4], key[4]), {})[partition] = stats
        if self.client is None:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for (key, partition), stats in shards.items():
                    name = self.shard_key(key[:4], key[4])
                    pipe.hset(name, str(partition), stats.to_json())
                    pipe.expire(name, self.ttl_s)
                await pipe.execute()
            self.healthy = True
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def get(
        self, wanted: Sequence[tuple[tuple[str, str, str, str], int]]
    ) -> dict[tuple[tuple[str, str, str, str], int], list[GroupStats]]:
        if self.client is not None:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for group, start in wanted:
                        pipe.hgetall(self.shard_key(group, start))
                    answers = await pipe.execute()
                self.healthy = True
                return {
                    w: [GroupStats.from_json(v) for v in answer.values()]
                    for w, answer in zip(wanted, answers, strict=True)
                }
            except (RedisError, OSError) as exc:
                self._failed(exc)
        return {w: list(self.memory.get(w, {}).values()) for w in wanted}

    async def put_latest(self, records: list[dict[str, Any]]) -> None:
        if self.client is None or not records:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for r in records:
                    group = (r["model"], r["model_version"], r["variant"], r["segment"])
                    name = self.latest_key(group)
                    pipe.hset(name, r["window_kind"], orjson.dumps(r))
                    pipe.expire(name, self.ttl_s)
                    index = stats_index_key(self.prefix, r["model"])
                    pipe.sadd(index, f"{r['model_version']}:{r['variant']}:{r['segment']}")
                    pipe.expire(index, self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    def forget_before(self, start: int) -> None:
        for key in [k for k in self.memory if k[1] < start]:
            del self.memory[key]

    def _failed(self, exc: Exception) -> None:
        if self.healthy:
            log.warning(
                "Redis stats write/read failed; merging in memory", extra={"error": str(exc)}
            )
        self.healthy = False
        telemetry.STATS_PUBLISH_FAILURES.labels("redis").inc()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


# --- the service ---------------------------------------------------------------------------


class LabelJoinService:
    name = "label-join"
    # Its heap grows with the join state (several container objects per pending event), and
    # CPython's default (700, 10, 10) collects the young generation every ~25 predictions and
    # the whole heap often: 4-5 us of a prediction's ~40 us of join logic. Here a young
    # collection scans up to 50k objects (a few ms) and a middle one up to 1M (tens of ms,
    # every ~20 young ones): pauses a batch loop whose labels are minutes old can afford. The
    # state has no reference cycles (refcounts free it); cyclic garbage just waits longer.
    gc_thresholds = (50_000, 20, 100)

    def __init__(
        self,
        settings: Settings,
        config: JoinConfig | None = None,
        publish_interval_s: float | None = None,
        redis_client: aioredis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or JoinConfig.from_settings(settings)
        self.publish_interval_s = (
            publish_interval_s
            if publish_interval_s is not None
            else settings.label_join.publish_interval_s
        )
        self.catalog = VersionCatalog(settings.model_name)
        self.core = JoinCore(
            self.config,
            self.catalog,
            OutputTopics(
                labeled=settings.topic(LABELED),
                examples=settings.topic(EXAMPLES),
                unmatched=settings.topic(UNMATCHED),
            ),
        )
        self.view = RegistryView(settings, on_change=self._on_registry)
        self.producer = make_producer(settings)
        self.loop = JoinLoop(
            self,
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-label-join",
            [settings.topic(name) for name in (PREDICTIONS, LABELS, REPARTITION)],
            self.producer,
            self._process,
        )
        # the join's own partitioning (ADR 0019); the partition count is checked at start
        self.repartition = Repartitioner(
            settings.topic(PREDICTIONS),
            settings.topic(LABELS),
            settings.topic(REPARTITION),
            catalog()[PREDICTIONS].partitions,
        )
        if redis_client is None and settings.redis_url:
            redis_client = connect(settings)
        self.shards = ShardStore(settings, self.config, redis_client)
        lj = settings.label_join
        self.stores = (
            DiskStores(
                DiskStoreConfig(
                    lj.data_dir,
                    cache_bytes=lj.store_cache_mb << 20,
                    write_buffer_bytes=lj.store_write_buffer_mb << 20,
                )
            )
            if lj.store == "disk"
            else None
        )
        self._predictions = settings.topic(PREDICTIONS)
        self._changelog = settings.topic(CHANGELOG)
        self._stats_topic = settings.topic(STATS)
        self._stats_codec = codec("MonitoringStats")
        self._lock = asyncio.Lock()
        self._restorer: AIOKafkaConsumer | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._latest_tumbling: dict[tuple[str, str, str, str], int] = {}
        self._durable: asyncio.Future[None] | None = None  # the last batch's outputs + changelog
        self.restored_partitions: set[int] = set()
        self.changelog_read: dict[int, int] = {}  # per partition: records its restore read
        self.published = 0  # MonitoringStats records sent

    # --- lifecycle ------------------------------------------------------------------------

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        self.loop.add_checks(health)
        health.add_check(
            "state",
            lambda: (
                {tp.partition for tp in self.loop.assigned} <= self.restored_partitions,
                f"{len(self.restored_partitions)} partition(s) restored, "
                f"{self.core.pending_entries} entries",
            ),
        )
        if self.shards.client is not None:
            health.add_check("redis", lambda: (self.shards.healthy, "monitor stats store"))

    async def start(self) -> None:
        await start_with_retry(self.producer.start, "label-join-producer", self.settings)
        self._restorer = make_consumer(self.settings, group_id=None)
        await start_with_retry(self._restorer.start, "label-join-restorer", self.settings)
        await self._check_topics(self._restorer)
        await self.view.start()

    async def _check_topics(self, consumer: AIOKafkaConsumer) -> None:
        """Co-partitioning is what makes the join local: refuse to start without it."""
        await consumer.topics()
        counts = {
            name: len(consumer.partitions_for_topic(self.settings.topic(name)) or ())
            for name in (PREDICTIONS, LABELS, REPARTITION, CHANGELOG)
        }
        missing = [name for name, n in counts.items() if n == 0]
        if missing:
            raise ConfigError(
                f"label-join needs topics {', '.join(self.settings.topic(m) for m in missing)}; "
                "create them with `scoremesh dev up` (or from schemas/topics.yaml)"
            )
        if len(set(counts.values())) != 1:
            raise ConfigError(
                f"predictions, labels, {REPARTITION} and {CHANGELOG} must have the same "
                f"partition count (co-partitioned by event_id), found {counts}"
            )
        self.repartition.partitions = counts[PREDICTIONS]
        # An output keyed by event_id goes where murmur2 would put it anyway when its topic
        # has the inputs' partition count: the state's partition, without hashing the key.
        outputs = [self.settings.topic(name) for name in (LABELED, EXAMPLES, UNMATCHED)]
        self.core.keep_partitions(
            topic
            for topic in outputs
            if len(consumer.partitions_for_topic(topic) or ()) == counts[PREDICTIONS]
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.loop.start(stop)
        self._publisher = asyncio.create_task(self._publish_forever(stop), name="stats-publisher")
        await self.loop.run(stop)

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        await self.loop.stop()
        with contextlib.suppress(Exception):
            await self.publish()  # the last batches' stats
        for partition in list(self.core.partitions):
            self.core.drop(partition)  # a disk store closes, as of its last checkpoint
        await self.view.stop()
        if self._restorer is not None:
            await self._restorer.stop()
        await self.producer.stop()
        await self.shards.close()

    def _on_registry(self, state: RegistryState) -> None:
        self.catalog.update(state)

    # --- partitions: the state follows them -----------------------------------------------

    async def on_revoked(self, partitions: set[int]) -> None:
        log.info("partitions revoked: join state dropped", extra={"partitions": sorted(partitions)})
        async with self._lock:
            await self._settle()
            for p in partitions:
                self.core.drop(p)
                self.restored_partitions.discard(p)
            telemetry.JOIN_STATE_ENTRIES.set(self.core.pending_entries)

    async def on_assigned(self, partitions: set[int]) -> None:
        async with self._lock:
            await self._settle()
            for p in set(self.core.partitions) - partitions:
                self.core.drop(p)
                self.restored_partitions.discard(p)
            for p in sorted(partitions - set(self.core.partitions)):
                await self._restore(p)
            self.core.mark_all_dirty()
            telemetry.JOIN_STATE_ENTRIES.set(self.core.pending_entries)

    async def _settle(self) -> None:
        """Every joined batch's changelog on the broker and its offsets committed, so a
        partition's state is restored from a changelog that holds everything joined."""
        if self._durable is not None:
            try:
                await asyncio.shield(self._durable)
            except Exception as exc:  # nothing after it commits: it is replayed
                log.warning("a batch's sends failed", extra={"error": repr(exc)})
        await self.loop.settle()

    async def _restore(self, partition: int) -> None:
        assert self._restorer is not None, "start() first"
        if self.stores is not None:
            await self._restore_on_disk(partition)
            return
        started = time.perf_counter()
        tp = TopicPartition(self._changelog, partition)
        self._restorer.assign([tp])
        await self._restorer.seek_to_beginning(tp)
        records: list[tuple[bytes, bytes | None]] = []

        def keep(record: ConsumerRecord[bytes, bytes]) -> None:
            if record.key is not None:
                records.append((record.key, record.value))

        await read_to_end(self._restorer, [tp], keep, timeout_s=600)
        self._restorer.assign([])
        ps = self.core.restore(partition, records)
        self.restored_partitions.add(partition)
        elapsed = time.perf_counter() - started
        telemetry.JOIN_RESTORE_SECONDS.set(elapsed)
        log.info(
            "join state restored",
            extra={
                "partition": partition,
                "changelog_records": len(records),
                "entries": len(ps.entries),
                "seconds": round(elapsed, 3),
            },
        )

    async def _restore_on_disk(self, partition: int) -> None:
        """The partition's disk store as of its checkpoint, brought forward by the
        changelog from there: nothing to read after a clean stop, the tail after a crash or
        after another owner had the partition, everything on a new disk. A store the
        changelog cannot bring forward (no checkpoint, the changelog shorter than it or
        compacted past it, too old for the tombstones it may have missed) starts over."""
        assert self._restorer is not None and self.stores is not None
        started = time.perf_counter()
        store = self.stores.open(self._changelog, partition, self.core.load_entry)
        tp = TopicPartition(self._changelog, partition)
        self._restorer.assign([tp])
        begin = (await self._restorer.beginning_offsets([tp]))[tp]
        end = (await true_end_offsets(self._restorer, [tp]))[tp]
        reason = _rebuild_reason(store, begin, end, self.settings.label_join.store_max_stale_s)
        if reason is None:
            reason = await self._foreign_changelog(tp, store, begin, end)
        if reason is not None:
            log.warning(
                "join store rebuilt from the changelog",
                extra={"partition": partition, "reason": reason, "path": str(store.path)},
            )
            store.wipe()
        empty = store.offset is None
        tail: tuple[int, bytes | None] = (-1, None)  # the last changelog record read
        resumed_at = store.offset if store.offset is not None else begin
        ps = self.core.attach(store)
        replayed = 0
        if resumed_at < end:
            self._restorer.seek(tp, resumed_at)
            deadline = time.monotonic() + 600
            chunk: list[tuple[bytes, bytes | None]] = []
            position = resumed_at
            while position < end:
                fetched = await self._restorer.getmany(tp, timeout_ms=200)
                for record in fetched.get(tp, ()):
                    replayed += 1
                    tail = (record.offset, record.key)
                    if record.key is not None:
                        chunk.append((record.key, record.value))
                position = await self._restorer.position(tp)
                if len(chunk) >= 20_000 or (position >= end and chunk):
                    last_key = tail[1] if tail[0] == position - 1 else None
                    if empty:  # written as they are, indexed once at the end
                        store.load_raw(chunk, position, last_key)
                    else:  # each replaces what the store holds of its event
                        store.checkpoint(self.core.apply(ps, chunk), position, last_key)
                    chunk = []
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {tp.topic}[{partition}] to {end} in 600s")
            if empty:
                store.rebuild(self.core, ps)
        known = store.last if store.last is not None and store.last[0] == end - 1 else None
        store.checkpoint(self.core.finish_restore(ps), end, known[1] if known else None)
        self._restorer.assign([])
        self.restored_partitions.add(partition)
        self.changelog_read[partition] = replayed
        elapsed = time.perf_counter() - started
        telemetry.JOIN_RESTORE_SECONDS.set(elapsed)
        log.info(
            "join state restored",
            extra={
                "partition": partition,
                "store": "disk",
                "changelog_from": resumed_at,
                "changelog_end": end,
                "changelog_records": replayed,
                "entries": len(store),
                "seconds": round(elapsed, 3),
            },
        )

    async def _foreign_changelog(
        self, tp: TopicPartition, store: DiskStore, begin: int, end: int
    ) -> str | None:
        """Why the changelog is not the one the store was checkpointed against, or None: a
        changelog deleted and recreated since, and written past the checkpoint, has another
        record where the store's last covered one was. (Compacted away: not checked.)"""
        if store.last is None or not begin <= store.last[0] < end:
            return None
        assert self._restorer is not None
        offset, key = store.last
        self._restorer.seek(tp, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fetched = await self._restorer.getmany(tp, timeout_ms=200, max_records=1)
            for record in fetched.get(tp, ()):
                if record.offset < offset:  # the head of a record batch
                    continue
                if record.offset == offset and record.key != key:
                    return (
                        f"the changelog's record at {offset} is not the last one the store's "
                        "checkpoint covers (the topic was recreated?)"
                    )
                return None
        return None

    # --- one batch ------------------------------------------------------------------------

    async def _process(self, records: list[Record]) -> list[Out]:
        """Join a batch and queue its sends; ``take_durable()`` then says when they are on
        the broker in the order ADR 0006 needs (outputs, then the changelog)."""
        async with self._lock:
            # records on another partition than their event_id's go to it (ADR 0019); the
            # batch's commit waits for the forwards' acknowledgements like its outputs'
            routed = self.repartition.route(records)
            forwarded = await self.repartition.forward(self.producer, routed.forwards, self.name)
            result = self.core.process(routed.predictions, routed.labels)
            acks, _ = await enqueue_records(
                self.producer,
                ((o.topic, o.partition, o.key, o.value) for o in result.outputs),
                close_batches=True,
            )
            per_topic: dict[str, int] = {}
            for o in result.outputs:
                per_topic[o.topic] = per_topic.get(o.topic, 0) + 1
            for topic, n in per_topic.items():
                EVENTS_OUT.labels(self.name, topic).inc(n)
            stores = {p: self.core.partitions[p].store for p in result.sealed}
            sealed = [(stores[p], n) for p, n in result.sealed.items() if stores[p].durable]
            self._durable = asyncio.ensure_future(
                self._write_changelog(self._durable, forwarded + acks, result.changelog, sealed)
            )
            telemetry.JOIN_STATE_ENTRIES.set(self.core.pending_entries)
        return []

    def take_durable(self) -> asyncio.Future[None]:
        """The last processed batch's outputs and changelog, acknowledged (a future)."""
        if self._durable is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._durable

    async def _write_changelog(
        self,
        previous: asyncio.Future[None] | None,
        acks: list[asyncio.Future[Any]],
        changelog: list[tuple[int, bytes, bytes | None]],
        sealed: list[tuple[JoinStore, int]],
    ) -> None:
        # 1. this batch's outputs acknowledged, and the batches before it complete, ...
        if acks:
            await asyncio.gather(*acks)
        if previous is not None:
            await asyncio.shield(previous)
        # 2. ... before the state that says they were sent; the loop commits after this.
        if changelog:
            futures, n = await enqueue_records(
                self.producer,
                ((self._changelog, partition, key, value) for partition, key, value in changelog),
                close_batches=True,
            )
            acked = await asyncio.gather(*futures)
            EVENTS_OUT.labels(self.name, self._changelog).inc(n)
        else:
            acked = []
        # 3. disk stores keep the batch, with the changelog offset that covers it
        if sealed:
            _checkpoint(sealed, changelog, acked)

    # --- statistics -----------------------------------------------------------------------

    async def _publish_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.publish_interval_s)
            try:
                await self.publish()
            except Exception:  # the join goes on; the next tick publishes again
                log.exception("publishing monitoring stats failed")
                telemetry.STATS_PUBLISH_FAILURES.labels("kafka").inc()
                self.core.mark_all_dirty()

    async def publish(self) -> int:
        """Publish the windows whose statistics changed; returns the records sent."""
        shards, newest = self.core.take_dirty()
        if not shards:
            return 0
        cfg = self.config
        await self.shards.put(shards)
        tumbling = sorted({(key[:4], key[4]) for key, _ in shards})
        groups = sorted({group for group, _ in tumbling})
        wanted: set[tuple[tuple[str, str, str, str], int]] = set(tumbling)
        sliding_end = cfg.bucket(newest) + cfg.tumbling_ms if newest is not None else None
        sliding_starts: list[int] = []
        if sliding_end is not None:
            first = sliding_end - cfg.sliding_ms
            sliding_starts = list(range(first, sliding_end, cfg.tumbling_ms))
            wanted.update((g, s) for g in groups for s in sliding_starts)
        found = await self.shards.get(sorted(wanted))
        now_ms = int(time.time() * 1000)
        records: list[dict[str, Any]] = []
        for group, start in tumbling:
            merged = merge_all(found.get((group, start), []))
            if merged is not None:
                records.append(
                    _stats_record(group, "tumbling", start, start + cfg.tumbling_ms, merged, now_ms)
                )
        if sliding_end is not None:
            for group in groups:
                merged = merge_all(
                    s for start in sliding_starts for s in found.get((group, start), [])
                )
                if merged is not None:
                    records.append(
                        _stats_record(
                            group,
                            "sliding",
                            sliding_end - cfg.sliding_ms,
                            sliding_end,
                            merged,
                            now_ms,
                        )
                    )
        futures = [
            await self.producer.send(
                self._stats_topic, self._stats_codec.encode(r), key=r["model"].encode()
            )
            for r in records
        ]
        if futures:
            await asyncio.gather(*futures)
        EVENTS_OUT.labels(self.name, self._stats_topic).inc(len(records))
        latest = [r for r in records if r["window_kind"] == "sliding"]
        for r in records:
            if r["window_kind"] != "tumbling":
                continue
            group = (r["model"], r["model_version"], r["variant"], r["segment"])
            if r["window_start"] >= self._latest_tumbling.get(group, r["window_start"]):
                self._latest_tumbling[group] = r["window_start"]
                latest.append(r)
        await self.shards.put_latest(latest)
        for r in records:
            if r["window_kind"] == "sliding":
                for metric in GAUGE_METRICS:
                    if metric in r["metrics"]:
                        telemetry.PERFORMANCE.labels(
                            r["model"], r["model_version"], r["variant"], r["segment"], metric
                        ).set(r["metrics"][metric])
        if newest is not None:
            self.shards.forget_before(
                newest - cfg.window_ms - cfg.grace_ms - cfg.sliding_ms - cfg.tumbling_ms
            )
        self.published += len(records)
        return len(records)


def _rebuild_reason(store: DiskStore, begin: int, end: int, max_stale_s: float) -> str | None:
    """Why a disk store cannot be brought forward by the changelog [begin, end), or None."""
    if store.rebuilding:
        return "a restore onto it was interrupted"
    if store.offset is None:
        return "no checkpoint" if len(store) or store.stats else None
    if store.offset > end:
        return f"checkpoint {store.offset} is past the changelog's end {end} (recreated?)"
    if store.offset < begin:
        return f"the changelog starts at {begin}, after the checkpoint {store.offset}"
    if store.saved_at is not None and time.time() * 1000 - store.saved_at > max_stale_s * 1000:
        return f"last checkpointed more than {max_stale_s:g}s ago (store_max_stale_s)"
    return None


def _checkpoint(
    sealed: list[tuple[JoinStore, int]],
    changelog: list[tuple[int, bytes, bytes | None]],
    acked: list[Any],
) -> None:
    """Each store's batch with the changelog offset after its records there: the first
    acknowledged offset of the partition plus the number of records sent to it (lower than
    that only if another producer wrote in between, and a lower checkpoint replays a few
    records more, which changes nothing)."""
    first: dict[int, int] = {}
    for meta in acked:
        first[meta.partition] = min(first.get(meta.partition, meta.offset), meta.offset)
    sent: dict[int, int] = {}
    last_key: dict[int, bytes] = {}
    for partition, key, _ in changelog:
        sent[partition] = sent.get(partition, 0) + 1
        last_key[partition] = key
    for store, number in sealed:
        partition = store.partition
        if partition in first:  # the key of the record before the offset, if ours alone
            store.checkpoint(number, first[partition] + sent[partition], last_key[partition])
        else:
            store.checkpoint(number, None)


def _stats_record(
    group: tuple[str, str, str, str],
    kind: str,
    start: int,
    end: int,
    stats: GroupStats,
    now_ms: int,
) -> dict[str, Any]:
    model, version, variant, segment = group
    return {
        "model": model,
        "model_version": version,
        "variant": variant,
        "segment": segment,
        "window_kind": kind,
        "window_start": start,
        "window_end": end,
        "count": stats.labeled,
        "metrics": stats.metrics(),
        "emitted_at": now_ms,
    }
