from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from scoremesh.contract.catalog import CatalogError, catalog, parse_catalog
from services.common.routing import canary_bucket, in_canary
from services.common.settings import Settings

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
    assert set(catalog()) == DESIGN_TOPICS


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
    assert s.api_token is None and s.kafka_sasl_password is None
    monkeypatch.setenv("SCOREMESH_API_TOKEN", "s3cret")
    assert Settings().api_token is not None
    assert "s3cret" not in repr(Settings())
