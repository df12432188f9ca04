"""The join's own partitioning and JSON labels, without a broker."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from fastavro import schemaless_writer

from scoremesh.contract.codec import MAGIC, all_schema_versions, codec
from scoremesh.contract.partitioner import partitions_for_keys
from services.label_join.join import JoinCore
from services.label_join.repartition import (
    KIND_HEADER,
    Repartitioner,
    _event_id_first,
    event_id_of,
    repartition_record,
)
from tests.label_join.factories import T0, encode_label, encode_prediction, label, prediction
from tests.label_join.test_join_core import make_core

PARTITIONS = 6
FEATURES = {"age": 30, "salary": 1.0, "zipcode": 1}


def rec(
    topic: str,
    value: bytes,
    partition: int,
    timestamp: int = T0,
    headers: list[tuple[str, bytes]] | None = None,
    key: bytes | None = None,
) -> Any:
    return ConsumerRecord(
        topic, partition, 0, timestamp, 0, key, value, None, 0, len(value), headers or []
    )


def label_v1(event_id: str) -> bytes:
    """A Label as a producer with the first released schema writes it."""
    v1 = all_schema_versions()["Label"][0]
    body = io.BytesIO()
    schemaless_writer(body, v1.parsed, {"event_id": event_id, "value": "1", "label_time": T0})
    return MAGIC + v1.fingerprint + body.getvalue()


def home(event_id: str) -> int:
    return partitions_for_keys([event_id.encode()], PARTITIONS)[0]


def router() -> Repartitioner:
    return Repartitioner("predictions", "labels", "label-join.repartition", PARTITIONS)


def test_event_id_is_read_from_every_label_and_prediction_version_and_json() -> None:
    first = _event_id_first()
    assert len(first) == 3  # Label v1, v2 and Prediction v1 all start with event_id
    long_id = "e-" + "x" * 300  # a length that takes two varint bytes
    for event_id in ("e1", long_id):
        p = encode_prediction(prediction(event_id, T0, FEATURES, 0.7))
        assert event_id_of(p, first) == event_id.encode()
        assert event_id_of(encode_label(label(event_id, "1", T0)), first) == event_id.encode()
        assert event_id_of(label_v1(event_id), first) == event_id.encode()
        assert event_id_of(orjson.dumps({"event_id": event_id}), first) == event_id.encode()
    for nothing in (
        b"",
        b"\x00garbage",
        b"[1, 2]",
        orjson.dumps({"event_id": 7}),
        orjson.dumps({"event_id": ""}),
        b"\xc3\x01" + b"\x00" * 8 + b"\x04ab",  # a fingerprint no Label or Prediction has
        encode_label(label("e1", "1", T0))[:11],  # the id's bytes cut off
    ):
        assert event_id_of(nothing, first) is None, nothing


def test_records_on_their_event_ids_partition_stay_and_the_others_are_forwarded() -> None:
    r = router()
    ids = [f"e{i}" if i % 10 else f"e{i}-" + "y" * 70 for i in range(40)]  # some ids > 63 bytes
    batch = []
    for i, event_id in enumerate(ids):
        wrong = (home(event_id) + 1) % PARTITIONS
        partition = home(event_id) if i % 2 else wrong
        if i % 4 < 2:
            value = encode_prediction(prediction(event_id, T0, FEATURES, 0.7))
            batch.append(rec("predictions", value, partition))
        elif i % 8 < 6:
            batch.append(rec("labels", encode_label(label(event_id, "1", T0)), partition))
        else:
            batch.append(rec("labels", orjson.dumps({"event_id": event_id, "value": 1}), partition))
    batch.append(rec("labels", b"\x00garbage", 3))  # no event_id: stays, the join says why
    routed = r.route(batch)
    kept = routed.predictions + routed.labels
    assert len(kept) == 21 and len(routed.forwards) == 20
    assert all(x.partition == home(event_id_of(x.value, r._avro_first).decode()) for x in kept[:-1])
    assert routed.labels[-1].value == b"\x00garbage"
    for f in routed.forwards:
        assert f.partition == home(f.event_id.decode()) != f.record.partition
        assert f.kind == ("prediction" if f.record.topic == "predictions" else "label")
    assert {f.kind for f in routed.forwards} == {"label", "prediction"}

    # forwarded records come back on the repartition topic, on their partition: kept, by kind
    back = [
        rec("label-join.repartition", f.record.value, f.partition, headers=[(KIND_HEADER, k)])
        for f in routed.forwards
        for k in [f.kind.encode()]
    ]
    again = r.route(back)
    assert not again.forwards
    assert len(again.predictions) == sum(f.kind == "prediction" for f in routed.forwards)
    assert len(again.labels) == sum(f.kind == "label" for f in routed.forwards)

    r.check = False  # what the join did before: everything where it arrived
    unchecked = r.route(batch)
    assert not unchecked.forwards and len(unchecked.predictions + unchecked.labels) == 41


def test_a_label_forwarded_to_its_partition_joins_there() -> None:
    core: JoinCore = make_core()
    for p in range(PARTITIONS):
        core.restore(p, [])
    r = router()
    event_id = "e7"
    right, wrong = home(event_id), (home(event_id) + 2) % PARTITIONS
    pred = rec("predictions", encode_prediction(prediction(event_id, T0, FEATURES, 0.7)), right)
    lab = rec("labels", orjson.dumps({"event_id": event_id, "value": "1"}), wrong, T0 + 5_000)
    routed = r.route([pred, lab])
    result = core.process(routed.predictions, routed.labels)
    assert not [o for o in result.outputs if o.topic == "predictions.labeled"]
    (f,) = routed.forwards
    back = rec("label-join.repartition", f.record.value, f.partition, f.record.timestamp)
    back.headers.append((KIND_HEADER, b"label"))
    again = r.route([back])
    result = core.process(again.predictions, again.labels)
    (labeled,) = [o for o in result.outputs if o.topic == "predictions.labeled"]
    row = codec("LabeledPrediction").decode(labeled.value)
    assert (row["event_id"], row["label"], row["label_time"]) == (event_id, "1", T0 + 5_000)
    # the same label forwarded twice (a crash before the input's commit): counted once
    result = core.process([], again.labels)
    assert not result.outputs and core.counts["label_duplicate"] == 1


def test_json_labels_follow_the_rules_of_json_events() -> None:
    core = make_core()
    p = prediction("x1", T0, FEATURES, 0.8)
    q = prediction("x2", T0, FEATURES, 0.2)
    core.process([rec("predictions", encode_prediction(e), 0) for e in (p, q)], [])
    good = [
        rec("labels", orjson.dumps({"event_id": "x1", "value": 1}), 0, T0 + 7),  # record time
        rec(
            "labels",
            orjson.dumps({"event_id": "x2", "value": "0", "label_time": "2026-01-01T00:00:09Z"}),
            0,
        ),
    ]
    result = core.process([], good)
    rows = [
        codec("LabeledPrediction").decode(o.value)
        for o in result.outputs
        if o.topic == "predictions.labeled"
    ]
    assert sorted((r["event_id"], r["label"], r["label_time"]) for r in rows) == [
        ("x1", "1", T0 + 7),
        ("x2", "0", T0 + 9_000),
    ]


@pytest.mark.parametrize(
    ("value", "timestamp", "reason", "event_id", "detail"),
    [
        (b"[1, 2]", T0, "undecodable", None, "not an object"),
        (b"{not json", T0, "undecodable", None, "neither Avro single-object nor JSON"),
        (orjson.dumps({"value": "1"}), T0, "invalid_label", None, "event_id"),
        (orjson.dumps({"event_id": "x1", "value": "1"}), -1, "invalid_label", "x1", "timestamp"),
        (
            orjson.dumps({"event_id": "x1", "value": "1", "label_time": "yesterday"}),
            T0,
            "invalid_label",
            "x1",
            "label_time",
        ),
        (orjson.dumps({"event_id": "x1", "value": [1]}), T0, "invalid_label", "x1", "value"),
        (
            orjson.dumps({"event_id": "x1", "value": "1", "model": 3}),
            T0,
            "invalid_label",
            "x1",
            "model",
        ),
        (orjson.dumps({"event_id": "x1", "value": "7"}), T0, "invalid_class", "x1", "classes"),
    ],
)
def test_bad_json_labels_go_to_unmatched_with_the_reason(
    value: bytes, timestamp: int, reason: str, event_id: str | None, detail: str
) -> None:
    core = make_core()
    result = core.process([], [rec("labels", value, 0, timestamp)])
    (out,) = result.outputs
    unmatched = codec("UnmatchedLabel").decode(out.value)
    assert (unmatched["reason"], unmatched["event_id"]) == (reason, event_id)
    assert detail in unmatched["detail"] and unmatched["original"] == value


def test_repartition_records_read_back_for_people() -> None:
    p = prediction("x1", T0, FEATURES, 0.8)
    assert repartition_record(encode_prediction(p))["prediction"]["event_id"] == "x1"
    assert repartition_record(encode_label(label("x1", "1", T0)))["label"]["value"] == "1"
    assert repartition_record(b'{"event_id": "x1"}') == {"label": {"event_id": "x1"}}
