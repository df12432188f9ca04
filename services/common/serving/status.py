"""Which model versions each serving process has actually loaded: heartbeats on
``serving.status``, so a promotion can be confirmed (``scoremesh models status``) and a
model that has a champion but no scorer serving it is noticed (the monitor alerts).

A process publishes its status at start, whenever what it serves changes, and every
``interval``; a clean stop publishes ``state=stopped``. A process silent for three
intervals is taken to be gone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.records import ServingStatus
from scoremesh.contract.topics import SERVING_STATUS
from services.common.service import fold_topics
from services.common.serving.models import Serving
from services.common.settings import Settings

MISSED_BEATS = 3


def instance_id(service: str, started_ms: int) -> str:
    return f"{service}/{socket.gethostname()}/{os.getpid()}/{started_ms}"


def status_record(
    instance: str,
    service: str,
    group: str,
    models: Iterable[str],
    serving: Serving,
    state: str,
    started_ms: int,
    interval_ms: int,
    now_ms: int,
) -> ServingStatus:
    loaded: dict[str, str] = {}
    for serving_set in serving.models.values():
        if serving_set.champion is not None:
            loaded[serving_set.champion.key] = "champion"
        for model, version in serving_set.challengers:
            loaded[model.key] = version.stage
    return {
        "instance": instance,
        "service": service,
        "group": group,
        "models": sorted(models),
        "serving": loaded,
        "failures": dict(serving.failures),
        "state": state,
        "started_at": started_ms,
        "at": now_ms,
        "interval_ms": interval_ms,
    }


class Heartbeat:
    """Publishes one process's ServingStatus (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        group: str,
        current: Callable[[], Serving],
        producer: AIOKafkaProducer,
        interval_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self.group = group
        self.current = current
        self.producer = producer
        self.interval_ms = int(interval_s * 1000)
        self.started_ms = int(time.time() * 1000)
        self.instance = instance_id(service, self.started_ms)
        self._codec = codec(ServingStatus)
        self._topic = settings.topic(SERVING_STATUS)
        self._published: Serving | None = None

    def record(self, state: str = "up") -> ServingStatus:
        return status_record(
            self.instance,
            self.service,
            self.group,
            self.settings.models or (),
            self.current(),
            state,
            self.started_ms,
            self.interval_ms,
            int(time.time() * 1000),
        )

    async def publish(self, state: str = "up") -> None:
        self._published = self.current()
        await self.producer.send_and_wait(
            self._topic, self._codec.encode(self.record(state)), key=self.instance.encode()
        )

    async def run(self) -> None:
        """Publish on change (checked every second) and at least every interval."""
        last = 0.0
        while True:
            now = time.monotonic()
            if self.current() is not self._published or now - last >= self.interval_ms / 1000:
                await self.publish()
                last = now
            await asyncio.sleep(1.0)

    async def stopped(self) -> None:
        await self.publish("stopped")


@dataclass(frozen=True)
class Replica:
    """A live serving process, as its last heartbeat describes it."""

    instance: str
    service: str
    group: str
    serving: dict[str, str]
    failures: dict[str, str]
    age_ms: int
    models: tuple[str, ...] = ()  # the models it was told to serve (SCOREMESH_MODELS); () = all


def live_replicas(statuses: Iterable[ServingStatus], now_ms: int) -> list[Replica]:
    """The processes whose last heartbeat is recent and not a stop."""
    return [
        Replica(
            s["instance"],
            s["service"],
            s["group"],
            dict(s["serving"]),
            dict(s.get("failures") or {}),
            now_ms - s["at"],
            tuple(s.get("models") or ()),
        )
        for s in statuses
        if s["state"] == "up" and now_ms - s["at"] <= MISSED_BEATS * s["interval_ms"]
    ]


async def read_serving_status(settings: Settings) -> list[ServingStatus]:
    """The last heartbeat of every process that ever published one."""
    last: dict[str, ServingStatus] = {}
    decode = codec(ServingStatus).decode

    def fold(record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None:
            return
        try:
            status = decode(record.value)
        except CodecError:
            return
        held = last.get(status["instance"])
        if held is None or held["at"] <= status["at"]:
            last[status["instance"]] = status

    await fold_topics(settings, [(SERVING_STATUS, fold)], "serving-status")
    return list(last.values())
