"""Seeded streams for the monitor tests: credit predictions scored by a real ONNX model."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import codec
from services.common.batchloop import Record
from services.common.model_version import ModelVersion, VersionMetadata
from services.common.onnx_model import LoadedModel, make_session
from services.common.serving.models import ServingSet
from services.common.serving.scoring import score_events
from services.trainer.datasets import CREDIT_SPEC, credit_events


def credit_version(onnx: bytes, metadata: VersionMetadata, version: str = "1.0.0") -> ModelVersion:
    return ModelVersion(
        name="credit",
        version=version,
        stage="champion",
        generation=2,
        artifact_uri="kafka://models.artifacts/0/0?chunks=1",
        artifact_sha256="0" * 64,
        artifact_size=len(onnx),
        feature_spec_json=CREDIT_SPEC.model_dump_json(),
        metadata_json=metadata.model_dump_json(),
    )


def loaded(onnx: bytes, version: ModelVersion) -> LoadedModel:
    return LoadedModel(version, make_session(onnx, 1))


def predictions(
    model: LoadedModel,
    n: int,
    seed: int,
    drift_at: int | None = None,
    drift: dict[str, float] | None = None,
    batch: int = 2_000,
) -> Iterator[dict[str, Any]]:
    """Scored credit events; from index ``drift_at`` on, features are multiplied."""
    serving = ServingSet(champion=model)
    events = [e for e, _ in credit_events(n, seed=seed)]
    if drift_at is not None and drift:
        for e in events[drift_at:]:
            for name, factor in drift.items():
                value = e["features"][name]
                if value is not None:
                    e["features"][name] = type(value)(value * factor)
    for start in range(0, n, batch):
        yield from score_events(
            serving, events[start : start + batch], "stream", time.perf_counter()
        ).predictions


def labeled(prediction: dict[str, Any], label: str, label_delay_ms: int = 60_000) -> dict[str, Any]:
    return {
        "event_id": prediction["event_id"],
        "entity_id": prediction["entity_id"],
        "event_time": prediction["event_time"],
        "model": prediction["model"],
        "model_version": prediction["model_version"],
        "variant": prediction["variant"],
        "source": prediction["source"],
        "score": prediction["score"],
        "decision": prediction["decision"],
        "label": label,
        "correct": prediction["decision"] == label,
        "label_time": prediction["event_time"] + label_delay_ms,
        "label_delay_ms": label_delay_ms,
        "attributes": prediction["attributes"],
    }


def as_records(
    topic: str, schema: str, values: Sequence[dict[str, Any]], partitions: int = 6
) -> list[Record]:
    """ConsumerRecords as a consumer would see them: partitioned by event_id order."""
    encode = codec(schema).encode
    offsets = [0] * partitions
    out: list[Record] = []
    for i, value in enumerate(values):
        p = i % partitions
        data = encode(value)
        out.append(
            ConsumerRecord(
                topic, p, offsets[p], 0, 0, value["event_id"].encode(), data, None, 0, len(data), []
            )
        )
        offsets[p] += 1
    return out
