"""Predictions, labels and model versions for label-join tests, as the real topics carry them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import ConsumerRecord

from scoremesh.contract.codec import codec
from scoremesh.contract.featurespec import FeatureRule, FeatureSpec
from services.common.model_version import ModelVersion

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, an hour boundary
CHANNELS = ("web", "branch", "partner")

SPEC = FeatureSpec(
    features=[
        FeatureRule(name="age", dtype="long", min=18, max=100),
        FeatureRule(name="salary", dtype="double", min=0, max=500_000),
        FeatureRule(name="zipcode", dtype="long", categories=list(range(9))),
    ],
    classes=["0", "1"],
    positive_class="1",
    segments=["channel"],
)
AGE_EDGES = [18.0, 25, 30, 35, 40, 45, 50, 55, 60, 70, 100]
REFERENCE = {
    "features": {
        "age": {"kind": "numeric", "edges": AGE_EDGES},
        "salary": {"kind": "numeric", "edges": [float(x) for x in range(0, 110_000, 10_000)]},
        "zipcode": {"kind": "categorical", "shares": {str(i): 1 / 9 for i in range(9)}},
    }
}


def model_version(
    version: str = "1.0.0", stage: str = "champion", generation: int = 2, name: str = "credit"
) -> ModelVersion:
    return ModelVersion(
        name=name,
        version=version,
        stage=stage,
        generation=generation,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="0" * 64,
        artifact_size=1,
        feature_spec_json=SPEC.model_dump_json(),
        metadata_json=orjson.dumps(
            {"reference": REFERENCE, "holdout_metrics": {"f1": 0.9, "accuracy": 0.92}}
        ).decode(),
    )


def features(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "age": int(rng.integers(18, 90)),
        "salary": float(rng.uniform(0, 120_000)),
        "zipcode": int(rng.integers(0, 9)),
    }


def prediction(
    event_id: str,
    event_time: int,
    feats: dict[str, Any],
    p1: float,
    variant: str = "champion",
    version: str = "1.0.0",
    channel: str = "web",
    served: bool | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "entity_id": f"cust-{event_id}",
        "event_time": event_time,
        "features": feats,
        "attributes": {"channel": channel},
        "model": "credit",
        "model_version": version,
        "variant": variant,
        "served": variant == "champion" if served is None else served,
        "source": "stream",
        "score": p1,
        "scores": {"0": 1.0 - p1, "1": p1},
        "decision": "1" if p1 >= 0.5 else "0",
        "latency_ms": 1.0,
        "scored_at": event_time + 5,
    }


def label(event_id: str, value: str, label_time: int) -> dict[str, Any]:
    return {"event_id": event_id, "value": value, "label_time": label_time}


def encode_prediction(p: dict[str, Any]) -> bytes:
    return codec("Prediction").encode(p)


def encode_label(lab: dict[str, Any]) -> bytes:
    return codec("Label").encode(lab)


def record(topic: str, key: str | None, value: bytes, partition: int = 0, offset: int = 0) -> Any:
    raw_key = key.encode() if key is not None else None
    return ConsumerRecord(
        topic,
        partition,
        offset,
        int(time.time() * 1000),
        0,
        raw_key,
        value,
        None,
        len(raw_key or b""),
        len(value),
        [],
    )


@dataclass
class Scenario:
    """A labelled stream with every awkward case, and what the join must make of it."""

    predictions: list[dict[str, Any]]
    early_labels: list[dict[str, Any]]  # sent before any prediction
    labels: list[dict[str, Any]]  # sent after the predictions, before the flush
    late_labels: list[dict[str, Any]]  # arrive after the window closed: too_late
    unknown: list[dict[str, Any]]  # for events never predicted: unknown_event
    flush: list[dict[str, Any]]  # predictions far later: they close the first window
    truth: dict[str, str]  # the label that wins per event (only events that get one in time)
    label_times: dict[str, int]


def scenario(n: int = 600, seed: int = 5, window_ms: int = 86_400_000) -> Scenario:
    """n events with champion + shadow predictions over ~n seconds from T0. Of them:
    ~15 % never labelled, ~10 % labelled before their prediction arrives, ~10 % labelled twice
    with the same value, ~10 % corrected (a second, later, different label), ~5 % labelled
    only after the window closed; labels otherwise arrive in shuffled order."""
    rng = np.random.default_rng(seed)
    preds: list[dict[str, Any]] = []
    truth: dict[str, str] = {}
    label_times: dict[str, int] = {}
    early: list[dict[str, Any]] = []
    normal: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for i in range(n):
        event_id = f"e{i}"
        t = T0 + i * 1000
        feats = features(rng)
        y = "1" if rng.random() < 0.4 else "0"
        p1 = float(np.clip(rng.normal(0.7 if y == "1" else 0.3, 0.2), 0.0, 1.0))
        if i % 50 == 0:
            p1 = 1.0 if y == "0" else 0.0  # certain and wrong: exercises log-loss clipping
        channel = CHANNELS[i % 3]
        preds.append(prediction(event_id, t, feats, p1, channel=channel))
        shadow_p1 = float(np.clip(p1 + rng.normal(0, 0.1), 0.0, 1.0))
        preds.append(prediction(event_id, t, feats, shadow_p1, "shadow", "1.1.0", channel))
        kind = rng.random()
        delay = int(rng.integers(1_000, 3_600_000))
        if kind < 0.15:
            continue  # never labelled
        if kind < 0.20:
            late.append(label(event_id, y, t + window_ms + 5 * 3_600_000))
            continue
        lab = label(event_id, y, t + delay)
        truth[event_id] = y
        label_times[event_id] = t + delay
        if kind < 0.30:
            early.append(lab)
        elif kind < 0.40:
            normal.append(lab)
            normal.append(label(event_id, y, t + delay + 500))  # same value again: no change
        elif kind < 0.50:
            wrong = "0" if y == "1" else "1"
            normal.append(label(event_id, wrong, t + delay - 10_000))
            normal.append(lab)  # the correction: later label_time, different value
        elif kind < 0.55:
            normal.append(lab)
            wrong = "0" if y == "1" else "1"
            normal.append(label(event_id, wrong, t + delay - 60_000))  # older: ignored
        else:
            normal.append(lab)
    # arrival order does not decide which label wins (label_time does), so shuffle freely
    order = rng.permutation(len(normal))
    normal = [normal[i] for i in order]
    unknown = [label(f"u{j}", "1", T0 + j * 1000) for j in range(5)]  # never predicted
    flush_t = T0 + window_ms + 3 * 3_600_000 + n * 1000
    # enough flush events to reach every partition: watermarks are per partition
    flush = [prediction(f"f{j}", flush_t + j, features(rng), 0.5, channel="web") for j in range(60)]
    return Scenario(preds, early, normal, late, unknown, flush, truth, label_times)
