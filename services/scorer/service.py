"""scorer: events.valid -> predictions (+ Redis), one ONNX call per model version per batch.

Every model with a champion is served, or the subset ``SCOREMESH_MODELS`` names; each
subset is its own consumer group reading the whole topic, and skips other models' events
by their ``model`` header without decoding them. An event whose model has no champion
that can be loaded is dead-lettered (``model_unavailable``, or ``unknown_model`` when the
registry never had it), never held: the other models' events share its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack

from aiokafka.errors import KafkaError

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.featurespec import Violation
from scoremesh.contract.records import Event, ModelCommand, Prediction
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
from services.common.serving.models import ModelHolder, Serving, ServingSet
from services.common.serving.scoring import BatchResult, ScoringError, score_events
from services.common.serving.status import Heartbeat
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
        self.group_id = scorer_group(settings)
        self.loop = BatchLoop(
            settings,
            self.name,
            self.group_id,
            [settings.topic(SOURCE)],
            self.producer,
            self._process,
            pipeline_depth=settings.batch_pipeline_depth,
        )
        self.heartbeat = Heartbeat(
            settings, self.name, self.group_id, lambda: self.holder.current, self.producer
        )
        self._event_codec = codec(Event)
        self._prediction_codec = codec(Prediction)
        self._rejection_codec = codec("Rejection")
        self._predictions = settings.topic(PREDICTIONS_TOPIC)
        self._rejected = settings.topic(REJECTED_TOPIC)
        self._store_write: asyncio.Task[int] | None = None

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        health.add_check(
            "model",
            lambda: (
                bool(self.holder.current.serving_models),
                ",".join(self.holder.current.keys) or "no champion loaded",
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
        in_background(stack, self.heartbeat.run(), "heartbeat")
        on_exit(stack, self._say_stopped)
        on_exit(stack, self.loop.stop)  # first out: finishes the batches in flight
        if self.store is not None:
            await self.store.ping()

    async def _say_stopped(self) -> None:
        """A clean stop says so (readers need not wait three beats); bounded, since a stop
        must not hang on a broker that is gone."""
        try:
            await asyncio.wait_for(self.heartbeat.stopped(), STOP_HEARTBEAT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("could not publish the stop heartbeat", extra={"error": repr(exc)})

    async def _settle_store_write(self) -> None:
        if self._store_write is not None:
            with contextlib.suppress(Exception):
                await self._store_write

    async def run(self, stop: asyncio.Event) -> None:
        while not self.holder.current.serving_models and not stop.is_set():
            log.warning(
                "no champion loaded yet: not consuming",
                extra={"models": self.settings.models or "all"},
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
        outs: list[Out] = []
        by_model: dict[str, tuple[list[Event], list[Record]]] = {}
        serves = self.holder.serves
        default = self.settings.model_name
        decode = self._event_codec.decode
        for record in records:
            named = _model_header(record)
            if named is not None and not serves(named):
                continue  # another scorer group's model
            try:
                event = decode(record.value or b"")
            except CodecError as exc:
                outs.append(self._reject(record, [Violation(exc.code, None, str(exc))], None))
                continue
            model = event.get("model") or default
            if named is None and not serves(model):
                continue
            group = by_model.get(model)
            if group is None:
                group = by_model[model] = ([], [])
            group[0].append(event)
            group[1].append(record)
        if not by_model:
            return outs
        serving = self.holder.current  # one snapshot per batch: swaps happen between batches
        if any(serving.of(model) is None for model in by_model):
            serving = await self._await_loads(serving)
        predictions: list[Prediction] = []
        for model, (events, sources) in by_model.items():
            serving_set = serving.of(model)
            if serving_set is None:
                code = serving.unavailable(model)
                reason = [Violation(code, "model", _unavailable_message(code, model, serving))]
                outs.extend(
                    self._reject(r, reason, e) for r, e in zip(sources, events, strict=True)
                )
                continue
            predictions += await self._score(serving_set, events, sources, started, outs)
        if self.store is not None and predictions:
            # Redis writes overlap the Kafka sends; at most one batch is in flight.
            if self._store_write is not None:
                await self._store_write
            self._store_write = asyncio.create_task(self.store.write_predictions(predictions))
        return outs

    async def _await_loads(self, serving: Serving) -> Serving:
        """A model whose champion the registry has but this process is still loading waits
        for that load, briefly (a just-promoted model's first events); past the bound its
        events are dead-lettered and can be replayed."""
        if not self.holder.loading:
            return serving
        self.holder.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.holder.changed.wait(), LOAD_WAIT_S)
        return self.holder.current

    async def _score(
        self,
        serving: ServingSet,
        events: list[Event],
        sources: list[Record],
        started: float,
        outs: list[Out],
    ) -> list[Prediction]:
        """One model's events: scored by its champion and challengers, predictions added to
        ``outs``; a batch the model cannot score is dead-lettered whole."""
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
            outs.extend(self._reject(r, e_, e) for r, e_, e in _each(sources, reason, events))
            return []
        for key, error in result.challenger_errors.items():
            log.warning("challenger failed on a batch", extra={"version": key, "error": error})
        if self.settings.canary.guard:
            await self._guard(serving, len(events), result)
        encode = self._prediction_codec.encode
        topic = self._predictions
        # Per (version, variant): how many, and that variant's latency for this batch (every
        # event of a batch shares it, so one observation per event would only repeat it).
        groups: dict[tuple[str, str, str], list[float]] = {}
        for p in result.predictions:
            outs.append(Out(topic, p["event_id"].encode(), encode(p)))
            group = groups.setdefault(
                (p["model"], p["model_version"], p["variant"]), [0, p["latency_ms"]]
            )
            group[0] += 1
        for (model, version, variant), (n, latency_ms) in groups.items():
            PREDICTIONS.labels(model, version, variant, "stream").inc(n)
            PREDICTION_LATENCY.labels(model, version, variant).observe(latency_ms / 1000.0)
        return result.predictions

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

    async def _send_command(self, cmd: ModelCommand) -> None:
        try:
            await send_command(self.settings, cmd, producer=self.producer)
        except KafkaError as exc:
            log.error(
                "could not send a registry command",
                extra={"error": str(exc), "request_id": cmd["request_id"]},
            )

    def _reject(self, record: Record, reasons: list[Violation], event: Event | None) -> Out:
        for reason in reasons:
            REJECTED.labels("scorer", reason.code).inc()
        rec = rejection_record(
            record,
            reasons,
            "scoring",
            self.settings.rejection_keep_bytes,
            rule_set=event.get("rule_set") if event is not None else None,
            event_id=event["event_id"] if event is not None else None,
            entity_id=event["entity_id"] if event is not None else None,
        )
        return Out(self._rejected, record.key, self._rejection_codec.encode(rec))


STOP_HEARTBEAT_S = 2.0
LOAD_WAIT_S = 5.0
"""How long a batch waits for a model load in progress before dead-lettering its events."""


def scorer_group(settings: Settings) -> str:
    """All models: one group; a subset (``SCOREMESH_MODELS``) has a group of its own."""
    base = f"{settings.topic_prefix}scoremesh-scorer"
    return f"{base}.{'+'.join(settings.models)}" if settings.models else base


def _model_header(record: Record) -> str | None:
    for key, value in record.headers or ():
        if key == "model":
            return value.decode() if value else None
    return None


def _unavailable_message(code: str, model: str, serving: Serving) -> str:
    if code == "unknown_model":
        return f"no model {model!r} in the registry"
    failure = next(
        (why for key, why in serving.failures.items() if key.startswith(f"{model}@")), None
    )
    why = f": {failure}" if failure else ""
    return (
        f"model {model!r} has no champion that loads{why}; fix it, then "
        f"`scoremesh dlq replay --model {model}`"
    )


def _each(
    sources: list[Record], reason: list[Violation], events: list[Event]
) -> list[tuple[Record, list[Violation], Event]]:
    return [(r, reason, e) for r, e in zip(sources, events, strict=True)]
