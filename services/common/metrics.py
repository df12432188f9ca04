"""Prometheus metrics shared by the services. Names are stable: rules and dashboards use them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

EVENTS_IN = Counter("scoremesh_events_consumed_total", "Records consumed", ["service", "topic"])
EVENTS_OUT = Counter("scoremesh_events_produced_total", "Records produced", ["service", "topic"])
REJECTED = Counter(
    "scoremesh_events_rejected_total", "Events sent to the dead-letter topic", ["service", "reason"]
)
FLAGGED = Counter("scoremesh_events_flagged_total", "Events that passed with a flag", ["reason"])
FEATURE_NULLS = Counter(
    "scoremesh_feature_null_total",
    "Null or missing values seen per model and feature",
    ["model", "feature"],
)
FEATURE_SEEN = Counter(
    "scoremesh_feature_seen_total",
    "Valid events seen per model and feature (null-rate denominator)",
    ["model", "feature"],
)
BATCH_SIZE = Histogram(
    "scoremesh_batch_size",
    "Records per processed batch",
    ["service"],
    buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 4096),
)
BATCH_SECONDS = Histogram(
    "scoremesh_batch_seconds",
    "Wall time to process and acknowledge one batch",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PREDICTIONS = Counter(
    "scoremesh_predictions_total", "Predictions made", ["model", "version", "variant", "source"]
)
PREDICTION_LATENCY = Histogram(
    "scoremesh_prediction_latency_seconds",
    "From consuming an event to its prediction",
    ["model", "version", "variant"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
SCORING_ERRORS = Counter(
    "scoremesh_scoring_errors_total", "Batches the model could not score", ["model", "version"]
)
MODEL_LOAD_FAILURES = Counter(
    "scoremesh_model_load_failures_total",
    "Model versions that failed to load",
    ["model", "version"],
)
ACTIVE_VERSION = Info(
    "scoremesh_active_model", "The model versions being served, per model", ["model"]
)
REDIS_WRITES = Counter(
    "scoremesh_query_store_writes_total", "Prediction writes to the query store", ["outcome"]
)
REGISTRY_RECORDS_SKIPPED = Counter(
    "scoremesh_registry_records_skipped_total", "Unreadable models.registry records"
)
COMMANDS = Counter(
    "scoremesh_registry_commands_total", "Registry commands handled", ["action", "outcome"]
)
KAFKA_UP = Gauge("scoremesh_kafka_connected", "1 when the last Kafka call succeeded", ["service"])
