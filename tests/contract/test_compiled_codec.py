"""The compiled codec must agree with fastavro exactly: the same bytes for any record it
accepts, the same record for any body it reads, and only typed errors for broken bodies."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from scoremesh.contract.avro_compiled import zigzag
from scoremesh.contract.codec import CodecError, EncodeError, all_schema_versions, codec
from tests.contract.samples import SAMPLES

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
        "model": st.one_of(st.none(), st.text(max_size=12)),
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


def fastavro_record(name: str, data: bytes) -> Any:
    current = all_schema_versions()[name][-1]
    return schemaless_reader(io.BytesIO(data[10:]), current.parsed, None)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_events_decode_exactly_as_fastavro(event: dict[str, Any]) -> None:
    data = fastavro_bytes("Event", event)
    decoded = codec("Event").decode(data)
    assert decoded == fastavro_record("Event", data)
    assert list(decoded) == list(fastavro_record("Event", data))  # field order too


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_schema_decodes_its_sample_as_fastavro_does(name: str) -> None:
    data = fastavro_bytes(name, SAMPLES[name])
    assert codec(name).decode(data) == fastavro_record(name, data) == SAMPLES[name]
    assert codec(name).encode(SAMPLES[name]) == data


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_cut_of_a_body_is_a_typed_error(name: str) -> None:
    data = codec(name).encode(SAMPLES[name])
    for end in range(10, len(data)):
        with pytest.raises(CodecError):
            codec(name).decode(data[:end])


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.data())
def test_corrupted_bodies_decode_or_fail_with_a_typed_error(
    event: dict[str, Any], data: st.DataObject
) -> None:
    good = bytearray(codec("Event").encode(event))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(10, len(good) - 1))
        good[at] = data.draw(st.integers(0, 255))
    try:
        decoded = codec("Event").decode(bytes(good))
    except CodecError:
        return
    # what we accept fastavro reads alike (repr: a flipped byte can make a NaN)
    assert repr(decoded) == repr(fastavro_record("Event", bytes(good)))


def test_a_varint_beyond_64_bits_is_a_typed_error() -> None:
    """fastavro reads such a varint as a number no Avro long can hold; we refuse it."""
    body = b"\x02e" + b"\x02x" + b"\xff" * 9 + b"\x7f"  # event_time: 70 bits of ones
    with pytest.raises(CodecError):
        codec("Event").decode(codec("Event").encode(SAMPLES["Event"])[:10] + body)


def test_long_varints_and_block_sizes_are_read() -> None:
    """Multi-byte lengths, large longs, and a map written as a sized block (negative count)."""
    event = {
        "event_id": "e" * 20_000,
        "entity_id": "x",
        "event_time": 2**62,
        "features": {f"f{i}": -(2**40) + i for i in range(200)},
        "attributes": {},
        "model": None,
        "rule_set": None,
        "flags": [],
    }
    data = fastavro_bytes("Event", event)
    assert codec("Event").decode(data) == event

    def string(text: str) -> bytes:
        return zigzag(len(text.encode())) + text.encode()

    entry = string("a") + zigzag(3) + struct.pack("<d", 1.5)  # union branch 3 = double
    body = string("e") + string("x") + zigzag(7)
    body += zigzag(-1) + zigzag(len(entry)) + entry + zigzag(0)  # features: one sized block
    body += zigzag(0) * 4  # attributes, model = null, rule_set = null, flags
    data = fastavro_bytes("Event", {**event, "features": {}})[:10] + body
    expected = {**event, "event_id": "e", "event_time": 7, "features": {"a": 1.5}}
    assert codec("Event").decode(data) == fastavro_record("Event", data) == expected


EVENT_FIELDS = (
    "event_id",
    "entity_id",
    "event_time",
    "features",
    "attributes",
    "model",
    "rule_set",
    "flags",
)


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.sets(st.sampled_from(EVENT_FIELDS)), st.data())
def test_skipped_fields_are_checked_but_not_built(
    event: dict[str, Any], skipped: set[str], data: st.DataObject
) -> None:
    """A marking reader that skips fields gives the other fields and the same marks as one
    that builds them all, and fails on exactly the bodies that one fails on."""
    skip = tuple(sorted(skipped))
    after = ("event_time", "features", "attributes")
    good = codec("Event").encode(event)
    record, marks = codec("Event").decode_marking(good, after, skip)
    full, full_marks = codec("Event").decode_marking(good, after)
    assert marks == full_marks
    assert record == {k: v for k, v in full.items() if k not in skipped}
    broken = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        broken[data.draw(st.integers(10, len(broken) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(10, len(good)))
    for body in (bytes(broken), good[:cut]):
        try:
            expected = codec("Event").decode_marking(body, after)
        except CodecError:
            with pytest.raises(CodecError):
                codec("Event").decode_marking(body, after, skip)
            continue
        got, got_marks = codec("Event").decode_marking(body, after, skip)
        assert got_marks == expected[1]
        assert repr(got) == repr({k: v for k, v in expected[0].items() if k not in skipped})


def test_a_skipped_sized_block_and_a_bad_branch_in_it() -> None:
    """A map written as a sized block is walked like any other; a bad union branch inside a
    skipped map is the same typed error as when it is read."""

    def string(text: str) -> bytes:
        return zigzag(len(text.encode())) + text.encode()

    header = codec("Event").encode(SAMPLES["Event"])[:10]
    entry = string("a") + zigzag(3) + struct.pack("<d", 1.5)
    tail = zigzag(0) * 4  # attributes, model = null, rule_set = null, flags
    sized = string("e") + string("x") + zigzag(7) + zigzag(-1) + zigzag(len(entry)) + entry
    record, marks = codec("Event").decode_marking(
        header + sized + zigzag(0) + tail, ("features",), ("features",)
    )
    assert "features" not in record and record["event_time"] == 7
    assert marks == (10 + len(sized) + 1,)
    bad = string("e") + string("x") + zigzag(7) + zigzag(1) + string("a") + zigzag(9)
    for skip in ((), ("features",)):
        with pytest.raises(CodecError, match="union branch"):
            codec("Event").decode_marking(header + bad + zigzag(0) + tail, ("features",), skip)


def test_skipping_a_field_the_schema_lacks_is_refused() -> None:
    from scoremesh.contract.avro_compiled import UnsupportedSchema, compile_marking_decoder

    with pytest.raises(UnsupportedSchema, match="no top-level field 'nope' to skip"):
        compile_marking_decoder(codec("Event").current.raw, ("features",), ("nope",))
