"""deploy/prometheus/alerts.yml and the Grafana dashboard: valid, tested, and about real metrics.

promtool comes with Debian's `prometheus` package (`apt-get install -y prometheus`). Without
it these tests skip on a developer machine and fail under CI=true, so CI never passes
without checking the rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import services.common.metrics
import services.label_join.telemetry
import services.monitor.metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "scoremesh.json"
METRIC = re.compile(r"\b(scoremesh_[a-z0-9_]+)")
_MODULES = (services.common.metrics, services.monitor.metrics, services.label_join.telemetry)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: install it with `apt-get install -y prometheus`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return path


def test_promtool_check_rules_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fire_each_alert_with_its_labels() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def known_metrics() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created", "_info"):
            names.add(family.name + suffix)
    return names


def rule_list() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_rule_has_a_severity_and_says_what_to_do() -> None:
    alerts = [r for r in rule_list() if "alert" in r]
    names = {str(r["alert"]) for r in alerts}
    for wanted in (
        "ScoremeshPredictionLatencyHigh",
        "ScoremeshScoringErrorRateHigh",
        "ScoremeshFeatureDriftDetected",
        "ScoremeshRejectRateHigh",
        "ScoremeshConsumerLagGrowing",
        "ScoremeshNoPredictions",
    ):
        assert wanted in names
    for rule in alerts:
        labels = rule["labels"]
        annotations = rule["annotations"]
        assert isinstance(labels, dict) and labels["severity"] in ("warning", "critical")
        assert (
            isinstance(annotations, dict) and annotations["summary"] and annotations["description"]
        )
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {"ScoremeshPredictionLatencyHigh", "ScoremeshNoPredictions"} <= tested


def test_rules_and_dashboard_only_use_metrics_the_services_export() -> None:
    known = known_metrics()
    text = RULES.read_text() + DASHBOARD.read_text()
    used = set(METRIC.findall(text))
    assert used, "no scoremesh metric referenced"
    assert sorted(used - known) == []


def test_dashboard_is_provisioned_and_covers_performance_drift_latency_and_lag() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "scoremesh_model_performance",
        "scoremesh_drift_psi",
        "scoremesh_prediction_latency_seconds_bucket",
        "scoremesh_consumer_group_lag",
    ):
        assert metric in exprs
    assert 'segment=~"$segment"' in exprs and 'version=~"$version"' in exprs
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {p["datasource"]["uid"] for p in panels} <= uids
    providers = yaml.safe_load((provisioning / "dashboards" / "scoremesh.yml").read_text())
    assert providers["providers"][0]["type"] == "file"  # every JSON in dashboards/ is loaded
    assert _MODULES  # the imports above register every metric family
