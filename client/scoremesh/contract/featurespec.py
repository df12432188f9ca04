"""Feature specs: the validation rules of a model version, and how events become arrays.

A spec travels inside the ModelVersion record, so the rules are versioned with the model
they protect. The validator checks events against it, and the scorer, the query API and the
trainer vectorise with it: one piece of code from training to serving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["double", "long", "boolean", "string"]
Action = Literal["reject", "flag"]

# Reason codes: the vocabulary of events.rejected and of flags. Stable: dashboards use them.
REASONS: dict[str, str] = {
    "undecodable": "the bytes are neither Avro single-object nor a JSON object",
    "unknown_schema": "Avro with a schema fingerprint this reader does not know",
    "truncated": "Avro header or body ends early",
    "not_avro": "expected Avro single-object encoding (C3 01 header)",
    "too_large": "the message is larger than the configured limit",
    "invalid_envelope": "event_id, entity_id, event_time, features or attributes malformed",
    "missing_feature": "a required feature is absent",
    "null_feature": "a non-nullable feature is null",
    "wrong_type": "a feature has the wrong type",
    "not_finite": "a numeric feature is NaN or infinite",
    "out_of_range": "a numeric feature is outside [min, max]",
    "unknown_category": "a categorical feature has a value outside its categories",
    "unknown_feature": "a feature the spec does not know",
    "scoring_error": "the model could not score the batch this event was in",
    "unknown_model": "the event names a model the registry has never had a version of",
    "model_unavailable": "the event's model has no champion that can be loaded right now",
    "event_time_from_record": "(flag) the event had no event_time: the Kafka record's "
    "timestamp was used",
}


class FeatureRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    dtype: DType
    required: bool = True
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    categories: list[str | int] | None = None
    impute: float | None = Field(None, description="value the model sees for null / missing")
    range_action: Action = "reject"
    category_action: Action = "reject"
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> FeatureRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} > max {self.max}")
        if (self.nullable or not self.required) and self.impute is None:
            raise ValueError(
                f"feature {self.name!r}: nullable or optional features need an 'impute' value "
                "(what the model sees when the value is missing)"
            )
        if self.dtype == "string" and not self.categories:
            raise ValueError(
                f"feature {self.name!r}: string features need 'categories' (they are "
                "encoded as the category's index)"
            )
        return self


class LatencyGate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(1, ge=1, le=4096)
    p99_ms: float = Field(gt=0)


class ReadinessGates(BaseModel):
    """What a version must show before it may serve (checked by `models validate`/`register`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="e.g. {'f1': 0.9}; accuracy, precision, recall, f1, roc_auc",
    )
    latency: list[LatencyGate] = Field(default_factory=list)
    max_artifact_bytes: int | None = Field(None, gt=0)
    min_class_share: float | None = Field(
        None, ge=0, le=0.5, description="warn-fail when a class is rarer than this in the data"
    )


class FeatureSpec(BaseModel):
    """The rule set of one model version, and its input contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: list[FeatureRule] = Field(min_length=1)
    classes: list[str] = Field(min_length=2, description="label classes, in model output order")
    positive_class: str | None = None
    input_name: str = "input"
    unknown_feature_action: Action | Literal["ignore"] = "flag"
    max_event_bytes: int | None = Field(None, ge=256)
    segments: list[str] = Field(default_factory=list, description="attributes to slice metrics by")
    gates: ReadinessGates = Field(default_factory=ReadinessGates)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of the classes")
        return self

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def positive(self) -> str:
        return self.positive_class or self.classes[-1]


@dataclass(frozen=True, slots=True)
class Violation:
    code: str
    field: str | None
    message: str

    def as_record(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field, "message": self.message}


@dataclass(slots=True)
class CheckedEvent:
    """The outcome of checking one event: a normalised event or the reasons it failed."""

    event: dict[str, Any] | None
    rejections: list[Violation]
    flags: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.rejections


MAX_ID_LEN = 256
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)  # models take float32: beyond this is inf


def event_time_ms(value: Any) -> int | None:
    """Epoch milliseconds from a number (ms) or an ISO-8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 10**14 else None
    if isinstance(value, float):  # whole milliseconds only: a fraction is not truncated away
        return int(value) if value.is_integer() and 0 <= value < 1e14 else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return int(parsed.timestamp() * 1000)
    return None


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable()


