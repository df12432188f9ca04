"""The join's output encoders write exactly the codec's bytes; outputs land where send() puts them."""

from __future__ import annotations

import random
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from services.common.codec import EncodeError, codec
from services.common.kafka import murmur2
from services.label_join.outputs import OutputEncoder


def random_string(rng: random.Random) -> str:
    alphabet = "abcXYZ019-_:é€ 😀"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 90)))


def random_feature(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randrange(-(2**63), 2**63),
            rng.randrange(-70, 70),
            rng.uniform(-1e12, 1e12),
            float("inf"),
            random_string(rng),
        ]
    )


def records(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    event_time = rng.randrange(0, 2**45)
    label_time = event_time + rng.randrange(-(10**6), 10**9)
    label = rng.choice(["0", "1", "fraud", random_string(rng)])
    decision = rng.choice(["0", "1", label])
    attributes = {random_string(rng): random_string(rng) for _ in range(rng.randrange(0, 4))}
    head = {
        "event_id": random_string(rng) or "e",
        "entity_id": random_string(rng),
        "event_time": event_time,
    }
    labeled = head | {
        "model": rng.choice(["credit", random_string(rng)]),
        "model_version": rng.choice(["1.0.0", "1.1.0"]),
        "variant": rng.choice(["champion", "shadow", "canary"]),
        "source": rng.choice(["stream", "sync"]),
        "score": rng.random(),
        "decision": decision,
        "label": label,
        "correct": decision == label,
        "label_time": label_time,
        "label_delay_ms": label_time - event_time,
        "attributes": attributes,
    }
    features = {random_string(rng): random_feature(rng) for _ in range(rng.randrange(0, 25))}
    example = head | {
        "features": features,
        "attributes": attributes,
        "label": label,
        "label_time": label_time,
    }
    return labeled, example


def test_the_output_encoders_write_the_codecs_bytes() -> None:
    encoder = OutputEncoder()
    assert encoder.fast, "the current schemas must match the layouts the encoder writes"
    labeled_codec, example_codec = codec("LabeledPrediction"), codec("TrainingExample")
    rng = random.Random(11)
    for _ in range(3000):
        labeled, example = records(rng)
        head = encoder.head(labeled["event_id"], labeled["entity_id"], labeled["event_time"])
        assert encoder.labeled(head, labeled) == labeled_codec.encode(labeled)
        assert encoder.example(head, example) == example_codec.encode(example)
        assert labeled_codec.decode(encoder.labeled(head, labeled)) == labeled


def test_values_the_fast_path_does_not_expect_get_the_codecs_answer() -> None:
    encoder = OutputEncoder()
    labeled, example = records(random.Random(3))
    head = encoder.head(labeled["event_id"], labeled["entity_id"], labeled["event_time"])
    with pytest.raises(EncodeError):
        encoder.labeled(head, labeled | {"label_time": "soon"})
    with pytest.raises(EncodeError):
        encoder.labeled(head, labeled | {"correct": 1})
    with pytest.raises(EncodeError):
        encoder.example(head, example | {"features": {"x": [1, 2]}})
    with pytest.raises(EncodeError):
        encoder.example(head, example | {"label_time": 2**64})


def test_murmur2_is_the_java_clients_partitioner() -> None:
    rng = random.Random(5)
    keys = [bytes(rng.randrange(256) for _ in range(n % 45)) for n in range(4000)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", "évt-€".encode(), b"evt-2027-12345"]
    for key in keys:
        assert murmur2(key) == aiokafka_murmur2(key)
