"""The label join copies an event's fields from its Prediction into its outputs as bytes
(services/label_join/rows.py). Those outputs must be exactly what the codec writes for the
same records, whichever path (copy or encode) makes them, and a Prediction written by an
older schema version must give the same head as one written by today's."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoremesh.contract.codec import CodecError, codec
from services.label_join.rows import HEAD_FIELDS, SKIPPED, EventRows
from tests.contract.test_compiled_codec import EVENTS, fastavro_bytes

CLASSES = st.text(min_size=1, max_size=12)
TIMES = st.integers(0, 2**40)


def prediction(event: dict[str, Any], score: float, variant: str, decision: str) -> dict[str, Any]:
    return {
        **{k: event[k] for k in HEAD_FIELDS},
        "model": "credit",
        "model_version": "1.2.0",
        "variant": variant,
        "served": variant == "champion",
        "source": "stream",
        "score": score,
        "scores": {"0": 1 - score, "1": score},
        "decision": decision,
        "latency_ms": 0.25,
        "scored_at": event["event_time"] + 3,
    }


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.floats(0, 1), st.sampled_from(["champion", "shadow"]), CLASSES, CLASSES, TIMES)
def test_outputs_are_the_codecs_bytes(
    event: dict[str, Any], score: float, variant: str, decision: str, label: str, delay: int
) -> None:
    p = prediction(event, score, variant, decision)
    data = codec("Prediction").encode(p)
    label_time = p["event_time"] + delay
    copy, encode = EventRows(), EventRows()
    encode.splice = False
    assert copy.splice, "the schemas no longer line up: rows.py falls back to encoding"
    for rows in (copy, encode):
        record, head, time_end, attrs_at = rows.read_prediction(data)
        full = codec("Prediction").decode(data)
        assert record == {k: v for k, v in full.items() if k not in SKIPPED}
        assert (head, time_end, attrs_at) == rows.head_of(p)
        assert rows.decode_head(head) == {k: p[k] for k in HEAD_FIELDS}
        assert rows.decode_attributes(head[attrs_at:]) == p["attributes"]

        example = {**{k: p[k] for k in HEAD_FIELDS}, "label": label, "label_time": label_time}
        assert rows.example(head, label, label_time) == fastavro_bytes("TrainingExample", example)

        labeled = {
            **{k: p[k] for k in ("event_id", "entity_id", "event_time", "attributes")},
            **{k: p[k] for k in ("model", "model_version", "variant", "source", "score")},
            "decision": decision,
            "label": label,
            "correct": decision == label,
            "label_time": label_time,
            "label_delay_ms": delay,
        }
        fields = (p["model"], p["model_version"], variant, p["source"], score, decision)
        value = rows.labeled(head, time_end, attrs_at, fields, label, label_time, p["event_time"])
        assert value == fastavro_bytes("LabeledPrediction", labeled)
        assert codec("LabeledPrediction").decode(value) == labeled


def test_a_schema_that_stops_lining_up_falls_back_to_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TrainingExample with a field in a new place cannot be made by copying: the rows
    notice at start and encode instead."""
    examples = codec("TrainingExample")
    fields = examples.current.raw["fields"]
    moved = {**examples.current.raw, "fields": [fields[0], fields[5], *fields[1:5], *fields[6:]]}
    monkeypatch.setattr(examples, "current", dataclasses.replace(examples.current, raw=moved))
    assert not EventRows().splice


def test_broken_predictions_raise_codec_errors() -> None:
    rows = EventRows()
    p = prediction(
        {
            "event_id": "e1",
            "entity_id": "c1",
            "event_time": 5,
            "features": {"age": 30, "salary": 1.5, "zip": "z"},
            "attributes": {"channel": "web"},
        },
        0.5,
        "champion",
        "1",
    )
    data = codec("Prediction").encode(p)
    for broken in (b"", b"\xc3\x01", data[:-4], data[:12], b"{}" + data[2:]):
        with pytest.raises(CodecError):
            rows.read_prediction(broken)


def test_a_prediction_from_an_older_schema_gets_a_head_in_todays_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older writer's fields lie elsewhere: the head is written again from the record."""
    rows = EventRows()
    p = prediction(
        {
            "event_id": "e2",
            "entity_id": "c2",
            "event_time": 1_700_000_000_000,
            "features": {"age": 41, "salary": None},
            "attributes": {},
        },
        0.9,
        "champion",
        "1",
    )
    data = codec("Prediction").encode(p)
    expected = rows.read_prediction(data)
    monkeypatch.setattr(
        rows._prediction,
        "decode_marking",
        lambda data, after, skip=(): (codec("Prediction").decode(data), None),
    )
    record, *head = rows.read_prediction(data)
    assert head == list(expected[1:])
    assert {k: v for k, v in record.items() if k not in SKIPPED} == expected[0]
