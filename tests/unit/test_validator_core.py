from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import RuleSet
from services.common.settings import Settings
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.validator.service import ValidatorCore

RECORD_TIME = 1767225600123


def record(value: bytes | None, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        "events.raw", 1, offset, RECORD_TIME, 0, b"cust-1", value, None, len(value or b""), 6, []
    )


@pytest.fixture
def core() -> ValidatorCore:
    c = ValidatorCore(Settings(max_event_bytes=64 * 1024, rejection_keep_bytes=1024))
    c.set_rules({"credit": RuleSet([CREDIT_SPEC], "credit@1.0.0#g2")}, frozenset({"credit"}))
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
        pytest.param(random.Random(64).randbytes(64), "undecodable", id="random-bytes"),
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


def test_restamped_avro_is_byte_identical_to_a_fresh_encoding(core: ValidatorCore) -> None:
    events = [good_event(i) for i in range(20)]
    outs = core.process([record(codec("Event").encode(e), i) for i, e in enumerate(events)])
    for event, out in zip(events, outs, strict=True):
        stamped = {**event, "model": "credit", "rule_set": "credit@1.0.0#g2", "flags": []}
        assert out.value == codec("Event").encode(stamped)
        assert out.headers == [("model", b"credit")]


def test_events_go_to_their_own_models_rules_and_unknown_models_are_dead_lettered() -> None:
    fraud_spec = CREDIT_SPEC.model_copy(update={"features": CREDIT_SPEC.features[:3]})
    core = ValidatorCore(Settings(max_event_bytes=64 * 1024))
    core.set_rules(
        {
            "credit": RuleSet([CREDIT_SPEC], "credit@1.0.0#g2"),
            "fraud": RuleSet([fraud_spec], "fraud@2.0.0#g5"),
        },
        frozenset({"credit", "fraud", "churn"}),
    )
    fraud_event = {
        **good_event(0),
        "model": "fraud",
        "features": {r.name: good_event(0)["features"][r.name] for r in fraud_spec.features},
    }
    outs = core.process(
        [
            record(codec("Event").encode(fraud_event), 0),  # Avro, stamped in place
            record(orjson.dumps({**good_event(1), "model": "fraud"}), 1),  # credit's features
            record(orjson.dumps({**good_event(2), "model": "churn"}), 2),  # no champion
            record(orjson.dumps({**good_event(3), "model": "nope"}), 3),  # never registered
            record(orjson.dumps({**good_event(4), "model": 7}), 4),
            record(orjson.dumps(good_event(5)), 5),  # no model: the default
        ]
    )
    valid = codec("Event").decode(outs[0].value)
    assert valid["model"] == "fraud" and valid["rule_set"] == "fraud@2.0.0#g5"
    assert outs[0].value == codec("Event").encode({**fraud_event, "rule_set": "fraud@2.0.0#g5"})
    assert outs[0].headers == [("model", b"fraud")]
    flagged = codec("Event").decode(outs[1].value)  # fraud's rules, credit's extra features
    assert flagged["rule_set"] == "fraud@2.0.0#g5" and flagged["flags"] == ["unknown_feature"]
    codes = [rejection(o)["reasons"][0]["code"] for o in outs[2:5]]
    assert codes == ["model_unavailable", "unknown_model", "invalid_envelope"]
    assert "scoremesh dlq replay --model churn" in rejection(outs[2])["reasons"][0]["message"]
    default = codec("Event").decode(outs[5].value)
    assert default["model"] == "credit" and outs[5].headers == [("model", b"credit")]


def test_a_json_event_without_event_time_takes_the_record_timestamp(core: ValidatorCore) -> None:
    event = good_event()
    del event["event_time"]
    (out,) = core.process([record(orjson.dumps(event))])
    valid = codec("Event").decode(out.value)
    assert valid["event_time"] == RECORD_TIME
    assert valid["flags"] == ["event_time_from_record"]
    bad = {**good_event(1), "event_time": "yesterday"}
    (out,) = core.process([record(orjson.dumps(bad))])
    assert rejection(out)["reasons"][0]["field"] == "event_time"


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
