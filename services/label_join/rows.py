"""The join's rows as bytes: an event's fields are read once, then copied, not re-encoded.

Prediction and TrainingExample begin with the same five fields (``event_id``, ``entity_id``,
``event_time``, ``features``, ``attributes``: the event's *head*); LabeledPrediction begins
with the first three and ends with ``attributes``. Avro writes a record as its fields one
after another, so the join keeps each event's head as the bytes it arrived in and builds
its outputs by concatenation: a training example is its header + the head + the label, a
labeled row is its header + the head's first three fields + the prediction's fields + the
label's + the head's attributes. Nothing is decoded twice and the features are never turned
back into Avro, and the state holds one ``bytes`` per event instead of a dict of objects.

The layouts are checked against the schemas when the join starts. If a schema stops
matching (a field added in the middle, a type changed), ``EventRows.splice`` is False and
every output is encoded from a record as before: slower, never wrong. The contract tests
compare both paths byte for byte with the codec's own encoding.
"""

from __future__ import annotations

import struct
from typing import Any

from scoremesh.contract.avro_compiled import (
    compile_decoder,
    compile_encoder,
    compile_marking_decoder,
    zigzag,
)
from scoremesh.contract.codec import HEADER_LEN, codec

HEAD_FIELDS = ("event_id", "entity_id", "event_time", "features", "attributes")
# LabeledPrediction between the head's first three fields and its attributes
LABELED_MIDDLE = (
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
)
EXAMPLE_TAIL = (("label", "string"), ("label_time", "long"))
_CACHE_MAX = 4096  # distinct strings / prediction prefixes remembered
_DOUBLE = struct.Struct("<d").pack
# Fields of a Prediction the join keeps only as the head's bytes (the attributes are decoded
# once per distinct map) or does not use: read past, not built.
SKIPPED = ("entity_id", "attributes", "latency_ms")


def _layout(fields: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(f["name"], f["type"]) for f in fields]


class EventRows:
    """Reads Predictions into (record, head) and writes the join's outputs from heads."""

    def __init__(self) -> None:
        self._prediction = codec("Prediction")
        self._example = codec("TrainingExample")
        self._labeled = codec("LabeledPrediction")
        fields = self._prediction.current.raw["fields"]
        head = _layout(fields[: len(HEAD_FIELDS)])
        if tuple(name for name, _ in head) != HEAD_FIELDS:
            raise ValueError(
                f"Prediction must begin with {HEAD_FIELDS}, not {tuple(n for n, _ in head)}"
            )
        head_schema = {"type": "record", "name": "EventHead", "fields": fields[: len(HEAD_FIELDS)]}
        self._head_encode = compile_encoder(head_schema, b"")
        self._head_decode = compile_marking_decoder(head_schema, ("event_time", "features"))
        attributes = {"type": "record", "name": "EventAttributes", "fields": fields[4:5]}
        self._attributes_decode = compile_decoder(attributes)
        example = _layout(self._example.current.raw["fields"])
        labeled = _layout(self._labeled.current.raw["fields"])
        self.splice = (
            example == head + list(EXAMPLE_TAIL)
            and labeled == head[:3] + list(LABELED_MIDDLE) + head[4:]
        )
        self._example_header = self._example.header
        self._labeled_header = self._labeled.header
        self._prefixes: dict[tuple[str, str, str, str], bytes] = {}
        self._strings: dict[str, bytes] = {}

    # --- reading --------------------------------------------------------------------------

    def read_prediction(self, data: bytes) -> tuple[dict[str, Any], bytes, int, int]:
        """The decoded Prediction, its head's bytes, and where in the head event_time ends
        and attributes begin. The record may lack the ``SKIPPED`` fields (checked, but kept
        only in the head's bytes). Raises CodecError as ``codec.decode`` does."""
        record, marks = self._prediction.decode_marking(
            data, ("event_time", "features", "attributes"), SKIPPED
        )
        if marks is None:  # an older writer: the head is written again in today's layout
            return (record, *self.head_of(record))
        time_end, features_end, attrs_end = marks
        return record, data[HEADER_LEN:attrs_end], time_end - HEADER_LEN, features_end - HEADER_LEN

    def head_of(self, record: dict[str, Any]) -> tuple[bytes, int, int]:
        """A head (and its two offsets) written from a record with the head's fields."""
        head = self._head_encode(record)
        _, (time_end, attrs_at) = self._head_decode(head, 0)
        return head, time_end, attrs_at

    def decode_head(self, head: bytes) -> dict[str, Any]:
        """The head's fields as a record (what restore and the encode path need)."""
        record, _ = self._head_decode(head, 0)
        return record

    def decode_attributes(self, raw: bytes) -> dict[str, str]:
        """The attributes map from its bytes (``head[attrs_at:]``)."""
        attributes: dict[str, str] = self._attributes_decode(raw, 0)["attributes"]
        return attributes

    # --- writing --------------------------------------------------------------------------

    def example(self, head: bytes, label: str, label_time: int) -> bytes:
        """A TrainingExample: the event's head, its label and label time."""
        if not self.splice:
            record = self.decode_head(head)
            record["label"], record["label_time"] = label, label_time
            return self._example.encode(record)
        return b"".join((self._example_header, head, self._string(label), zigzag(label_time)))

    def labeled(
        self,
        head: bytes,
        time_end: int,
        attrs_at: int,
        prediction: tuple[str, str, str, str, float, str],
        label: str,
        label_time: int,
        event_time: int,
    ) -> bytes:
        """A LabeledPrediction; ``prediction`` is (model, model_version, variant, source,
        score, decision)."""
        model, version, variant, source, score, decision = prediction
        if not self.splice:
            record = self.decode_head(head)
            del record["features"]
            record.update(
                model=model,
                model_version=version,
                variant=variant,
                source=source,
                score=score,
                decision=decision,
                label=label,
                correct=decision == label,
                label_time=label_time,
                label_delay_ms=label_time - event_time,
            )
            return self._labeled.encode(record)
        key = (model, version, variant, source)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = b"".join(self._string(s) for s in key)
            if len(self._prefixes) < _CACHE_MAX:
                self._prefixes[key] = prefix
        return b"".join(
            (
                self._labeled_header,
                head[:time_end],
                prefix,
                _DOUBLE(score),
                self._string(decision),
                self._string(label),
                b"\x01" if decision == label else b"\x00",
                zigzag(label_time),
                zigzag(label_time - event_time),
                head[attrs_at:],
            )
        )

    def _string(self, text: str) -> bytes:
        held = self._strings.get(text)
        if held is None:
            data = text.encode()
            held = zigzag(len(data)) + data
            if len(self._strings) < _CACHE_MAX:
                self._strings[text] = held
        return held