class RuleSet:
    """Compiled checks for the active feature specs (the champion's first)."""

    def __init__(self, specs: Sequence[FeatureSpec], version: str) -> None:
        if not specs:
            raise ValueError("a rule set needs at least one feature spec")
        self.version = version
        self.spec = specs[0]
        self.rules = list(self.spec.features)
        # Features only a challenger uses are known (not "unknown"), checked when present.
        champion_names = set(self.spec.names)
        self.optional_rules = [
            rule for spec in specs[1:] for rule in spec.features if rule.name not in champion_names
        ]
        self.known = champion_names | {r.name for r in self.optional_rules}
        self._category_sets = {
            r.name: frozenset(r.categories)
            for r in (*self.rules, *self.optional_rules)
            if r.categories
        }

    def check(
        self, raw: Any, *, record_time_ms: int | None = None, model: str | None = None
    ) -> CheckedEvent:
        """Check one decoded event. ``record_time_ms``: the Kafka record's timestamp, used
        (and flagged ``event_time_from_record``) when the event carries no event_time;
        ``model``: the model the event was routed to, stamped on the checked event."""
        rejections: list[Violation] = []
        flags: list[Violation] = []
        if not isinstance(raw, dict):
            return CheckedEvent(
                event=None,
                rejections=[Violation("invalid_envelope", None, "event is not an object")],
                flags=[],
            )
        event_id = raw.get("event_id")
        if not _valid_id(event_id):
            rejections.append(
                _v(
                    "invalid_envelope",
                    "event_id",
                    f"event_id must be a printable string of 1-{MAX_ID_LEN} chars",
                )
            )
        entity_id = raw.get("entity_id")
        if not _valid_id(entity_id):
            rejections.append(
                _v(
                    "invalid_envelope",
                    "entity_id",
                    f"entity_id must be a printable string of 1-{MAX_ID_LEN} chars",
                )
            )
        given_time = raw.get("event_time")
        if given_time is None and record_time_ms is not None and record_time_ms >= 0:
            event_time: int | None = record_time_ms
            flags.append(
                _v(
                    "event_time_from_record",
                    "event_time",
                    "no event_time: the Kafka record's timestamp was used",
                )
            )
        else:
            event_time = event_time_ms(given_time)
        if event_time is None:
            rejections.append(
                _v(
                    "invalid_envelope",
                    "event_time",
                    "event_time must be whole epoch milliseconds or ISO-8601 with a zone",
                )
            )
        attributes = raw.get("attributes")
        if attributes is None:
            attributes = {}
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            rejections.append(
                _v("invalid_envelope", "attributes", "attributes must map strings to strings")
            )
            attributes = {}
        features = raw.get("features")
        if not isinstance(features, dict):
            rejections.append(_v("invalid_envelope", "features", "features must be an object"))
            return CheckedEvent(event=None, rejections=rejections, flags=flags)

        clean: dict[str, Any] = {}
        for rule in self.rules:
            self._check_feature(rule, features, clean, rejections, flags, present_required=True)
        for rule in self.optional_rules:
            if rule.name in features:
                self._check_feature(
                    rule, features, clean, rejections, flags, present_required=False
                )
        for name in features:
            if name not in self.known:
                action = self.spec.unknown_feature_action
                if action == "ignore":
                    continue
                target = rejections if action == "reject" else flags
                target.append(
                    _v("unknown_feature", str(name), f"feature {name!r} is not in the spec")
                )
        if rejections:
            return CheckedEvent(event=None, rejections=rejections, flags=flags)
        return CheckedEvent(
            event={
                "event_id": event_id,
                "entity_id": entity_id,
                "event_time": event_time,
                "features": clean,
                "attributes": attributes,
                "model": model,
                "rule_set": self.version,
                "flags": sorted({f.code for f in flags}),
            },
            rejections=[],
            flags=flags,
        )

    def _check_feature(
        self,
        rule: FeatureRule,
        features: dict[str, Any],
        clean: dict[str, Any],
        rejections: list[Violation],
        flags: list[Violation],
        present_required: bool,
    ) -> None:
        name = rule.name
        if name not in features:
            if rule.required and present_required:
                rejections.append(
                    _v("missing_feature", name, f"required feature {name!r} is absent")
                )
            else:
                clean[name] = None
            return
        value = features[name]
        if value is None:
            if not rule.nullable:
                rejections.append(_v("null_feature", name, f"feature {name!r} may not be null"))
            clean[name] = None
            return
        dtype = rule.dtype
        if dtype == "double":
            if type(value) is int:
                value = float(value)
            elif type(value) is not float:
                rejections.append(_wrong_type(name, dtype, value))
                return
            if not math.isfinite(value):
                rejections.append(_v("not_finite", name, f"feature {name!r} is {value}"))
                return
            if abs(value) > FLOAT32_MAX:  # whatever the range action: the model would see inf
                rejections.append(
                    _v(
                        "not_finite",
                        name,
                        f"feature {name!r}={value} is infinite as the model's float32 input",
                    )
                )
                return
        elif dtype == "long":
            if type(value) is float and value.is_integer():
                value = int(value)
            elif type(value) is not int:
                rejections.append(_wrong_type(name, dtype, value))
                return
            if not LONG_MIN <= value <= LONG_MAX:
                # Not a long at all, whatever the range action: Avro cannot carry it, so a
                # flag would pass an event that can never be written to events.valid.
                rejections.append(
                    _v("wrong_type", name, f"feature {name!r} does not fit a 64-bit long")
                )
                return
        elif dtype == "boolean":
            if type(value) is not bool:
                rejections.append(_wrong_type(name, dtype, value))
                return
        elif type(value) is not str:
            rejections.append(_wrong_type(name, dtype, value))
            return
        if dtype in ("double", "long") and (
            (rule.min is not None and value < rule.min)
            or (rule.max is not None and value > rule.max)
        ):
            target = rejections if rule.range_action == "reject" else flags
            target.append(
                _v(
                    "out_of_range",
                    name,
                    f"feature {name!r}={value} outside [{rule.min}, {rule.max}]",
                )
            )
        cats = self._category_sets.get(name)
        if cats is not None and value not in cats:
            target = rejections if rule.category_action == "reject" else flags
            target.append(
                _v(
                    "unknown_category",
                    name,
                    f"feature {name!r}={value!r} is not one of {len(cats)} categories",
                )
            )
        clean[name] = value


