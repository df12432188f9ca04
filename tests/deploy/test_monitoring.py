"""Prometheus configuration and rules (promtool, from Debian's `prometheus` package, which
.ci/run installs) and the Grafana provisioning the compose stack mounts."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import ROOT, SERVICES, compose, load_json, service_port

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"


def _yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    result = _promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    groups = _yaml("deploy/prometheus/alerts.yml")["groups"]
    rules = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert any(rule["alert"] == "ScoremeshServiceDown" for rule in rules)
    for rule in rules:
        assert rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = _yaml("deploy/prometheus/prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        if job["job_name"].startswith("scoremesh")
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"{name}:{service_port(name)}" for name in SERVICES}
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards() -> None:
    (source,) = _yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = _yaml("deploy/grafana/provisioning/dashboards/scoremesh.yml")["providers"]
    mounts = dict(
        reversed(volume.split(":")[:2]) for volume in compose()["services"]["grafana"]["volumes"]
    )
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = load_json(path)
        assert dashboard["uid"] and dashboard["title"] and dashboard["panels"], path.name
        for panel in dashboard["panels"]:
            if panel.get("type") == "row":
                continue
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(target["expr"] for target in panel["targets"]), panel["title"]
