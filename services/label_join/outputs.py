"""The join's two per-event outputs, LabeledPrediction and TrainingExample, encoded for the
join's shape of data: byte for byte what ``codec(name).encode`` writes, at about a third
of the cost.

Both records begin with event_id, entity_id, event_time, so those bytes are encoded once
per event and shared; the model, version, variant, source and class names of a
prediction, the segment attributes and the feature names repeat across events and are
encoded once per process (bounded caches). Anything this encoder does not expect (a
schema release that changes either record, an unusual value type) goes through the
generic codec instead, which also raises its usual ``EncodeError``.
"""

from __future__ import annotations

import struct
from typing import Any

from services.common.avro_writer import zigzag
from services.common.codec import MAGIC, AvroCodec, codec

_PACK_DOUBLE = struct.Struct("<d").pack
CACHE_MAX = 4096  # entries per cache; beyond it values are encoded without caching

# The layouts this encoder writes; checked against the current schemas at start-up.
LABELED_LAYOUT = (
    ("event_id", "string"),
    ("entity_id", "string"),
    ("event_time", "long"),
    ("model", "string"),
    ("model_version", "string"),
    ("variant", "string"),
    ("source", "string"),
    ("score", "double"),
    ("decision", "string"),
    ("label", "string"),
    ("correct", "boolean"),
    ("label_time", "long"),
    ("label_delay_ms", "long"),
    ("attributes", {"type": "map", "values": "string"}),
)
FEATURE_UNION = ["null", "boolean", "long", "double", "string"]
EXAMPLE_LAYOUT = (
    ("event_id", "string"),
    ("entity_id", "string"),
    ("event_time", "long"),
    ("features", {"type": "map", "values": FEATURE_UNION}),
    ("attributes", {"type": "map", "values": "string"}),
    ("label", "string"),
    ("label_time", "long"),
)
# the union branch of each feature value type (zigzag of its index in FEATURE_UNION)
_NULL, _TRUE, _FALSE, _LONG, _DOUBLE, _STRING = (
    b"\x00",
    b"\x02\x01",
    b"\x02\x00",
    b"\x04",
    b"\x06",
    b"\x08",
)
_FAST_ERRORS = (TypeError, ValueError, AttributeError, OverflowError, KeyError)


def _layout(avro: AvroCodec) -> tuple[tuple[str, Any], ...]:
    return tuple((f["name"], f["type"]) for f in avro.current.raw["fields"])


def _string(value: str) -> bytes:
    data = value.encode()
    return zigzag(len(data)) + data


class OutputEncoder:
    def __init__(self) -> None:
        self.labeled_codec = codec("LabeledPrediction")
        self.example_codec = codec("TrainingExample")
        self.fast = (
            _layout(self.labeled_codec) == LABELED_LAYOUT
            and _layout(self.example_codec) == EXAMPLE_LAYOUT
        )
        self._labeled_header = MAGIC + self.labeled_codec.current.fingerprint
        self._example_header = MAGIC + self.example_codec.current.fingerprint
        self._words: dict[str, bytes] = {}  # names and classes: few distinct values
        self._attributes: dict[tuple[tuple[str, str], ...], bytes] = {}

    # --- the two records ------------------------------------------------------------------

    def head(self, event_id: str, entity_id: str, event_time: int) -> bytes:
        """The fields both records begin with; pass the result to ``labeled`` and ``example``."""
        return _string(event_id) + _string(entity_id) + zigzag(event_time)

    def labeled(self, head: bytes, record: dict[str, Any]) -> bytes:
        """A LabeledPrediction; ``head`` must encode the record's first three fields."""
        if self.fast:
            word = self._word
            try:
                return b"".join(
                    (
                        self._labeled_header,
                        head,
                        word(record["model"]),
                        word(record["model_version"]),
                        word(record["variant"]),
                        word(record["source"]),
                        _PACK_DOUBLE(record["score"]),
                        word(record["decision"]),
                        word(record["label"]),
                        b"\x01" if record["correct"] is True else _bool(record["correct"]),
                        zigzag(_long(record["label_time"])),
                        zigzag(_long(record["label_delay_ms"])),
                        self._attrs(record["attributes"]),
                    )
                )
            except _FAST_ERRORS:
                pass
        return self.labeled_codec.encode(record)

    def example(self, head: bytes, record: dict[str, Any]) -> bytes:
        """A TrainingExample; ``head`` must encode the record's first three fields."""
        if self.fast:
            try:
                return b"".join(
                    (
                        self._example_header,
                        head,
                        self._features(record["features"]),
                        self._attrs(record["attributes"]),
                        self._word(record["label"]),
                        zigzag(_long(record["label_time"])),
                    )
                )
            except _FAST_ERRORS:
                pass
        return self.example_codec.encode(record)

    # --- parts ----------------------------------------------------------------------------

    def _word(self, value: str) -> bytes:
        held = self._words.get(value)
        if held is None:
            held = _string(value)
            if len(self._words) < CACHE_MAX:
                self._words[value] = held
        return held

    def _attrs(self, attributes: dict[str, str]) -> bytes:
        if not attributes:
            return b"\x00"
        key = tuple(attributes.items())
        held = self._attributes.get(key)
        if held is None:
            parts = [zigzag(len(attributes))]
            for name, value in key:
                parts.append(self._word(name))
                parts.append(_string(value))
            parts.append(b"\x00")
            held = b"".join(parts)
            if len(self._attributes) < CACHE_MAX:
                self._attributes[key] = held
        return held

    def _features(self, features: dict[str, Any]) -> bytes:
        if not features:
            return b"\x00"
        word = self._word
        parts = [zigzag(len(features))]
        append = parts.append
        for name, value in features.items():
            append(word(name))
            kind = type(value)
            if kind is float:
                append(_DOUBLE)
                append(_PACK_DOUBLE(value))
            elif kind is int:
                append(_LONG)
                append(zigzag(value))
            elif value is None:
                append(_NULL)
            elif kind is bool:
                append(_TRUE if value else _FALSE)
            elif kind is str:
                append(_STRING)
                append(_string(value))
            else:
                raise TypeError(f"feature {name!r}: {kind.__name__} fits no branch")
        append(b"\x00")
        return b"".join(parts)


def _bool(value: Any) -> bytes:
    if value is False:
        return b"\x00"
    raise TypeError(f"expected a boolean, got {type(value).__name__}")


def _long(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
