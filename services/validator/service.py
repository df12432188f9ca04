"""validator: events.raw -> events.valid | events.rejected, against the active rule set."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from scoremesh.contract.avro_compiled import zigzag
from scoremesh.contract.codec import HEADER_LEN, MAGIC, CodecError, codec, decode_any
from scoremesh.contract.featurespec import CheckedEvent, RuleSet, Violation
from scoremesh.contract.topics import TopicName
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.metrics import FEATURE_NULLS, FEATURE_SEEN, FLAGGED, REJECT_RATE, REJECTED
from services.common.registry_view import RegistryState, RegistryView
from services.common.rejections import rejection_record
from services.common.rulesets import active_rule_set
from services.common.service import StreamService, enter_client, on_exit, wait_for
from services.common.settings import Settings

log = logging.getLogger(__name__)

_ABSENT = object()
SOURCE: TopicName = "events.raw"
VALID: TopicName = "events.valid"
REJECTED_TOPIC: TopicName = "events.rejected"


class WindowedRate:
    """Share of rejected events over the last ``window_s`` seconds, in 1 s buckets."""

    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self.buckets: collections.deque[list[int]] = collections.deque()

    def add(self, total: int, rejected: int, now: float | None = None) -> float:
        second = int(now if now is not None else time.time())
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += total
            self.buckets[-1][2] += rejected
        else:
            self.buckets.append([second, total, rejected])
        while self.buckets and self.buckets[0][0] <= second - self.window_s:
            self.buckets.popleft()
        return self.rate

    @property
    def rate(self) -> float:
        total = sum(b[1] for b in self.buckets)
        return sum(b[2] for b in self.buckets) / total if total else 0.0


class ValidatorCore:
    """Pure batch logic: raw records in, outgoing records out. No I/O."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules: RuleSet | None = None
        self._event_codec = codec("Event")
        self._event_header = MAGIC + self._event_codec.current.fingerprint
        self._stamp_tail = b""
        self._rejection_codec = codec("Rejection")
        self._valid = settings.topic(VALID)
        self._rejected = settings.topic(REJECTED_TOPIC)
        self.reject_rate = WindowedRate()

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        # Avro inputs that pass unchanged are stamped by rewriting their last two fields
        # (rule_set: null, flags: []) instead of being encoded again: see _restamp().
        stamp = rules.version.encode()
        self._stamp_tail = b"\x02" + zigzag(len(stamp)) + stamp + b"\x00"

    def _restamp(self, value: bytes, raw: dict[str, Any], checked: CheckedEvent) -> bytes | None:
        """The input bytes with our stamp, when they are current-schema Avro that the rules
        passed without changing anything; None when the event must be encoded again.

        A decoded ``rule_set`` of None and ``flags`` of [] are always the two bytes 00 00 at
        the end of the body, so replacing them is exact (a golden test pins this).
        """
        event = checked.event
        if (
            event is None
            or checked.flags
            or value[:HEADER_LEN] != self._event_header
            or raw.get("rule_set") is not None
            or raw.get("flags")
            or type(raw.get("event_time")) is not int
        ):
            return None
        given, clean = raw["features"], event["features"]
        if len(given) != len(clean):
            return None
        for name, v in clean.items():
            w = given.get(name, _ABSENT)
            if type(v) is not type(w) or v != w:
                return None
        return value[:-2] + self._stamp_tail

    def limit(self) -> int:
        spec_limit = self.rules.spec.max_event_bytes if self.rules else None
        return min(self.settings.max_event_bytes, spec_limit or self.settings.max_event_bytes)

    def process(self, records: list[Record]) -> list[Out]:
        rules = self.rules
        assert rules is not None, "validator consumes only once a rule set is known"
        limit = self.limit()
        outs: list[Out] = []
        rejected = 0
        reasons_seen: collections.Counter[str] = collections.Counter()
        flags_seen: collections.Counter[str] = collections.Counter()
        nulls: collections.Counter[str] = collections.Counter()
        for record in records:
            value = record.value
            raw: Any = None
            if value is None or len(value) == 0:
                reasons = [Violation("undecodable", None, "empty value")]
            elif len(value) > limit:
                reasons = [
                    Violation(
                        "too_large", None, f"{len(value)} bytes exceeds the {limit}-byte limit"
                    )
                ]
            else:
                try:
                    raw = decode_any(SOURCE, value)
                except CodecError as exc:
                    reasons = [Violation(exc.code, None, str(exc))]
                else:
                    checked = rules.check(raw)
                    if checked.event is not None:
                        try:
                            encoded = self._restamp(
                                value, raw, checked
                            ) or self._event_codec.encode(checked.event)
                        except CodecError as exc:
                            reasons = [Violation("wrong_type", None, str(exc))]
                        else:
                            outs.append(
                                Out(self._valid, checked.event["entity_id"].encode(), encoded)
                            )
                            for flag in checked.flags:
                                flags_seen[flag.code] += 1
                            for name, fv in checked.event["features"].items():
                                if fv is None:
                                    nulls[name] += 1
                            continue
                    else:
                        reasons = checked.rejections
            rejected += 1
            for reason in reasons:
                reasons_seen[reason.code] += 1
            event_id = raw.get("event_id") if isinstance(raw, dict) else None
            entity_id = raw.get("entity_id") if isinstance(raw, dict) else None
            rec = rejection_record(
                record,
                reasons,
                "validation",
                self.settings.rejection_keep_bytes,
                rule_set=rules.version,
                event_id=event_id,
                entity_id=entity_id,
            )
            key = rec["entity_id"].encode() if rec["entity_id"] else record.key
            outs.append(Out(self._rejected, key, self._rejection_codec.encode(rec)))
        for code, n in reasons_seen.items():
            REJECTED.labels("validator", code).inc(n)
        for code, n in flags_seen.items():
            FLAGGED.labels(code).inc(n)
        passed = len(records) - rejected
        if passed:
            for name in rules.spec.names:
                FEATURE_SEEN.labels(name).inc(passed)
                if nulls[name]:
                    FEATURE_NULLS.labels(name).inc(nulls[name])
        REJECT_RATE.labels("validator").set(self.reject_rate.add(len(records), rejected))
        return outs


