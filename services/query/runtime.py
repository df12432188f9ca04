"""Everything the query API serves from: models, rules, Kafka, Redis, the micro-batcher.

Registry folding and hot-loading are the scorer's own (``RegistryView`` + ``ModelHolder``),
scoring is ``score_events``; this class only wires them for request/response use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from scoremesh.contract.featurespec import RuleSet
from scoremesh.contract.records import DeploymentEvent, Event, Prediction
from scoremesh.contract.topics import TopicName
from services.common.alert_store import AlertReadModel
from services.common.commands import read_history
from services.common.kafka import ask_broker, make_producer, start_with_retry
from services.common.metrics import BATCH_SIZE, PREDICTION_LATENCY, PREDICTIONS, SCORING_ERRORS
from services.common.query_store import QueryStore
from services.common.registry_view import RegistryView
from services.common.serving.models import ModelHolder, Serving, ServingSet, serving_rule_set
from services.common.serving.scoring import ScoringError, score_events
from services.common.settings import ApiSettings, Settings
from services.query.batching import AdaptiveBatcher
from services.query.console.follower import StatsFollower
from services.query.console.history import StatsHistory
from services.query.sink import PUBLISH_REFUSED, PredictionSink

log = logging.getLogger(__name__)

PREDICTIONS_TOPIC: TopicName = "predictions"
SOURCE = "sync"

EventPredictions = list[Prediction]
"""Every variant's prediction for one event: the champion's first, then challengers'."""


@dataclass
class Readiness:
    ready: bool
    checks: dict[str, str] = field(default_factory=dict)


class Backlogged(Exception):
    """The predictions topic's backlog is full: refuse the request rather than drop it."""

    def __init__(self, inflight: int) -> None:
        super().__init__(f"{inflight} sync predictions are waiting for Kafka")
        self.inflight = inflight


