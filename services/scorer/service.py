"""scorer: events.valid -> predictions (+ Redis), one ONNX call per model per batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from aiokafka.errors import KafkaError

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.featurespec import Violation
from scoremesh.contract.topics import TopicName
from services.common.batchloop import BatchLoop, Out, Record
from services.common.commands import new_command, send_command
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.metrics import PREDICTION_LATENCY, PREDICTIONS, REJECTED, SCORING_ERRORS
from services.common.model_version import ModelVersion
from services.common.query_store import QueryStore
from services.common.registry_view import RegistryView
from services.common.rejections import rejection_record
from services.common.service import StreamService, enter_client, in_background, on_exit
from services.common.serving.models import ModelHolder, ServingSet
from services.common.serving.scoring import BatchResult, ScoringError, score_events
from services.common.settings import Settings
from services.scorer.canary_guard import CanaryGuard

log = logging.getLogger(__name__)

SOURCE: TopicName = "events.valid"
PREDICTIONS_TOPIC: TopicName = "predictions"
REJECTED_TOPIC: TopicName = "events.rejected"


class ScorerService(StreamService):
    """Consumes events.valid (and the registry, for models); core ``score_events``;
    produces predictions, the query store and load-failure/canary commands."""

    name = "scorer"

    def __init__(self, settings: Settings, store: QueryStore | None = None) -> None:
        super().__init__(settings)
        self.holder = ModelHolder(settings, on_load_failure=self._report_load_failure)
        self.guard = CanaryGuard(
            settings.canary.min_events,
            settings.canary.max_error_rate_delta,
            settings.canary.max_latency_ratio,
            settings.canary.min_batches,
        )
        self.view = RegistryView(settings, on_change=self.holder.on_registry)
        self.producer = make_producer(settings)
        self.store = (
            store if store is not None else (QueryStore(settings) if settings.redis_url else None)
        )
        self.loop = BatchLoop(
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-scorer",
            [settings.topic(SOURCE)],
            self.producer,
            self._process,
            pipeline_depth=settings.batch_pipeline_depth,
        )
        self._event_codec = codec("Event")
        self._prediction_codec = codec("Prediction")
        self._rejection_codec = codec("Rejection")
        self._predictions = settings.topic(PREDICTIONS_TOPIC)
        self._rejected = settings.topic(REJECTED_TOPIC)
        self._store_write: asyncio.Task[int] | None = None

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        health.add_check(
            "model",
            lambda: (
                self.holder.current.champion is not None,
                ",".join(self.holder.current.keys)
                or f"no champion of {self.settings.model_name!r} loaded",
            ),
        )
        self.loop.add_checks(health)
        if self.store is not None:
            store = self.store
            health.add_check("redis", lambda: (store.healthy, "query store writable"))

    async def setup(self, stack: AsyncExitStack) -> None:
        await enter_client(stack, self.producer, "scorer-producer", self.settings)
        if self.store is not None:
            on_exit(stack, self.store.close)
        on_exit(stack, self._settle_store_write)
        in_background(stack, self.holder.run(), "model-holder")
        await self.view.start()
        on_exit(stack, self.view.stop)
        on_exit(stack, self.loop.stop)  # first out: finishes the batches in flight
        if self.store is not None:
            await self.store.ping()

    async def _settle_store_write(self) -> None:
        if self._store_write is not None:
            with contextlib.suppress(Exception):
                await self._store_write

    async def run(self, stop: asyncio.Event) -> None:
        while self.holder.current.champion is None and not stop.is_set():
            log.warning(
                "no champion loaded yet: not consuming", extra={"model": self.settings.model_name}
            )
            self.holder.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.holder.changed.wait(), 10)
        if stop.is_set():
            return
        await self.loop.start(stop)
        await self.loop.run(stop)

    async def _process(self, records: list[Record]) -> list[Out]:
        started = time.perf_counter()
        serving = self.holder.current  # one snapshot per batch: swaps happen between batches
        outs: list[Out] = []
        events = []
        sources = []
        for record in records:
            try:
                events.append(self._event_codec.decode(record.value or b""))
                sources.append(record)
            except CodecError as exc:
                outs.append(self._reject(record, [Violation(exc.code, None, str(exc))], None))
        if not events:
            return outs
        try:
            result = score_events(serving, events, "stream", started)
        except ScoringError as exc:
            champion = serving.champion
            if champion is not None:
                SCORING_ERRORS.labels(champion.version.name, champion.version.version).inc()
            log.error(
                "batch could not be scored; dead-lettered",
                extra={"error": str(exc), "events": len(events)},
            )
            reason = [Violation("scoring_error", None, str(exc))]
            outs.extend(self._reject(r, reason, e) for r, e in zip(sources, events, strict=True))
            return outs
        for key, error in result.challenger_errors.items():
            log.warning("challenger failed on a batch", extra={"version": key, "error": error})
        if self.settings.canary.guard:
            await self._guard(serving, len(events), result)
        encode = self._prediction_codec.encode
        topic = self._predictions
        # Per (version, variant): how many, and that variant's latency for this batch (every
        # event of a batch shares it, so one observation per event would only repeat it).
        groups: dict[tuple[str, str], list[float]] = {}
        for p in result.predictions:
            outs.append(Out(topic, p["event_id"].encode(), encode(p)))
            group = groups.setdefault((p["model_version"], p["variant"]), [0, p["latency_ms"]])
            group[0] += 1
        for (version, variant), (n, latency_ms) in groups.items():
            PREDICTIONS.labels(self.settings.model_name, version, variant, "stream").inc(n)
            PREDICTION_LATENCY.labels(self.settings.model_name, version, variant).observe(
                latency_ms / 1000.0
            )
        if self.store is not None:
            # Redis writes overlap the Kafka sends; at most one batch is in flight.
            if self._store_write is not None:
                await self._store_write
            self._store_write = asyncio.create_task(
                self.store.write_predictions(result.predictions)
            )
        return outs

    async def _guard(self, serving: ServingSet, n: int, result: BatchResult) -> None:
        canaries = [mv.key for _, mv in serving.challengers if mv.stage == "canary"]
        if not canaries or serving.champion is None:
            return
        champion = serving.champion.key
        self.guard.observe(champion, n, False, result.inference_cpu_ms.get(champion))
        for key in canaries:
            self.guard.observe(
                key, n, key in result.challenger_errors, result.inference_cpu_ms.get(key)
            )
        for verdict in self.guard.judge(champion, canaries):
            name, _, version = verdict.version_key.partition("@")
            log.warning(
                "canary worse than champion: asking the registry to roll it back",
                extra={"version": verdict.version_key, "reason": verdict.reason},
            )
            await self._send_command(
                new_command(
                    name,
                    "rollback",
                    f"scorer:{self.settings.kafka_client_id}",
                    version=version,
                    reason=f"automatic canary rollback: {verdict.reason}",
                )
            )

    async def _report_load_failure(self, version: ModelVersion, problem: str) -> None:
        await self._send_command(
            new_command(
                version.name,
                "load_failed",
                f"scorer:{self.settings.kafka_client_id}",
                version=version.version,
                options={"problem": problem},
                reason="the scorer could not load this version",
            )
        )

    async def _send_command(self, cmd: dict[str, Any]) -> None:
        try:
            await send_command(self.settings, cmd, producer=self.producer)
        except KafkaError as exc:
            log.error(
                "could not send a registry command",
                extra={"error": str(exc), "request_id": cmd["request_id"]},
            )

    def _reject(
        self, record: Record, reasons: list[Violation], event: dict[str, object] | None
    ) -> Out:
        for reason in reasons:
            REJECTED.labels("scorer", reason.code).inc()
        event = event or {}
        rec = rejection_record(
            record,
            reasons,
            "scoring",
            self.settings.rejection_keep_bytes,
            rule_set=str(event.get("rule_set")) if event.get("rule_set") else None,
            event_id=event.get("event_id"),
            entity_id=event.get("entity_id"),
        )
        return Out(self._rejected, record.key, self._rejection_codec.encode(rec))
