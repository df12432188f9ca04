"""The label join's lock-free histogram exposes exactly what prometheus_client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from services.label_join.telemetry import LabelHistogram


def _series(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_same_exposition_as_prometheus_client() -> None:
    reference, ours = CollectorRegistry(), CollectorRegistry()
    buckets = (1, 10, 60, 3600)
    expected = Histogram(
        "d_seconds", "delay", ["model", "variant"], buckets=buckets, registry=reference
    )
    histogram = LabelHistogram("d_seconds", "delay", ["model", "variant"], buckets, ours)
    values = [0, 0.5, 1, 1.0001, 10, 59.9, 60, 61, 3600, 1e9, 7.25]
    for i, v in enumerate(values):
        variant = "champion" if i % 3 else "shadow"
        expected.labels("credit", variant).observe(v)
        histogram.observe(("credit", variant), v)
    assert _series(ours) == _series(reference)
    counts = [
        ours.get_sample_value("d_seconds_count", {"model": "credit", "variant": variant})
        for variant in ("champion", "shadow")
    ]
    assert sum(c or 0 for c in counts) == 11


def test_negative_counts_as_zero_and_labels_are_checked() -> None:
    histogram = LabelHistogram("n_seconds", "x", ["model"], (1,), CollectorRegistry())
    histogram.observe(("m",), -5)
    assert (
        'n_seconds_bucket{le="1.0",model="m"} 1.0'
        in generate_latest(_registry_of(histogram)).decode()
    )
    with pytest.raises(ValueError, match="takes labels"):
        histogram.observe(("m", "extra"), 1)


def _registry_of(histogram: LabelHistogram) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(histogram)
    return registry
