"""Prometheus metrics of the label join (names are stable: rules and dashboards use them)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LabelHistogram(Collector):
    """A Prometheus histogram whose observation is one bisect and two additions.

    The join observes every label; prometheus_client's Histogram takes a lock and scans the
    buckets per observation, which was 3 % of a join process's CPU. The scrape thread reads
    the cells without a lock, so a scrape may see a count one label ahead of its sum.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        # label values -> [count per bucket ..., count above the last bound, sum]
        self._cells: dict[tuple[str, ...], list[float]] = {}
        if registry is not None:
            registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """One observation; a negative value counts as 0."""
        cells = self._cells.get(labels)
        if cells is None:
            if len(labels) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")
            cells = self._cells[labels] = [0.0] * (len(self.bounds) + 2)
        if value < 0:
            value = 0.0
        cells[bisect.bisect_left(self.bounds, value)] += 1
        cells[-1] += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, held in list(self._cells.items()):
            cells = list(held)
            cumulative = list(itertools.accumulate(cells[:-1]))
            bounds = [*map(floatToGoString, self.bounds), "+Inf"]
            buckets = list(zip(bounds, cumulative, strict=True))
            family.add_metric(list(key), buckets, cells[-1])
        yield family


UNMATCHED = Counter(
    "scoremesh_labels_unmatched_total", "Labels sent to labels.unmatched", ["reason"]
)
REPARTITIONED = Counter(
    "scoremesh_label_join_repartitioned_total",
    "Labels and predictions that arrived on another partition than murmur2 of their event_id "
    "picks, forwarded to it through label-join.repartition",
    ["kind"],
)
EXPIRED_UNLABELED = Counter(
    "scoremesh_predictions_expired_unlabeled_total",
    "Predictions whose join window closed before a label arrived",
    ["model", "version", "variant"],
)
LABEL_DELAY = LabelHistogram(
    "scoremesh_label_delay_seconds",
    "From the event time of a prediction to the label_time of its label",
    ["model", "variant"],
    buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
)
JOIN_STATE_ENTRIES = Gauge(
    "scoremesh_label_join_state_entries",
    "Events held in the join state (pending, joined, and expired markers)",
)
JOIN_RESTORE_SECONDS = Gauge(
    "scoremesh_label_join_restore_seconds",
    "How long the last restore of the join state from its changelog took",
)
PERFORMANCE = Gauge(
    "scoremesh_model_performance",
    "Model performance over the sliding window of labelled predictions",
    ["model", "version", "variant", "segment", "metric"],
)
STATS_PUBLISH_FAILURES = Counter(
    "scoremesh_label_join_stats_publish_failures_total",
    "Failed publications of monitoring stats (Kafka or Redis)",
    ["sink"],
)
