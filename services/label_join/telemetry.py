"""Prometheus metrics of the label join (names are stable: rules and dashboards use them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UNMATCHED = Counter(
    "scoremesh_labels_unmatched_total", "Labels sent to labels.unmatched", ["reason"]
)
EXPIRED_UNLABELED = Counter(
    "scoremesh_predictions_expired_unlabeled_total",
    "Predictions whose join window closed before a label arrived",
    ["model", "version", "variant"],
)
LABEL_DELAY = Histogram(
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