def _v(code: str, field: str | None, message: str) -> Violation:
    return Violation(code, field, message)


def _wrong_type(name: str, dtype: str, value: Any) -> Violation:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return _v(
        "wrong_type", name, f"feature {name!r} must be {dtype}, got {type(value).__name__} {shown}"
    )


class Vectoriser:
    """Turns checked feature dicts into the float32 matrix the ONNX model expects."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.names = spec.names
        self._impute = [
            np.float32(r.impute if r.impute is not None else np.nan) for r in spec.features
        ]
        self._codes: list[dict[Any, int] | None] = [
            {c: i for i, c in enumerate(r.categories)}
            if r.dtype == "string" and r.categories
            else None
            for r in spec.features
        ]

    def transform(self, rows: Iterable[dict[str, Any]]) -> np.ndarray:
        rows = rows if isinstance(rows, list) else list(rows)
        n = len(rows)
        out = np.empty((n, len(self.names)), dtype=np.float32)
        for j, name in enumerate(self.names):
            codes = self._codes[j]
            column = [row.get(name) for row in rows]
            if codes is None:
                # None becomes NaN here; checked numeric values are always finite, so every
                # NaN is a missing value to impute.
                values = np.fromiter(column, dtype=np.float32, count=n)
                missing = np.isnan(values)
                if missing.any():
                    values[missing] = self._impute[j]
                out[:, j] = values
            else:
                fill = self._impute[j]
                out[:, j] = [fill if v is None else codes.get(v, -1) for v in column]
        return out
