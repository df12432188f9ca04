from __future__ import annotations

import pytest

from scoremesh.contract.catalog import catalog
from scoremesh.contract.codec import (
    MAGIC,
    BadBody,
    NotSingleObject,
    TruncatedMessage,
    UnknownFingerprint,
    all_schema_versions,
    codec,
    decode_any,
)
from tests.contract.samples import SAMPLES


def test_every_topic_value_has_a_schema_and_every_schema_a_sample() -> None:
    names = set(all_schema_versions())
    assert {spec.value for spec in catalog().values() if "avro" in spec.value_formats} <= names
    assert names == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_roundtrip(name: str) -> None:
    c = codec(name)
    data = c.encode(SAMPLES[name])
    assert data[:2] == MAGIC
    assert c.decode(data) == SAMPLES[name]


def test_typed_errors() -> None:
    c = codec("Event")
    good = c.encode(SAMPLES["Event"])
    with pytest.raises(TruncatedMessage):
        c.decode(good[:-5])
    with pytest.raises(UnknownFingerprint, match="unknown schema fingerprint"):
        c.decode(MAGIC + b"\x00" * 8 + good[10:])
    with pytest.raises(NotSingleObject):
        c.decode(b'{"json": true}')
    with pytest.raises(NotSingleObject):
        c.decode(b"")
    with pytest.raises(TruncatedMessage, match="header ends early"):
        c.decode(MAGIC + b"\x01\x02")
    with pytest.raises(BadBody):
        c.decode(good[:10] + b"\xff" * 40)


def test_decode_any_accepts_json_objects_only() -> None:
    assert decode_any("events.raw", b'{"event_id": "e"}') == {"event_id": "e"}
    with pytest.raises(BadBody, match="not an object"):
        decode_any("events.raw", b"[1, 2]")
    with pytest.raises(BadBody):
        decode_any("events.raw", b"\xff\xfe garbage")


def test_encode_error_names_the_schema() -> None:
    with pytest.raises(Exception, match="Event: cannot encode"):
        codec("Event").encode({"event_id": 1})
