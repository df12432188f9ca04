"""Where sync predictions go after the response: the predictions topic and the query store.

A request never waits for Kafka acknowledgements. Two pumps run in the background, one for
Kafka and one for Redis; each takes everything that accumulated while its previous round
was in flight (after ``linger_s``) and sends it as one round (one batch per partition, one
EVALSHA), so the per-round cost (socket writes, acknowledgements) is shared by more
predictions as load grows.

Bounded, with backpressure: at most ``max_inflight`` predictions await Kafka. A request
that finds no room waits a short while (``wait_for_room``) and is then refused with a 503
before it is scored (``runtime.predict``), so a served prediction is a published one. The
admission check and the publish are a micro-batch apart, so the queue may pass
``max_inflight`` by the requests admitted meanwhile; only past ``2 * max_inflight`` would
predictions be dropped, and like every failed send they are counted and logged. The
store's queue has the same hard bound (it is a cache: the oldest are dropped, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.records import Prediction
from services.common.kafka import enqueue_records
from services.common.metrics import EVENTS_OUT, KAFKA_UP
from services.common.query_store import QueryStore

log = logging.getLogger(__name__)

SERVICE = "query"
YIELD_EVERY = 64  # predictions encoded between two turns of the event loop
PUBLISH_DROPPED = Counter(
    "scoremesh_api_published_dropped_total",
    "Sync predictions that did not reach the predictions topic",
    ["reason"],
)
STORE_DROPPED = Counter(
    "scoremesh_api_store_dropped_total",
    "Sync predictions not written to the query store because its queue was full",
)
PUBLISH_REFUSED = Counter(
    "scoremesh_api_publish_backpressure_total",
    "Predict requests refused (503) because the predictions topic's backlog was full",
)
OVERSHOOT = 2  # hard bound on a queue: OVERSHOOT * max_inflight predictions


class PredictionSink:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        store: QueryStore | None,
        max_inflight: int,
        linger_s: float = 0.005,
        ack_timeout_s: float = 30.0,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.store = store
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self.linger_s = linger_s
        self.inflight = 0  # accepted for Kafka, not yet acknowledged (or dropped)
        self.kafka_ok = True
        self._to_kafka: list[Prediction] = []
        self._to_store: list[Prediction] = []
        self._kafka_wake = asyncio.Event()
        self._store_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._encode = codec(Prediction).encode
        self._tasks: list[asyncio.Task[None]] = []
        self._store_busy = False
        self._settled = asyncio.Event()  # set after every round, for drain()
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._kafka_pump(), name="sync-predictions-kafka"),
            asyncio.create_task(self._store_pump(), name="sync-predictions-redis"),
        ]

    def has_room(self) -> bool:
        return self.inflight < self.max_inflight

    async def wait_for_room(self, timeout_s: float) -> bool:
        if self.inflight < self.max_inflight:
            return True
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout_s)
        return self.inflight < self.max_inflight

    def publish(self, predictions: Sequence[Prediction]) -> None:
        """Queue for Kafka and Redis; never raises, never blocks."""
        if not predictions:
            return
        n = len(predictions)
        hard_limit = OVERSHOOT * self.max_inflight
        if self.inflight + n <= hard_limit:
            self.inflight += n
            self._to_kafka.extend(predictions)
            self._kafka_wake.set()
        else:  # admission control was outrun (see the module doc): say so
            self._dropped("backpressure", n)
        if self.store is not None:
            excess = len(self._to_store) + n - hard_limit
            if excess > 0:
                del self._to_store[:excess]  # Redis is a cache: keep the newest
                STORE_DROPPED.inc(excess)
                self._warn("query store queue full; oldest sync predictions not written", excess)
            self._to_store.extend(predictions)
            self._store_wake.set()

    # --- Kafka -----------------------------------------------------------------------
    async def _kafka_pump(self) -> None:
        while True:
            await self._kafka_wake.wait()
            await asyncio.sleep(self.linger_s)  # let a round gather several micro-batches
            self._kafka_wake.clear()
            batch, self._to_kafka = self._to_kafka, []
            if not batch:
                continue
            try:
                await self._send(batch)
            except Exception as exc:  # the pump must outlive any one round
                self._dropped("kafka_error", len(batch), str(exc))
            finally:
                self.inflight -= len(batch)
                if self.inflight < self.max_inflight:
                    self._room.set()
                self._settled.set()

    async def _send(self, predictions: list[Prediction]) -> None:
        encoded: list[tuple[str, int | None, bytes | None, bytes | None]] = []
        for i, p in enumerate(predictions):
            if i and not i % YIELD_EVERY:
                await asyncio.sleep(0)  # a big round must not stall requests
            try:
                encoded.append((self.topic, None, p["event_id"].encode(), self._encode(p)))
            except CodecError as exc:
                self._dropped("encode_error", 1, str(exc))
        too_large = 0

        def skip(_topic: str, value: bytes | None) -> None:
            nonlocal too_large
            too_large += 1
            self._dropped("too_large", 1, f"{len(value or b'')} bytes")

        try:
            # Placed by murmur2 of the event_id, the producer's own choice for a keyed record,
            # so sync predictions land on the same partition as the stream's for an event_id
            # (and as its labels); a complete round is sent at once, without linger.
            futures, sent = await enqueue_records(
                self.producer, encoded, close_batches=True, on_too_large=skip
            )
            await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            self.kafka_ok = False
            KAFKA_UP.labels(SERVICE).set(0)
            self._dropped("kafka_error", len(encoded) - too_large, str(exc))
            return
        if not self.kafka_ok:
            log.info("predictions topic writable again")
        self.kafka_ok = True
        KAFKA_UP.labels(SERVICE).set(1)
        EVENTS_OUT.labels(SERVICE, self.topic).inc(sent)

    # --- Redis -----------------------------------------------------------------------
    async def _store_pump(self) -> None:
        while True:
            await self._store_wake.wait()
            await asyncio.sleep(self.linger_s)
            self._store_wake.clear()
            batch, self._to_store = self._to_store, []
            if batch and self.store is not None:
                self._store_busy = True
                try:
                    await self.store.write_predictions(batch)  # counts and logs its failures
                except Exception as exc:  # the pump must outlive any one round
                    log.warning("query store write failed", extra={"error": str(exc)})
                finally:
                    self._store_busy = False
                    self._settled.set()

    # --- both ------------------------------------------------------------------------
    def _dropped(self, reason: str, n: int, error: str = "") -> None:
        if n <= 0:
            return
        PUBLISH_DROPPED.labels(reason).inc(n)
        self._warn("sync predictions not published to Kafka", n, reason=reason, error=error)

    def _warn(self, message: str, n: int, **extra: str) -> None:
        """Log a loss, but not once per request: at most one line per 10 s per message,
        with how many were lost since the previous line."""
        self._unlogged[message] = self._unlogged.get(message, 0) + n
        now = time.monotonic()
        if now - self._last_log.get(message, -1e9) > 10:
            self._last_log[message] = now
            lost = self._unlogged.pop(message)
            log.warning(message, extra={"predictions": lost, "since_s": 10, **extra})

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and not self._to_store and not self._store_busy

    async def drain(self, timeout_s: float) -> None:
        """Let what is queued go out, then stop the pumps (at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while not self.idle and (remaining := deadline - time.monotonic()) > 0:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