class ValidatorService(StreamService):
    """Consumes events.raw; core ``ValidatorCore``; produces events.valid, events.rejected."""

    name = "validator"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.core = ValidatorCore(settings)
        self.view = RegistryView(settings, on_change=self._on_registry)
        self.has_rules = asyncio.Event()
        self.producer = make_producer(settings)
        self.loop = BatchLoop(
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-validator",
            [settings.topic(SOURCE)],
            self.producer,
            self._process,
            pipeline_depth=settings.batch_pipeline_depth,
        )

    def _on_registry(self, state: RegistryState) -> None:
        rules = active_rule_set(state, self.settings.model_name)
        if rules is None:
            return
        if self.core.rules is None or self.core.rules.version != rules.version:
            self.core.set_rules(rules)
            log.info("rule set loaded", extra={"rule_set": rules.version})
            self.has_rules.set()

    async def _process(self, records: list[Record]) -> list[Out]:
        return self.core.process(records)

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        health.add_check(
            "rules",
            lambda: (
                self.core.rules is not None,
                self.core.rules.version
                if self.core.rules
                else f"no champion for model {self.settings.model_name!r} yet",
            ),
        )
        self.loop.add_checks(health)

    async def setup(self, stack: AsyncExitStack) -> None:
        await enter_client(stack, self.producer, "validator-producer", self.settings)
        await self.view.start()
        on_exit(stack, self.view.stop)
        on_exit(stack, self.loop.stop)  # first out: finishes the batches in flight

    async def run(self, stop: asyncio.Event) -> None:
        if not self.has_rules.is_set():
            log.warning(
                "no champion yet: not consuming until one is promoted",
                extra={"model": self.settings.model_name},
            )
        if not await wait_for(self.has_rules, stop):
            return
        await self.loop.start(stop)
        await self.loop.run(stop)
