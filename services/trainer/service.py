"""trainer: retrain.requests -> a new version in shadow, or a clear failure record.

A request is committed on receipt (after its "started" record is acknowledged) and trained
off the consumer loop, one at a time. Progress lives on retrain.results under the request
id; at start the trainer folds that topic and resumes requests a crash interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.topics import TopicName
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.registry_view import RegistryView
from services.common.service import (
    StreamService,
    enter_client,
    fold_topics,
    in_background,
    on_exit,
)
from services.common.settings import Settings
from services.trainer.job import Outcome, run_request

log = logging.getLogger(__name__)

REQUESTS: TopicName = "retrain.requests"
RESULTS: TopicName = "retrain.results"
MAX_ATTEMPTS = 2


class TrainerService(StreamService):
    """Consumes retrain.requests; core ``run_request`` (off the loop); produces
    models.artifacts, register commands and retrain.results."""

    name = "trainer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.view = RegistryView(settings)
        self.producer = make_producer(settings)
        self.loop = BatchLoop(
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-trainer",
            [settings.topic(REQUESTS)],
            self.producer,
            self._process,
        )
        self.queue: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue(maxsize=100)
        self.status: dict[str, str] = {}
        self.current: str | None = None
        self._request_codec = codec("RetrainRequest")
        self._result_codec = codec("RetrainResult")
        self._worker: asyncio.Task[object] | None = None
        self.completed = 0

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        self.loop.add_checks(health)
        health.add_check(
            "worker",
            lambda: (
                self._worker is not None and not self._worker.done(),
                f"training {self.current or 'nothing'}; {self.queue.qsize()} queued",
            ),
        )

    async def setup(self, stack: AsyncExitStack) -> None:
        await enter_client(stack, self.producer, "trainer-producer", self.settings)
        await self.view.start()
        on_exit(stack, self.view.stop)
        await self._resume()
        self._worker = in_background(stack, self._work(), "trainer-worker")
        on_exit(stack, self.loop.stop)  # first out

    async def _resume(self) -> None:
        last: dict[str, dict[str, Any]] = {}
        decode = self._result_codec.decode

        def keep(record: ConsumerRecord[bytes, bytes]) -> None:
            result = decode(record.value or b"")
            last[result["request_id"]] = result

        await fold_topics(self.settings, [(RESULTS, keep)], "trainer-results")
        for request_id, result in last.items():
            self.status[request_id] = result["status"]
            if result["status"] != "started":
                continue
            request = {
                "request_id": request_id,
                "model": result["model"],
                "window_start": result["window_start"],
                "window_end": result["window_end"],
                "reason": "resumed after an interrupted run",
                "actor": result["trainer"],
            }
            if result["attempt"] >= MAX_ATTEMPTS:
                await self._publish(
                    self._result(
                        request,
                        "failed",
                        result["attempt"],
                        Outcome("failed", f"interrupted {result['attempt']} times; giving up"),
                    )
                )
            else:
                log.warning("resuming an interrupted retrain", extra={"request_id": request_id})
                await self._publish(
                    self._result(
                        request,
                        "started",
                        result["attempt"] + 1,
                        Outcome("started", "resumed after an interrupted run"),
                    )
                )
                self.queue.put_nowait((request, result["attempt"] + 1))

    async def run(self, stop: asyncio.Event) -> None:
        await self.loop.start(stop)
        await self.loop.run(stop)

    async def _process(self, records: list[Record]) -> list[Out]:
        outs = []
        for record in records:
            try:
                request = self._request_codec.decode(record.value or b"")
            except CodecError as exc:
                log.error("undecodable retrain request skipped", extra={"error": str(exc)})
                continue
            if request["request_id"] in self.status:
                continue  # redelivered: already started or finished
            self.status[request["request_id"]] = "started"
            outs.append(
                self._out(self._result(request, "started", 1, Outcome("started", "received")))
            )
            self.queue.put_nowait((request, 1))
        return outs

    async def _work(self) -> None:
        while True:
            request, attempt = await self.queue.get()
            self.current = request["request_id"]
            started = time.monotonic()
            try:
                outcome = await run_request(
                    self.settings,
                    request,
                    self.view.state,
                    actor=f"trainer:{self.settings.kafka_client_id}",
                )
            except Exception as exc:  # a failed run is a record, never a dead trainer
                log.exception("retrain failed", extra={"request_id": request["request_id"]})
                outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
            self.status[request["request_id"]] = outcome.status
            log.info(
                "retrain finished",
                extra={
                    "request_id": request["request_id"],
                    "status": outcome.status,
                    "detail": outcome.detail,
                    "seconds": round(time.monotonic() - started, 1),
                },
            )
            await self._publish(self._result(request, outcome.status, attempt, outcome))
            self.current = None
            self.completed += 1

    def _result(
        self, request: dict[str, Any], status: str, attempt: int, outcome: Outcome
    ) -> dict[str, Any]:
        return {
            "request_id": request["request_id"],
            "model": request["model"],
            "status": status,
            "attempt": attempt,
            "version": outcome.version,
            "parent_version": outcome.parent_version,
            "detail": outcome.detail,
            "metrics": outcome.metrics,
            "champion_metrics": outcome.champion_metrics,
            "examples": outcome.examples,
            "window_start": request["window_start"],
            "window_end": request["window_end"],
            "trainer": f"trainer:{self.settings.kafka_client_id}",
            "at": int(time.time() * 1000),
        }

    def _out(self, result: dict[str, Any]) -> Out:
        return Out(
            self.settings.topic(RESULTS),
            result["model"].encode(),
            self._result_codec.encode(result),
        )

    async def _publish(self, result: dict[str, Any]) -> None:
        out = self._out(result)
        await self.producer.send_and_wait(out.topic, out.value, key=out.key)
