"""retrain-trigger: alerts, stats and a schedule -> retrain.requests; labelled evidence ->
promotion commands. Its state is rebuilt at start from its own output (retrain.requests)
and from monitoring.stats, never pickled (see docs/adr/0008-retraining.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from prometheus_client import Counter

from scoremesh.contract.codec import CodecError, codec
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
        self.model = settings.model_name
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
        self._alert_codec = codec("Alert")
        self._stats_codec = codec("MonitoringStats")
        self._request_codec = codec("RetrainRequest")
        self.stats = TopicFollower(
            settings, "monitoring.stats", self._apply_stats, self._after_stats, "retrain-stats"
        )
        self._released: list[dict[str, Any]] = []
        self._last_request_ms = 0
        self._moved: set[tuple[str, str, str | None]] = set()
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
            on_alert(self.state, alert, self.policy, now, replay=True)

        await fold_topics(
            self.settings,
            [("retrain.requests", fold_request), ("alerts", replay)],
            "retrain-fold",
        )
        self._last_request_ms = self.state.of(self.model).last_request_ms or 0
        await self.stats.start()  # requests released by the fold go out before it returns
        on_exit(stack, self.stats.stop)
        self.folded = True
        in_background(stack, self._schedule(), "schedule")
        log.info(
            "retrain state folded",
            extra={
                "last_request_ms": self._last_request_ms,
                "labels_since_last": self.state.of(self.model).labels_since_last,
            },
        )

    def _apply_stats(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Fold a stats record: promotion evidence always; retrain triggers only for stats
        newer than the last request (older ones were judged before the restart)."""
        stats = self._stats_codec.decode(record.value or b"")
        self.book.observe(stats, self.promotion.metric)
        if self.folded or stats["emitted_at"] > self._last_request_ms:
            self._released.extend(on_stats(self.state, stats, self.policy, int(time.time() * 1000)))
        else:
            m = self.state.of(stats["model"])
            m.latest_event_ms = max(m.latest_event_ms, int(stats["window_end"]))
        return True

    async def _after_stats(self) -> None:
        released, self._released = self._released, []
        for request in released:
            out = self._request_out(request, "alert")
            await self.producer.send_and_wait(out.topic, out.value, key=out.key)
        if self.folded and self.promotion.enabled:
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
            request = on_alert(self.state, alert, self.policy, now)
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

    def _request_out(self, request: dict[str, Any], trigger: str) -> Out:
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
        champion = self.view.state.champion(self.model)
        if champion is None:
            return
        challengers = {
            v.version: v.stage for v in self.view.state.active(self.model) if v.stage != "champion"
        }
        for move in judge(self.book, champion.version, challengers, self.promotion):
            ident = (move.version, move.action, move.target_stage)
            if ident in self._moved:
                continue
            self._moved.add(ident)
            await self._send(move)

    async def _send(self, move: Move) -> None:
        PROMOTION_MOVES.labels(self.model, move.action).inc()
        log.warning(
            "promotion policy decided",
            extra={
                "version": move.version,
                "action": move.action,
                "target_stage": move.target_stage,
                "reason": move.reason,
            },
        )
        cmd = new_command(
            self.model,
            move.action,
            "promotion-policy",
            version=move.version,
            target_stage=move.target_stage,
            options=move.options,
            reason=move.reason,
        )
        await send_command(self.settings, cmd, producer=self.producer)

    async def _schedule(self) -> None:
        if not self.policy.schedule:
            return
        from croniter import croniter

        while True:
            now = datetime.now(UTC)
            next_at = croniter(self.policy.schedule, now).get_next(datetime)
            await asyncio.sleep(max(1.0, (next_at - now).total_seconds()))
            request = on_schedule(self.state, self.model, self.policy, int(time.time() * 1000))
            if request is None:
                SUPPRESSED.labels(self.model, "schedule").inc()
                log.info(
                    "scheduled retrain skipped", extra={"suppressed": dict(self.state.suppressed)}
                )
                continue
            out = self._request_out(request, "schedule")
            await self.producer.send_and_wait(out.topic, out.value, key=out.key)
