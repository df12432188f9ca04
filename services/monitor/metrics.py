"""The monitor's Prometheus metrics. Names are stable: deploy/prometheus and Grafana use them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DRIFT_PSI = Gauge(
    "scoremesh_drift_psi",
    "PSI of the last window against the training reference (feature 'score' = the score)",
    ["model", "version", "feature"],
)
DRIFT_KS = Gauge(
    "scoremesh_drift_ks",
    "Kolmogorov-Smirnov D of the last window against the training reference",
    ["model", "version", "feature"],
)
DRIFT_DETECTED = Gauge(
    "scoremesh_drift_detected",
    "1 while a drift alert on this feature is firing at warning or above, else 0",
    ["model", "version", "feature"],
)
CLASS_SHIFT_PSI = Gauge(
    "scoremesh_prediction_class_psi",
    "PSI of the decided classes in the last window against the training reference",
    ["model", "version"],
)
NULL_RATE = Gauge(
    "scoremesh_feature_null_rate", "Null share in the last window", ["model", "version", "feature"]
)
RANGE_VIOLATION_RATE = Gauge(
    "scoremesh_feature_range_violation_rate",
    "Share outside the feature spec's [min, max] in the last window",
    ["model", "version", "feature"],
)
DETECTIONS = Counter(
    "scoremesh_drift_detections_total",
    "Online detector firings (every partition counts)",
    ["model", "version", "signal", "detector"],
)
ERROR_RATE = Gauge(
    "scoremesh_monitor_error_rate",
    "Error rate of labelled predictions, as estimated by the error-stream detector",
    ["model", "version"],
)
ALERT_TRANSITIONS = Counter(
    "scoremesh_alerts_total",
    "Alert records written, by transition",
    ["kind", "severity", "event"],
)
ALERTS_OPEN = Gauge("scoremesh_alerts_open", "Alerts firing now", ["kind", "severity"])
SKIPPED = Counter(
    "scoremesh_monitor_records_skipped_total",
    "Records the monitor could not use",
    ["topic", "reason"],
)
SINK_DELIVERIES = Counter(
    "scoremesh_alert_notifications_total",
    "Notification attempts that ended, by sink and outcome",
    ["sink", "outcome"],
)
SINK_DROPPED = Counter(
    "scoremesh_alert_notifications_dropped_total",
    "Notifications dropped because a sink's queue was full (oldest first)",
    ["sink"],
)
SINK_QUEUE = Gauge("scoremesh_alert_sink_queue_depth", "Notifications waiting", ["sink"])
ALERT_STORE_WRITES = Counter(
    "scoremesh_alert_store_writes_total", "Alert and drift-state writes to Redis", ["outcome"]
)
CONSUMER_LAG = Gauge(
    "scoremesh_consumer_lag",
    "Records behind the true end of the partition (high watermark)",
    ["group", "topic", "partition"],
)
CONSUMER_GROUP_LAG = Gauge(
    "scoremesh_consumer_group_lag", "Records behind, summed per group and topic", ["group", "topic"]
)
LAG_SCRAPE_ERRORS = Counter(
    "scoremesh_consumer_lag_errors_total", "Consumer-lag collections that failed"
)
REPLAYED = Counter(
    "scoremesh_monitor_replayed_total",
    "Records replayed to rebuild detector state after a start or rebalance",
    ["topic"],
)
SNAPSHOTS = Counter(
    "scoremesh_monitor_snapshots_total", "Detector snapshots written to monitor.state"
)
SNAPSHOT_RESTORES = Counter(
    "scoremesh_monitor_snapshot_restores_total",
    "Versions restored from monitor.state, by outcome",
    ["outcome"],
)
