"""Policy loading and merging, and the status rows `scoremesh monitor status` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from services.common.policies.monitor import (
    DetectorSpec,
    MonitorPolicy,
    PolicyError,
    load_policy,
    with_sinks,
)
from services.monitor.sinks import LogSink, PagerDutySink, SlackSink, sinks_from_policy
from services.monitor.status import (
    ALERT_COLUMNS,
    DRIFT_COLUMNS,
    alert_rows,
    drift_rows,
    format_table,
)


def test_a_yaml_policy_overrides_per_model(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(
        """
window: {size: 2000, hop: 500, min_samples: 1000}
alerts: {cooldown_s: 1800, heartbeat_s: 600}
models:
  credit:
    detectors:
      numeric: [{kind: page_hinkley, params: {threshold: 80}}]
      error: [{kind: ddm}]
    exclude_features: [zipcode]
    rules:
      - {signal: "reference_drift.salary", statistic: psi, thresholds: {warning: 0.05}}
"""
    )
    policy = load_policy(path)
    credit, other = policy.for_model("credit"), policy.for_model("fraud")
    assert credit.detectors.numeric == (
        DetectorSpec(kind="page_hinkley", params={"threshold": 80}),
    )
    assert credit.exclude_features == {"zipcode"} and other.exclude_features == frozenset()
    assert (
        credit.rules[0].signal == "reference_drift.salary"
        and len(other.rules) == len(credit.rules) - 1
    )
    assert credit.window.size == other.window.size == 2000


def test_bad_policies_fail_with_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"alerts": {"cooldown_s": 60, "heartbeat_s": 120}}')
    with pytest.raises(
        PolicyError, match=r"bad\.json: alerts: Value error, alerts\.heartbeat_s must be below"
    ):
        load_policy(path)
    path.write_text('{"detectors": {"numeric": [{"kind": "magic"}]}}')
    with pytest.raises(
        PolicyError, match=r"bad\.json: detectors\.numeric\.0\.kind: Input should be"
    ):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_sink_secrets_turn_sinks_on() -> None:
    assert [type(s) for s in sinks_from_policy(MonitorPolicy().sinks)] == [LogSink]
    policy = with_sinks(
        MonitorPolicy(),
        slack_webhook_url=SecretStr("https://hooks.slack.test/T/B/x"),
        pagerduty_routing_key=SecretStr("key"),
    )
    sinks = sinks_from_policy(policy.sinks)
    assert [type(s) for s in sinks] == [LogSink, SlackSink, PagerDutySink]
    assert sinks[2].min_severity == "critical" and sinks[1].min_severity == "warning"


def test_status_rows_show_open_alerts_worst_first_and_drift_as_a_table() -> None:
    def alert(key: str, severity: str, state: str = "firing") -> dict:
        return {
            "alert_key": key,
            "kind": "drift",
            "severity": severity,
            "state": state,
            "model": "credit",
            "model_version": "1.0.0",
            "subject": {},
            "summary": f"{key} moved",
            "evidence": {"psi": "0.3"},
            "first_seen": 1_767_225_600_000,
            "last_seen": 1_767_225_660_000,
            "count": 3,
        }

    rows = alert_rows(
        [
            alert("credit/1.0.0/a", "warning"),
            alert("credit/1.0.0/b", "critical"),
            alert("credit/1.0.0/c", "critical", state="resolved"),
        ]
    )
    assert [r["alert_key"] for r in rows] == ["credit/1.0.0/b", "credit/1.0.0/a"]
    assert rows[0]["first_seen"] == "2026-01-01 00:00:00"
    table = format_table(rows, ALERT_COLUMNS)
    assert table.splitlines()[0].split()[:3] == ["SEVERITY", "ALERT_KEY", "KIND"]
    assert "credit/1.0.0/b moved" in table
    drift = drift_rows(
        [
            {
                "model": "credit",
                "version": "1.0.0",
                "signal": "reference_drift.salary",
                "feature": "salary",
                "stats": {"psi": 0.31234, "ks": 0.2},
                "state": "critical",
                "sample": 5000,
                "window_first": 1,
                "window_last": 1_767_225_600_000,
            }
        ]
    )
    assert drift[0]["psi"] == "0.3123" and drift[0]["state"] == "critical"
    assert "reference_drift.salary" in format_table(drift, DRIFT_COLUMNS)
    assert format_table([], DRIFT_COLUMNS) == "(none)"


def test_the_example_policy_in_the_docs_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    policy = load_policy(root / "examples" / "monitor-policy.yaml")
    assert policy.sinks.min_severity["pagerduty"] == "critical"
    assert policy.for_model("credit").rules[0].signal == "error_rate"
    assert policy.alerts.input_drift_alone == "info"


def test_paging_secrets_are_read_from_files_and_a_missing_one_is_off(tmp_path: Path) -> None:
    from services.common.settings import MonitorSettings

    secret = tmp_path / "slack_webhook_url"
    secret.write_text("https://hooks.slack.test/T0/B0/x\n")
    settings = MonitorSettings(
        slack_webhook_url=f"file:{secret}",
        pagerduty_routing_key=f"file:{tmp_path / 'absent'}",
        webhook_url="file:" + str(tmp_path / "absent"),
    )
    assert settings.slack_webhook_url is not None
    assert settings.slack_webhook_url.get_secret_value() == "https://hooks.slack.test/T0/B0/x"
    assert settings.pagerduty_routing_key is None and settings.webhook_url is None
