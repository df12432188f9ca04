"""The compiled writer must produce fastavro's bytes exactly, for any record it accepts."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.codec import EncodeError, all_schema_versions, codec

FEATURE_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
IDS = st.text(min_size=1, max_size=30)
EVENTS = st.fixed_dictionaries(
    {
        "event_id": IDS,
        "entity_id": IDS,
        "event_time": st.integers(0, 2**62),
        "features": st.dictionaries(st.text(max_size=12), FEATURE_VALUE, max_size=12),
        "attributes": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "rule_set": st.one_of(st.none(), st.text(max_size=20)),
        "flags": st.lists(st.text(max_size=10), max_size=3),
    }
)


def fastavro_bytes(name: str, record: dict[str, Any]) -> bytes:
    current = all_schema_versions()[name][-1]
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + current.fingerprint)
    schemaless_writer(buf, current.parsed, record)
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_events_encode_exactly_as_fastavro(event: dict[str, Any]) -> None:
    assert codec("Event").encode(event) == fastavro_bytes("Event", event)
    assert codec("Event").decode(codec("Event").encode(event)) == event


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.floats(0, 1), st.booleans())
def test_predictions_encode_exactly_as_fastavro(
    event: dict[str, Any], score: float, served: bool
) -> None:
    prediction = {
        **{k: event[k] for k in ("event_id", "entity_id", "event_time", "features", "attributes")},
        "model": "credit",
        "model_version": "1.0.0",
        "variant": "champion",
        "served": served,
        "source": "stream",
        "score": score,
        "scores": {"0": 1 - score, "1": score},
        "decision": "1",
        "latency_ms": 0.5,
        "scored_at": 1,
    }
    assert codec("Prediction").encode(prediction) == fastavro_bytes("Prediction", prediction)


def test_nan_and_infinities_round_trip() -> None:
    event = {
        "event_id": "e",
        "entity_id": "x",
        "event_time": 1,
        "features": {"a": math.inf, "b": -math.inf},
    }
    assert codec("Event").encode(event) == fastavro_bytes("Event", event)


@pytest.mark.parametrize(
    "bad",
    [
        {"event_id": 1, "entity_id": "x", "event_time": 1, "features": {}},
        {"event_id": "e", "entity_id": "x", "features": {}},
        {"event_id": "e", "entity_id": "x", "event_time": 1, "features": {"a": 2**64}},
        {"event_id": "e", "entity_id": "x", "event_time": 1, "features": {"a": [1]}},
        {"event_id": "e", "entity_id": "x", "event_time": "now", "features": {}},
    ],
)
def test_bad_records_are_encode_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(EncodeError, match="Event: cannot encode"):
        codec("Event").encode(bad)
