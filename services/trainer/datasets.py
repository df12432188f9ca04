"""Data that ships inside installed packages: River's Agrawal loan-applications generator.

Nothing is downloaded. The same generator feeds the bootstrap model, the demo stream,
the tests and the benchmarks, with fixed seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from river.datasets import synth

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, LatencyGate, ReadinessGates

DATASET = "river.datasets.synth.Agrawal"
CHANNELS = ("web", "branch", "partner")

CREDIT_SPEC = FeatureSpec(
    features=[
        FeatureRule(name="salary", dtype="double", min=0, max=500_000, description="yearly salary"),
        FeatureRule(
            name="commission",
            dtype="double",
            nullable=True,
            impute=0.0,
            min=0,
            max=200_000,
            description="yearly commission; null when none",
        ),
        FeatureRule(name="age", dtype="long", min=18, max=100),
        FeatureRule(
            name="elevel", dtype="long", categories=[0, 1, 2, 3, 4], description="education level"
        ),
        FeatureRule(
            name="car",
            dtype="long",
            min=1,
            max=20,
            range_action="flag",
            description="car make code; new makes pass with a flag",
        ),
        FeatureRule(name="zipcode", dtype="long", categories=list(range(9))),
        FeatureRule(name="hvalue", dtype="double", min=0, max=5_000_000),
        FeatureRule(name="hyears", dtype="long", min=0, max=60),
        FeatureRule(name="loan", dtype="double", min=0, max=2_000_000),
    ],
    classes=["0", "1"],
    positive_class="1",
    segments=["channel"],
    gates=ReadinessGates(
        min_metrics={"f1": 0.8, "roc_auc": 0.85},
        latency=[LatencyGate(batch_size=1, p99_ms=5.0), LatencyGate(batch_size=256, p99_ms=25.0)],
        max_artifact_bytes=50 * 1024 * 1024,
        min_class_share=0.05,
    ),
)


def agrawal_rows(
    n: int, seed: int, classification_function: int = 0
) -> Iterator[tuple[dict[str, Any], str]]:
    """(features, label) pairs; commission 0 is reported as null, as a real source would."""
    generator = synth.Agrawal(
        classification_function=classification_function, seed=seed, perturbation=0.1
    )
    for x, y in itertools.islice(generator, n):
        features = dict(x)
        features["commission"] = float(x["commission"]) or None
        features["salary"] = float(x["salary"])
        features["hvalue"] = float(x["hvalue"])
        features["loan"] = float(x["loan"])
        yield features, str(int(y))


def credit_events(
    n: int,
    seed: int,
    classification_function: int = 0,
    start_ms: int = 1_767_225_600_000,
    step_ms: int = 1_000,
    entities: int = 5_000,
    id_prefix: str = "evt",
) -> Iterator[tuple[dict[str, Any], str]]:
    """Event envelopes with their true labels."""
    for i, (features, label) in enumerate(agrawal_rows(n, seed, classification_function)):
        event = envelope(i, f"{id_prefix}-{seed}-{i}", features, seed, start_ms, step_ms, entities)
        yield event, label


def envelope(
    i: int,
    event_id: str,
    features: dict[str, Any],
    seed: int,
    start_ms: int,
    step_ms: int,
    entities: int = 5_000,
) -> dict[str, Any]:
    """The i-th event of a synthetic stream: a sticky entity, a steady clock, a channel."""
    return {
        "event_id": event_id,
        "entity_id": f"cust-{(i * 7919 + seed) % entities}",
        "event_time": start_ms + i * step_ms,
        "features": features,
        "attributes": {"channel": CHANNELS[i % len(CHANNELS)]},
    }
