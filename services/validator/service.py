"""validator: events.raw -> events.valid | events.rejected, against the active rule set."""

from __future__ import annotations

import asyncio
import collections
import logging
from contextlib import AsyncExitStack
from typing import Any

from scoremesh.contract.avro_compiled import zigzag
from scoremesh.contract.codec import HEADER_LEN, MAGIC, CodecError, codec, decode_any
from scoremesh.contract.featurespec import CheckedEvent, RuleSet, Violation
from scoremesh.contract.records import Event
from scoremesh.contract.topics import TopicName
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.metrics import FEATURE_NULLS, FEATURE_SEEN, FLAGGED, REJECTED
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


class ValidatorCore:
    """Pure batch logic: raw records in, outgoing records out. No I/O.

    Each event is checked against the rule set of its own model (``model`` in the event,
    else the default model); an event for a model the registry never had, or for one with
    no champion now, is dead-lettered (``unknown_model``, ``model_unavailable``), so one
    model's trouble never holds up another's events on the shared partitions.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_model = settings.model_name
        self.rules: dict[str, RuleSet] = {}
        self.known_models: frozenset[str] = frozenset()
        self._event_codec = codec(Event)
        self._event_header = MAGIC + self._event_codec.current.fingerprint
        # per model: its name as an Avro string union branch, and the rule-set stamp
        self._stamps: dict[str, tuple[bytes, bytes]] = {}
        self._headers: dict[str, list[tuple[str, bytes]]] = {}
        self._rejection_codec = codec("Rejection")
        self._valid = settings.topic(VALID)
        self._rejected = settings.topic(REJECTED_TOPIC)

    def set_rules(self, rules: dict[str, RuleSet], known_models: frozenset[str]) -> None:
        """The rule set of every model that has a champion, and every model ever registered."""
        self.rules = dict(rules)
        self.known_models = known_models
        for model, rule_set in rules.items():
            # Avro inputs that pass unchanged are stamped by rewriting their last fields
            # (model, rule_set: null, flags: []) instead of being encoded again: _restamp().
            name = model.encode()
            stamp = rule_set.version.encode()
            self._stamps[model] = (
                b"\x02" + zigzag(len(name)) + name,
                b"\x02" + zigzag(len(stamp)) + stamp + b"\x00",
            )
            self._headers[model] = [("model", name)]

    def _restamp(
        self, value: bytes, raw: dict[str, Any], checked: CheckedEvent, model: str
    ) -> bytes | None:
        """The input bytes with our stamp, when they are current-schema Avro that the rules
        passed without changing anything; None when the event must be encoded again.

        A decoded ``model`` of None, ``rule_set`` of None and ``flags`` of [] are always the
        three bytes 00 00 00 at the end of the body (and a named model is followed by the
        two bytes 00 00), so replacing them is exact (golden tests pin this).
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
        model_branch, stamp_tail = self._stamps[model]
        if raw.get("model") is None:
            return value[:-3] + model_branch + stamp_tail
        return value[:-2] + stamp_tail

    def process(self, records: list[Record]) -> list[Out]:
        assert self.rules, "validator consumes only once a rule set is known"
        limit = self.settings.max_event_bytes
        outs: list[Out] = []
        reasons_seen: collections.Counter[str] = collections.Counter()
        flags_seen: collections.Counter[str] = collections.Counter()
        passed: collections.Counter[str] = collections.Counter()
        nulls: collections.Counter[tuple[str, str]] = collections.Counter()
        for record in records:
            value = record.value
            raw: Any = None
            rules: RuleSet | None = None
            if value is None or len(value) == 0:
                reasons = [Violation("undecodable", None, "empty value")]
            elif len(value) > limit:
                reasons = [_too_large(len(value), limit)]
            else:
                try:
                    raw = decode_any(SOURCE, value)
                except CodecError as exc:
                    reasons = [Violation(exc.code, None, str(exc))]
                else:
                    model = raw.get("model") or self.default_model
                    rules = self.rules.get(model) if type(model) is str else None
                    spec_limit = rules.spec.max_event_bytes if rules is not None else None
                    if rules is None:
                        reasons = [self._no_rules(model)]
                    elif spec_limit is not None and len(value) > spec_limit:
                        reasons = [_too_large(len(value), spec_limit)]
                    else:
                        checked = rules.check(raw, record_time_ms=record.timestamp, model=model)
                        if checked.event is not None:
                            try:
                                encoded = self._restamp(
                                    value, raw, checked, model
                                ) or self._event_codec.encode(checked.event)  # type: ignore[arg-type]
                            except CodecError as exc:
                                reasons = [Violation("wrong_type", None, str(exc))]
                            else:
                                outs.append(
                                    Out(
                                        self._valid,
                                        checked.event["entity_id"].encode(),
                                        encoded,
                                        headers=self._headers[model],
                                    )
                                )
                                for flag in checked.flags:
                                    flags_seen[flag.code] += 1
                                passed[model] += 1
                                for name, fv in checked.event["features"].items():
                                    if fv is None:
                                        nulls[model, name] += 1
                                continue
                        else:
                            reasons = checked.rejections
            for reason in reasons:
                reasons_seen[reason.code] += 1
            event_id = raw.get("event_id") if isinstance(raw, dict) else None
            entity_id = raw.get("entity_id") if isinstance(raw, dict) else None
            rec = rejection_record(
                record,
                reasons,
                "validation",
                self.settings.rejection_keep_bytes,
                rule_set=rules.version if rules is not None else None,
                event_id=event_id if isinstance(event_id, str) else None,
                entity_id=entity_id if isinstance(entity_id, str) else None,
            )
            key = rec["entity_id"].encode() if rec["entity_id"] else record.key
            outs.append(Out(self._rejected, key, self._rejection_codec.encode(rec)))
        for code, n in reasons_seen.items():
            REJECTED.labels("validator", code).inc(n)
        for code, n in flags_seen.items():
            FLAGGED.labels(code).inc(n)
        for model, n in passed.items():
            for name in self.rules[model].spec.names:
                FEATURE_SEEN.labels(model, name).inc(n)
                if nulls[model, name]:
                    FEATURE_NULLS.labels(model, name).inc(nulls[model, name])
        return outs

    def _no_rules(self, model: object) -> Violation:
        if type(model) is not str:
            return Violation("invalid_envelope", "model", "model must be a string (a model name)")
        if model in self.known_models:
            return Violation(
                "model_unavailable",
                "model",
                f"model {model!r} has no champion now; promote one, then "
                f"`scoremesh dlq replay --model {model}`",
            )
        known = ", ".join(sorted(self.known_models)) or "none yet"
        return Violation(
            "unknown_model", "model", f"no model {model!r} in the registry (known: {known})"
        )


def _too_large(size: int, limit: int) -> Violation:
    return Violation("too_large", None, f"{size} bytes exceeds the {limit}-byte limit")


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
        rules = {
            model: rule_set
            for model in state.models()
            if (rule_set := active_rule_set(state, model)) is not None
        }
        held = {model: r.version for model, r in self.core.rules.items()}
        self.core.set_rules(rules, frozenset(state.models()))
        if {model: r.version for model, r in rules.items()} != held:
            log.info(
                "rule sets loaded", extra={"rule_sets": sorted(r.version for r in rules.values())}
            )
        if rules:
            self.has_rules.set()

    async def _process(self, records: list[Record]) -> list[Out]:
        return self.core.process(records)

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("registry", lambda: (self.view.ready.is_set(), "models.registry folded"))
        health.add_check(
            "rules",
            lambda: (
                bool(self.core.rules),
                ", ".join(sorted(r.version for r in self.core.rules.values()))
                or "no model has a champion yet",
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
            log.warning("no model has a champion yet: not consuming until one is promoted")
        if not await wait_for(self.has_rules, stop):
            return
        await self.loop.start(stop)
        await self.loop.run(stop)