class QueryRuntime:
    def __init__(self, settings: Settings, config: ApiSettings | None = None) -> None:
        self.settings = settings
        self.config = config or settings.api
        self.holder = ModelHolder(settings)
        self.view = RegistryView(settings, on_change=self.holder.on_registry)
        self.producer = make_producer(settings)
        self.store = QueryStore(settings) if settings.redis_url else None
        # Reads of the monitor's alert read model (its TTL and cap matter only to writes).
        self.alerts = (
            AlertReadModel(settings, ttl_s=1, recent=1, client=self.store.client)
            if self.store is not None
            else None
        )
        # The console's charts: monitoring.stats folded into memory (Redis has the latest
        # window only). Followed in the background; readiness never waits for it.
        console = settings.console
        self.stats_history = StatsHistory(console.history_points, console.history_series)
        self.stats_follower = (
            StatsFollower(settings, self.stats_history, console.history_s)
            if console.enabled
            else None
        )
        self.sink = PredictionSink(
            self.producer,
            settings.topic(PREDICTIONS_TOPIC),
            self.store,
            self.config.publish_max_inflight,
            linger_s=self.config.publish_linger_ms / 1000.0,
        )
        self._batchers: dict[str, AdaptiveBatcher[Event, EventPredictions]] = {}
        self.producer_started = False
        self._rules: dict[str, tuple[Serving, ServingSet | None, RuleSet | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._history: tuple[float, list[DeploymentEvent]] | None = None
        self._history_lock = asyncio.Lock()
        self._batch_size = BATCH_SIZE.labels("query")
        self._counters: dict[tuple[str, str, str], Any] = {}

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await start_with_retry(self.producer.start, "query-producer", self.settings)
        self.producer_started = True
        self.sink.start()
        self._tasks.append(asyncio.create_task(self.holder.run(), name="model-holder"))
        await self.view.start()
        if self.stats_follower is not None:
            self.stats_follower.start()
        if self.store is not None:
            await self.store.ping()
        log.info(
            "query runtime started",
            extra={
                "default_model": self.settings.model_name,
                "versions": len(self.view.state.versions),
            },
        )

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        await self.sink.drain(self.settings.shutdown_deadline_s / 2)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.view.stop()
        if self.stats_follower is not None:
            await self.stats_follower.stop()
        await self.producer.stop()  # also when never started (a port taken first): no leak
        self.producer_started = False
        if self.store is not None:
            await self.store.close()

    # --- predictions -----------------------------------------------------------------
    def rules(self, model: str) -> tuple[ServingSet | None, RuleSet | None]:
        """A model's serving set and the rule set for exactly its versions (cached per
        snapshot); (None, None) while the model has no loaded champion."""
        serving = self.holder.current
        cached = self._rules.get(model)
        if cached is None or cached[0] is not serving:
            serving_set = serving.of(model)
            rules = serving_rule_set(serving_set, self.view.state) if serving_set else None
            cached = self._rules[model] = (serving, serving_set, rules)
        return cached[1], cached[2]

    def batcher(self, model: str) -> AdaptiveBatcher[Event, EventPredictions]:
        """Each model's requests are micro-batched together: one ONNX call per batch."""
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = self._batchers[model] = AdaptiveBatcher(
                lambda events, first_at: self._score(model, events, first_at),
                max_size=self.config.batch_max_size,
                max_wait_s=self.config.batch_max_wait_ms / 1000.0,
                on_batch=self._on_batch,
            )
        return batcher

    def _score(self, model: str, events: list[Event], first_at: float) -> list[EventPredictions]:
        """One ``score_events`` call for a micro-batch; published once, split per event."""
        serving = self.holder.current.of(model)  # one snapshot per batch, as in the scorer
        if serving is None:
            raise ScoringError(f"model {model!r} has no loaded champion any more")
        try:
            result = score_events(serving, events, SOURCE, first_at)
        except ScoringError:
            if serving.champion is not None:
                version = serving.champion.version
                SCORING_ERRORS.labels(version.name, version.version).inc()
            raise
        predictions = result.predictions
        for key, error in result.challenger_errors.items():
            log.warning("challenger failed on a sync batch", extra={"version": key, "error": error})
        self.sink.publish(predictions)
        n = len(events)
        blocks = len(predictions) // n
        counts: dict[tuple[str, str, str], int] = {}
        for b in range(blocks):
            head = predictions[b * n]
            ident = (head["model"], head["model_version"], head["variant"])
            counts[ident] = counts.get(ident, 0) + n
        for ident, count in counts.items():
            self._count(ident, count, predictions[0]["latency_ms"] / 1000.0)
        return [[predictions[b * n + i] for b in range(blocks)] for i in range(n)]

    def _count(self, ident: tuple[str, str, str], n: int, latency_s: float) -> None:
        children = self._counters.get(ident)
        if children is None:
            model, version, variant = ident
            children = self._counters[ident] = (
                PREDICTIONS.labels(model, version, variant, SOURCE),
                PREDICTION_LATENCY.labels(model, version, variant),
            )
        children[0].inc(n)
        children[1].observe(latency_s)

    def _on_batch(self, items: int, submissions: int) -> None:
        self._batch_size.observe(items)

    async def predict(self, model: str, events: list[Event]) -> list[EventPredictions]:
        """Every variant's prediction per event; ``Backlogged`` when the predictions topic
        cannot take more (backpressure: nothing is scored that could not be published)."""
        if not self.sink.has_room() and not await self.sink.wait_for_room(
            self.config.publish_wait_ms / 1000.0
        ):
            PUBLISH_REFUSED.inc()
            raise Backlogged(self.sink.inflight)
        return await self.batcher(model).submit(events)

    # --- registry history ------------------------------------------------------------
    async def history(self) -> list[DeploymentEvent]:
        """deployments.log, read at most once per ``history_cache_s``."""
        ttl = self.config.history_cache_s
        cached = self._history
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        async with self._history_lock:
            cached = self._history
            if cached is not None and time.monotonic() - cached[0] < ttl:
                return cached[1]
            events = await read_history(self.settings)
            self._history = (time.monotonic(), events)
            return events

    def forget_history(self) -> None:
        self._history = None

    # --- health ----------------------------------------------------------------------
    def quick_checks(self) -> dict[str, tuple[bool, str]]:
        """Checks that need no I/O (the health port polls these)."""
        serving = self.holder.current
        checks = {
            "registry": (self.view.ready.is_set(), "models.registry folded"),
            "model": (
                bool(serving.serving_models),
                ",".join(serving.keys) or "no champion loaded",
            ),
            "kafka": (
                self.producer_started and self.sink.kafka_ok,
                "producer started, last send acknowledged"
                if self.producer_started and self.sink.kafka_ok
                else "producer not started or the last send failed",
            ),
        }
        if self.store is None:
            checks["redis"] = (False, "no Redis configured (SCOREMESH_REDIS_URL)")
        else:
            checks["redis"] = (self.store.healthy, "query store reachable")
        return checks

    async def readiness(self) -> Readiness:
        checks = self.quick_checks()
        if self.producer_started:
            # Ask the broker itself: with no traffic a lost broker shows in no send, and a
            # not-ready pod gets no traffic to retry a failed one with.
            try:
                await asyncio.wait_for(ask_broker(self.producer.client), 1.0)
            except (TimeoutError, KafkaError, OSError) as exc:
                checks["kafka"] = (False, f"broker does not answer ({exc!r})")
            else:
                failed = "" if self.sink.kafka_ok else " (the last send had failed)"
                checks["kafka"] = (True, "broker answers" + failed)
        if self.store is not None:
            try:
                ok = await asyncio.wait_for(self.store.ping(), 1.0)
            except (TimeoutError, RedisError, OSError):
                ok = False
            checks["redis"] = (ok, "PING answered" if ok else "PING failed")
        ready = all(ok for ok, _ in checks.values())
        return Readiness(
            ready, {k: ("ok: " if ok else "not ready: ") + d for k, (ok, d) in checks.items()}
        )
