from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from scoremesh.contract.catalog import CatalogError, catalog, parse_catalog
from services.common.routing import canary_bucket, in_canary
from services.common.settings import Settings, env_names

DESIGN_TOPICS = {
    "events.raw",
    "events.valid",
    "events.rejected",
    "predictions",
    "labels",
    "labels.unmatched",
    "predictions.labeled",
    "training.examples",
    "monitoring.stats",
    "alerts",
    "retrain.requests",
    "retrain.results",
    "label-join.changelog",
    "models.commands",
    "models.registry",
    "models.artifacts",
    "deployments.log",
}


def test_catalog_declares_every_design_topic() -> None:
    assert set(catalog()) >= DESIGN_TOPICS  # internal topics come on top


def test_catalog_invariants_from_design() -> None:
    topics = catalog()
    assert topics["predictions"].key == "event_id" and topics["labels"].key == "event_id"
    assert topics["predictions"].partitions == topics["labels"].partitions
    assert topics["models.registry"].partitions == 1
    assert topics["models.registry"].cleanup_policy == "compact"
    assert topics["deployments.log"].retention_ms == -1


def test_catalog_errors_name_the_topic() -> None:
    with pytest.raises(CatalogError, match="'x' lacks 'key'"):
        parse_catalog({"topics": {"x": {"value": "Event", "partitions": 1}}})


def test_settings_read_env_prefix_and_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOREMESH_KAFKA_BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("SCOREMESH_BATCH_MAX_RECORDS", "64")
    s = Settings()
    assert s.kafka_bootstrap == "broker:9092" and s.batch_max_records == 64
    with pytest.raises(ValidationError):
        s.batch_max_records = 5  # type: ignore[misc]


def test_bad_setting_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOREMESH_BATCH_MAX_RECORDS", "lots")
    with pytest.raises(ValidationError, match="batch_max_records"):
        Settings()


def test_dev_stack_file_is_a_lower_priority_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOREMESH_HOME", str(tmp_path))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(
        json.dumps({"settings": {"kafka_bootstrap": "127.0.0.1:1234", "kafka_idempotence": False}})
    )
    assert Settings().kafka_bootstrap == "127.0.0.1:1234"
    assert Settings().kafka_idempotence is False
    monkeypatch.setenv("SCOREMESH_KAFKA_BOOTSTRAP", "env:9092")
    assert Settings().kafka_bootstrap == "env:9092"


def test_no_environ_reads_outside_settings() -> None:
    root = Path(__file__).resolve().parents[2] / "services"
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if str(p.relative_to(root)) not in ("common/settings.py", "demo/runner.py")
        and re.search(r"os\.environ|os\.getenv", p.read_text())
    ]
    assert offenders == []


def test_canary_bucket_is_stable_and_uniform() -> None:
    assert canary_bucket("cust-1") == canary_bucket("cust-1")
    share = sum(in_canary(f"cust-{i}", 10.0) for i in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
    assert not any(in_canary(f"cust-{i}", 0.0) for i in range(1000))


def test_blank_secrets_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOREMESH_API_TOKEN", "")
    monkeypatch.setenv("SCOREMESH_KAFKA_SASL_PASSWORD", "  ")
    s = Settings()
    assert s.api.token is None and s.kafka_sasl_password is None
    monkeypatch.setenv("SCOREMESH_API_TOKEN", "s3cret")
    assert Settings().api.token is not None
    assert "s3cret" not in repr(Settings())


# Every setting of the previous release (0.1.0) by its environment name; the faust_*
# settings were read by nothing and are gone.
PREVIOUS_RELEASE = (
    "kafka_bootstrap",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_client_id",
    "kafka_idempotence",
    "kafka_fetch_max_wait_ms",
    "kafka_session_timeout_ms",
    "kafka_heartbeat_interval_ms",
    "kafka_rebalance_timeout_ms",
    "kafka_linger_ms",
    "kafka_max_batch_bytes",
    "kafka_max_request_bytes",
    "kafka_connect_timeout_s",
    "topic_prefix",
    "redis_url",
    "redis_key_prefix",
    "dev_redis_probe_url",
    "redis_prediction_ttl_s",
    "redis_entity_cap",
    "model_name",
    "artifact_dir",
    "artifact_chunk_bytes",
    "onnx_threads",
    "canary_guard",
    "canary_min_events",
    "canary_max_error_rate_delta",
    "canary_max_latency_ratio",
    "canary_min_batches",
    "retrain_policy",
    "promotion_policy",
    "label_join_window_s",
    "label_join_grace_s",
    "label_join_tumbling_s",
    "label_join_sliding_s",
    "label_join_marker_s",
    "label_join_publish_interval_s",
    "label_join_batch_max_records",
    "monitor_policy",
    "monitor_webhook_url",
    "monitor_slack_webhook_url",
    "monitor_pagerduty_routing_key",
    "batch_max_records",
    "batch_pipeline_depth",
    "batch_timeout_ms",
    "max_event_bytes",
    "rejection_keep_bytes",
    "shutdown_deadline_s",
    "metrics_host",
    "metrics_port",
    "api_host",
    "api_port",
    "api_token",
    "api_max_batch",
    "api_max_body_bytes",
    "api_request_timeout_s",
    "api_batch_max_size",
    "api_batch_max_wait_ms",
    "api_require_token_for_reads",
    "api_publish_max_inflight",
    "api_publish_wait_ms",
    "api_publish_linger_ms",
    "api_cors_origins",
    "api_history_cache_s",
    "api_command_timeout_s",
    "api_access_log",
    "log_level",
)


def test_every_setting_of_the_previous_release_is_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = env_names()
    assert [n for n in PREVIOUS_RELEASE if f"SCOREMESH_{n.upper()}" not in names] == []
    monkeypatch.setenv("SCOREMESH_LABEL_JOIN_WINDOW_S", "60")
    monkeypatch.setenv("SCOREMESH_API_PORT", "9999")
    monkeypatch.setenv("SCOREMESH_CANARY_MIN_EVENTS", "7")
    monkeypatch.setenv("SCOREMESH_MONITOR_WEBHOOK_URL", "http://hook")
    monkeypatch.setenv("SCOREMESH_PROMOTION_POLICY", '{"margin": 0.05}')
    settings = Settings()
    assert settings.label_join.window_s == 60
    assert settings.api.port == 9999
    assert settings.canary.min_events == 7
    assert settings.monitor.webhook_url == "http://hook"
    assert settings.promotion.policy.margin == 0.05
    assert Settings(label_join_grace_s=5).label_join.grace_s == 5
    assert settings.replace(api_token="t").api.token is not None
    with pytest.raises(ValueError, match="window_s"):
        Settings(label_join_window_s=-1)
