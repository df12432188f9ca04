"""retrain-trigger: alerts, stats and a schedule -> retrain.requests; labelled evidence ->
promotion commands. Its state is rebuilt at start from its own output (retrain.requests)
and from monitoring.stats, never pickled (see docs/adr/0008-retraining.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from scoremesh.contract.codec import CodecError, codec
from services.common.batchloop import BatchLoop, Out, Record
from services.common.commands import new_command, send_command
from services.common.health import HealthServer
from services.common.kafka import (
    assign_all,
    make_consumer,
    make_producer,
    read_to_end,
    start_with_retry,
)
from services.common.registry_view import RegistryView
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


class RetrainTriggerService:
    name = "retrain-trigger"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        self._stats_consumer: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._moved: set[tuple[str, str, str | None]] = set()
        self.folded = False

    def register_checks(self, health: HealthServer) -> None:
        health.add_check(
            "state", lambda: (self.folded, "retrain.requests and monitoring.stats folded")
        )
        self.loop.add_checks(health)

    async def start(self) -> None:
        await start_with_retry(self.producer.start, "retrain-producer", self.settings)
        await self.view.start()
        consumer = make_consumer(self.settings, group_id=None)
        await start_with_retry(consumer.start, "retrain-fold", self.settings)
        try:
            tps = await assign_all(consumer, self.settings.topic("retrain.requests"))
            await read_to_end(
                consumer,
                tps,
                lambda r: self.state.fold_request(self._request_codec.decode(r.value)),
            )
            # Alert episodes still waiting for labels from after their change (replay only).
            tps = await assign_all(consumer, self.settings.topic("alerts"))
            now = int(time.time() * 1000)

            def replay(record: Any) -> None:
                alert = self._alert_codec.decode(record.value)
                on_alert(self.state, alert, self.policy, now, replay=True)

            await read_to_end(consumer, tps, replay)
        finally:
            await consumer.stop()
        self._stats_consumer = make_consumer(self.settings, group_id=None)
        await start_with_retry(self._stats_consumer.start, "retrain-stats", self.settings)
        tps = await assign_all(self._stats_consumer, self.settings.topic("monitoring.stats"))
        last = self.state.of(self.model).last_request_ms or 0
        released: list[dict[str, Any]] = []
        await read_to_end(
            self._stats_consumer, tps, lambda r: released.extend(self._fold_stats(r, last))
        )
        for request in released:
            out = self._request_out(request, "alert")
            await self.producer.send_and_wait(out.topic, out.value, key=out.key)
        self.folded = True
        self._tasks = [
            asyncio.create_task(self._follow_stats(), name="stats"),
            asyncio.create_task(self._schedule(), name="schedule"),
        ]
        log.info(
            "retrain state folded",
            extra={
                "last_request_ms": last,
                "labels_since_last": self.state.of(self.model).labels_since_last,
            },
        )

    def _fold_stats(self, record: Any, last_request_ms: int) -> list[dict[str, Any]]:
        stats = self._stats_codec.decode(record.value)
        self.book.observe(stats, self.promotion.metric)
        if stats["emitted_at"] > last_request_ms:
            return on_stats(self.state, stats, self.policy, int(time.time() * 1000))
        m = self.state.of(stats["model"])
        m.latest_event_ms = max(m.latest_event_ms, int(stats["window_end"]))
        return []

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

    async def _follow_stats(self) -> None:
        while True:
            batches = await self._stats_consumer.getmany(timeout_ms=1000)
            changed = False
            now = int(time.time() * 1000)
            for records in batches.values():
                for record in records:
                    stats = self._stats_codec.decode(record.value)
                    for request in on_stats(self.state, stats, self.policy, now):
                        out = self._request_out(request, "alert")
                        await self.producer.send_and_wait(out.topic, out.value, key=out.key)
                    self.book.observe(stats, self.promotion.metric)
                    changed = True
            if changed and self.promotion.enabled:
                await self._promote()

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

    async def stop(self) -> None:
        await self.loop.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stats_consumer is not None:
            await self._stats_consumer.stop()
        await self.view.stop()
        await self.producer.stop()
