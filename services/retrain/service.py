"""retrain-trigger: alerts, stats and a schedule -> retrain.requests; labelled evidence ->
promotion commands. Its state is rebuilt at start from its own output (retrain.requests)
and from monitoring.stats, never pickled (see docs/adr/0008-retraining.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime

from aiokafka import ConsumerRecord
from prometheus_client import Counter

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.records import Alert, MonitoringStats, RetrainRequest
from services.common.batchloop import BatchLoop, Out, Record
from services.common.commands import new_command, send_command
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.registry_view import RegistryView
from services.common.service import (
    StreamService,
    TopicFollower,
    enter_client,
    fold_topics,
    in_background,
    on_exit,
)
from services.common.settings import Settings
from services.retrain.promotion import Move, PromotionBook, judge
from services.retrain.trigger import TriggerState, on_alert, on_schedule, on_stats

log = logging.getLogger(__name__)

RETRAINS = Counter(
    "scoremesh_retrain_requests_total", "Retrain requests raised", ["model", "trigger"]
)
SUPPRESSED = Counter(
    "scoremesh_retrain_suppressed_total", "Retrain triggers suppressed", ["model", "reason"]
)
PROMOTION_MOVES = Counter(
    "scoremesh_promotion_moves_total", "Promotion policy commands", ["model", "action"]
)


class RetrainTriggerService(StreamService):
    """Consumes alerts and monitoring.stats; cores ``on_alert``/``on_stats``/``judge``;
    produces retrain.requests and promotion commands."""

    name = "retrain-trigger"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.policy = settings.retrain.policy
        self.promotion = settings.promotion.policy
        self.state = TriggerState()
        self.book = PromotionBook()
        self.view = RegistryView(settings)
        self.producer = make_producer(settings)
        self.loop = BatchLoop(
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-retrain-trigger",
            [settings.topic("alerts")],
            self.producer,
            self._on_alerts,
        )
        self._alert_codec = codec(Alert)
        self._stats_codec = codec(MonitoringStats)
        self._request_codec = codec(RetrainRequest)
        self.stats = TopicFollower(
            settings, "monitoring.stats", self._apply_stats, self._after_stats, "retrain-stats"
        )
        self._released: list[RetrainRequest] = []
        self._last_request_ms: dict[str, int] = {}
        self._moved: set[tuple[str, str, str, str | None]] = set()
        self.folded = False

    def register_checks(self, health: HealthServer) -> None:
        health.add_check(
            "state", lambda: (self.folded, "retrain.requests and monitoring.stats folded")
        )
        self.loop.add_checks(health)

    async def setup(self, stack: AsyncExitStack) -> None:
        await enter_client(stack, self.producer, "retrain-producer", self.settings)
        on_exit(stack, self.loop.stop)
        await self.view.start()
        on_exit(stack, self.view.stop)
        now = int(time.time() * 1000)

        def fold_request(record: ConsumerRecord[bytes, bytes]) -> None:
            self.state.fold_request(self._request_codec.decode(record.value or b""))

        def replay(record: ConsumerRecord[bytes, bytes]) -> None:
            # Alert episodes still waiting for labels from after their change.
            alert = self._alert_codec.decode(record.value or b"")
            on_alert(self.state, alert, self.policy.for_model(alert["model"]), now, replay=True)

        await fold_topics(
            self.settings,
            [("retrain.requests", fold_request), ("alerts", replay)],
            "retrain-fold",
        )
        self._last_request_ms = {
            model: m.last_request_ms or 0 for model, m in self.state.models.items()
        }
        await self.stats.start()  # requests released by the fold go out before it returns
        on_exit(stack, self.stats.stop)
        self.folded = True
        in_background(stack, self._schedule(), "schedule")
        log.info(
            "retrain state folded",
            extra={
                "last_request_ms": self._last_request_ms,
                "labels_since_last": {
                    model: m.labels_since_last for model, m in self.state.models.items()
                },
            },
        )

    def _apply_stats(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Fold a stats record: promotion evidence always; retrain triggers only for stats
        newer than the last request (older ones were judged before the restart)."""
        stats = self._stats_codec.decode(record.value or b"")
        model = stats["model"]
        self.book.observe(stats, self.promotion.for_model(model).metric)
        if self.folded or stats["emitted_at"] > self._last_request_ms.get(model, 0):
            policy = self.policy.for_model(model)
            self._released.extend(on_stats(self.state, stats, policy, int(time.time() * 1000)))
        else:
            m = self.state.of(model)
            m.latest_event_ms = max(m.latest_event_ms, int(stats["window_end"]))
        return True

    async def _after_stats(self) -> None:
        released, self._released = self._released, []
        for request in released:
            out = self._request_out(request, "alert")
            await self.producer.send_and_wait(out.topic, out.value, key=out.key)
        if self.folded:
            await self._promote()

    async def run(self, stop: asyncio.Event) -> None:
        await self.loop.start(stop)
        await self.loop.run(stop)

    async def _on_alerts(self, records: list[Record]) -> list[Out]:
        outs = []
        now = int(time.time() * 1000)
        for record in records:
            try:
                alert = self._alert_codec.decode(record.value or b"")
            except CodecError as exc:
                log.error("undecodable alert skipped", extra={"error": str(exc)})
                continue
            before = dict(self.state.suppressed)
            request = on_alert(self.state, alert, self.policy.for_model(alert["model"]), now)
            for reason, n in self.state.suppressed.items():
                if n > before.get(reason, 0):
                    SUPPRESSED.labels(alert["model"], reason).inc(n - before.get(reason, 0))
                    log.info(
                        "retrain trigger suppressed",
                        extra={"reason": reason, "alert": alert["alert_key"]},
                    )
            if request is not None:
                outs.append(self._request_out(request, "alert"))
        return outs

    def _request_out(self, request: RetrainRequest, trigger: str) -> Out:
        RETRAINS.labels(request["model"], trigger).inc()
        log.warning(
            "retrain requested",
            extra={
                "request_id": request["request_id"],
                "reason": request["reason"],
                "window_start": request["window_start"],
                "window_end": request["window_end"],
            },
        )
        return Out(
            self.settings.topic("retrain.requests"),
            request["model"].encode(),
            self._request_codec.encode(request),
        )

    async def _promote(self) -> None:
        """Each model's challengers judged on labelled evidence, by its own policy."""
        state = self.view.state
        for model in state.models():
            policy = self.promotion.for_model(model)
            champion = state.champion(model)
            if not policy.enabled or champion is None:
                continue
            challengers = {v.version: v.stage for v in state.active(model) if v.stage != "champion"}
            for move in judge(self.book, model, champion.version, challengers, policy):
                ident = (model, move.version, move.action, move.target_stage)
                if ident in self._moved:
                    continue
                self._moved.add(ident)
                await self._send(model, move)

    async def _send(self, model: str, move: Move) -> None:
        PROMOTION_MOVES.labels(model, move.action).inc()
        log.warning(
            "promotion policy decided",
            extra={
                "version": f"{model}@{move.version}",
                "action": move.action,
                "target_stage": move.target_stage,
                "reason": move.reason,
            },
        )
        cmd = new_command(
            model,
            move.action,
            "promotion-policy",
            version=move.version,
            target_stage=move.target_stage,
            options=move.options,
            reason=move.reason,
        )
        await send_command(self.settings, cmd, producer=self.producer)

    async def _schedule(self) -> None:
        """Scheduled retrains: each model whose policy has a cron ``schedule`` is asked at
        its times (checked at least every minute, so new models and policies join)."""
        from croniter import croniter

        last_check = datetime.now(UTC)
        while True:
            await asyncio.sleep(SCHEDULE_TICK_S)
            now = datetime.now(UTC)
            for model in self.view.state.models():
                policy = self.policy.for_model(model)
                if not policy.schedule:
                    continue
                due = croniter(policy.schedule, last_check).get_next(datetime)
                if due > now:
                    continue
                request = on_schedule(self.state, model, policy, int(time.time() * 1000))
                if request is None:
                    SUPPRESSED.labels(model, "schedule").inc()
                    log.info(
                        "scheduled retrain skipped",
                        extra={"model": model, "suppressed": dict(self.state.suppressed)},
                    )
                    continue
                out = self._request_out(request, "schedule")
                await self.producer.send_and_wait(out.topic, out.value, key=out.key)
            last_check = now


SCHEDULE_TICK_S = 30.0
"""How often the schedules are looked at: a cron time fires within this of its minute."""
