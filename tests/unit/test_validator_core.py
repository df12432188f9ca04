from __future__ import annotations

import math
import os
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import RuleSet
from services.common.settings import Settings
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.validator.service import ValidatorCore, WindowedRate


def record(value: bytes | None, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        "events.raw", 1, offset, 0, 0, b"cust-1", value, None, len(value or b""), 6, []
    )


@pytest.fixture
def core() -> ValidatorCore:
    c = ValidatorCore(Settings(max_event_bytes=64 * 1024, rejection_keep_bytes=1024))
    c.set_rules(RuleSet([CREDIT_SPEC], "credit@1.0.0#g2"))
    return c


def good_event(i: int = 0) -> dict[str, Any]:
    return list(credit_events(i + 1, seed=5))[i][0]


def rejection(out: Any) -> dict[str, Any]:
    assert out.topic == "events.rejected"
    return codec("Rejection").decode(out.value)


def test_valid_avro_and_json_go_to_events_valid(core: ValidatorCore) -> None:
    outs = core.process(
        [record(codec("Event").encode(good_event(0))), record(orjson.dumps(good_event(1)), 1)]
    )
    assert [o.topic for o in outs] == ["events.valid", "events.valid"]
    decoded = codec("Event").decode(outs[1].value)
    assert decoded["rule_set"] == "credit@1.0.0#g2"
    assert outs[1].key == decoded["entity_id"].encode()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (os.urandom(64), "undecodable"),
        (b"", "undecodable"),
        (None, "undecodable"),
        (b"x" * (5 * 1024 * 1024), "too_large"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown_schema"),
        (b"[" * 5000 + b"]" * 5000, "undecodable"),  # deep nesting
        (b'{"event_id": "\xff\xfe"}', "undecodable"),  # invalid UTF-8
    ],
)
def test_poison_bytes_are_dead_lettered_with_a_reason(
    core: ValidatorCore, value: bytes | None, reason: str
) -> None:
    (out,) = core.process([record(value, 7)])
    rej = rejection(out)
    assert rej["reasons"][0]["code"] == reason
    assert rej["source_offset"] == 7 and rej["source_topic"] == "events.raw"
    assert rej["size"] == len(value or b"")
    assert len(rej["original"]) <= 1024
    assert rej["truncated"] == (len(value or b"") > 1024)


def test_string_where_a_number_belongs(core: ValidatorCore) -> None:
    e = good_event()
    e["features"]["salary"] = "lots"
    (out,) = core.process([record(orjson.dumps(e))])
    rej = rejection(out)
    assert rej["reasons"] == [
        {
            "code": "wrong_type",
            "field": "salary",
            "message": "feature 'salary' must be double, got str 'lots'",
        }
    ]
    assert rej["event_id"] == e["event_id"] and rej["rule_set"] == "credit@1.0.0#g2"


def test_nan_in_avro_is_rejected(core: ValidatorCore) -> None:
    e = good_event()
    e["features"]["loan"] = math.nan
    (out,) = core.process([record(codec("Event").encode(e))])
    assert rejection(out)["reasons"][0]["code"] == "not_finite"


def test_a_bad_event_does_not_affect_its_batch(core: ValidatorCore) -> None:
    batch = [record(codec("Event").encode(good_event(i)), i) for i in range(5)]
    batch.insert(2, record(b"garbage", 99))
    outs = core.process(batch)
    assert [o.topic for o in outs].count("events.valid") == 5
    assert [o.topic for o in outs].count("events.rejected") == 1


def test_windowed_reject_rate() -> None:
    rate = WindowedRate(window_s=10)
    rate.add(100, 10, now=1000)
    assert rate.add(100, 30, now=1005) == pytest.approx(0.2)
    assert rate.add(100, 0, now=1020) == 0.0  # old buckets expired


def test_restamped_avro_is_byte_identical_to_a_fresh_encoding(core: ValidatorCore) -> None:
    events = [good_event(i) for i in range(20)]
    outs = core.process([record(codec("Event").encode(e), i) for i, e in enumerate(events)])
    for event, out in zip(events, outs, strict=True):
        expected = codec("Event").encode({**event, "rule_set": "credit@1.0.0#g2", "flags": []})
        assert out.value == expected


def test_inputs_that_need_normalising_or_carry_a_stamp_are_encoded_again(
    core: ValidatorCore,
) -> None:
    e = good_event()
    e["features"]["salary"] = 52000  # a long where the spec wants a double
    stamped = {**good_event(1), "rule_set": "forged@9.9.9", "flags": ["x"]}
    reordered = {
        **good_event(2),
        "features": dict(reversed(list(good_event(2)["features"].items()))),
    }
    outs = core.process(
        [record(codec("Event").encode(x), i) for i, x in enumerate((e, stamped, reordered))]
    )
    decoded = [codec("Event").decode(o.value) for o in outs]
    assert type(decoded[0]["features"]["salary"]) is float
    assert decoded[1]["rule_set"] == "credit@1.0.0#g2" and decoded[1]["flags"] == []
    assert (
        decoded[2]["features"] == reordered["features"]
        and decoded[2]["rule_set"] == "credit@1.0.0#g2"
    )
