"""The alert manager: one alert per key, cooldown, escalation, resolve, and a fold of the topic."""

from __future__ import annotations

from typing import Any

import pytest

from scoremesh.contract.codec import codec
from services.common.policies.monitor import DEFAULT_RULES, AlertPolicy, SeverityRule, Thresholds
from services.monitor.alerts import AlertBook, AlertManager, Condition, classify

MIN = 60_000
POLICY = AlertPolicy(cooldown_s=600, heartbeat_s=120)


def detection(at: int, partition: int = 0, severity: str = "warning", **kw: Any) -> Condition:
    return Condition(
        model="credit",
        version="1.0.0",
        signal="stream_drift.salary",
        kind="drift",
        severity=severity,  # type: ignore[arg-type]
        summary="salary changed",
        at_ms=at,
        subject={"feature": "salary"},
        evidence={"detector": "adwin"},
        partition=partition,
        **kw,
    )


def breach(at: int, severity: str = "warning") -> Condition:
    return Condition(
        model="credit",
        version="1.0.0",
        signal="reference_drift.salary",
        kind="drift",
        severity=severity,  # type: ignore[arg-type]
        summary="salary drifted",
        at_ms=at,
        evidence={"psi": "0.3"},
        explicit_clear=True,
    )


def test_repeats_inside_the_cooldown_are_one_alert_from_any_partition() -> None:
    manager = AlertManager(POLICY)
    events = []
    for i in range(10):  # every 30 s, on partitions 0, 1, 2, 0, 1, ...
        events += manager.observe(detection(i * 30_000, partition=i % 3))
    assert [t.event for t in events] == ["opened", "updated", "updated"]
    assert [t.notify for t in events] == [True, False, False]
    alert = manager.book.alerts["credit/1.0.0/stream_drift.salary"]
    assert alert.count == 10 and alert.first_seen == 0 and alert.last_seen == 270_000
    assert alert.evidence["partitions"] == "0,1,2"


def test_an_event_alert_resolves_after_a_quiet_cooldown_and_a_new_episode_notifies() -> None:
    manager = AlertManager(POLICY)
    manager.observe(detection(0))
    assert manager.sweep({"events": 9 * MIN}) == []
    manager.observe(detection(9 * MIN))  # a repeat inside the cooldown: same alert
    assert manager.sweep({"events": 18 * MIN}) == []
    (resolved,) = manager.sweep({"events": 19 * MIN})
    assert resolved.event == "resolved" and resolved.notify
    assert resolved.record["state"] == "resolved" and resolved.record["count"] == 2
    (again,) = manager.observe(detection(20 * MIN))
    assert again.event == "opened" and again.record["first_seen"] == 20 * MIN
    assert again.record["count"] == 1


def test_a_windowed_alert_resolves_only_after_staying_clear_for_the_cooldown() -> None:
    manager = AlertManager(POLICY)
    key = "credit/1.0.0/reference_drift.salary"
    manager.observe(breach(0))
    assert manager.sweep({"events": 60 * MIN}) == []  # no clear evaluation yet: stays open
    assert manager.clear(key, 61 * MIN) == []
    manager.observe(breach(65 * MIN))  # back above the threshold: the clock restarts
    assert manager.clear(key, 66 * MIN) == []
    assert manager.clear(key, 75 * MIN) == []
    (resolved,) = manager.clear(key, 76 * MIN)
    assert resolved.event == "resolved" and resolved.record["count"] == 2


def test_a_higher_severity_escalates_at_once() -> None:
    manager = AlertManager(POLICY)
    manager.observe(breach(0))
    (escalated,) = manager.observe(breach(1_000, severity="critical"))
    assert escalated.event == "escalated" and escalated.notify
    assert escalated.record["severity"] == "critical"
    assert manager.observe(breach(2_000, severity="warning")) == []  # never de-escalates


def test_renotify_repeats_a_firing_alert_when_configured() -> None:
    manager = AlertManager(AlertPolicy(cooldown_s=600, heartbeat_s=120, renotify_s=300))
    manager.observe(detection(0))
    events = [t.event for i in range(1, 12) for t in manager.observe(detection(i * 30_000))]
    assert events == ["updated", "updated", "renotify"]  # at 120 s, 240 s, then 300 s


def test_restart_folds_the_topic_into_the_same_state() -> None:
    manager = AlertManager(POLICY)
    written = []
    for i in range(6):
        written += manager.observe(detection(i * 50_000, partition=i % 2))
    written += manager.observe(breach(0))
    alert_codec = codec("Alert")
    records = [alert_codec.decode(alert_codec.encode(t.record)) for t in written]
    rebuilt = AlertManager(POLICY)
    rebuilt.fold(records)
    rebuilt.fold(reversed(records))  # replays and reordering change nothing
    original = manager.book.alerts["credit/1.0.0/stream_drift.salary"]
    folded = rebuilt.book.alerts["credit/1.0.0/stream_drift.salary"]
    assert (folded.first_seen, folded.state) == (original.first_seen, original.state)
    assert folded.count == 4 and folded.last_seen == 150_000  # the last heartbeat written
    assert rebuilt.book.alerts["credit/1.0.0/reference_drift.salary"].explicit_clear
    # inside the cooldown, the restarted manager does not open a second alert
    assert [t.event for t in rebuilt.observe(detection(280_000))] == ["updated"]


def test_a_newer_episode_from_a_sibling_replaces_an_older_one() -> None:
    book = AlertBook()
    first = AlertManager(POLICY)
    (opened,) = first.observe(detection(0))
    first.observe(detection(10 * MIN))
    (resolved,) = first.sweep({"events": 21 * MIN})
    (reopened,) = first.observe(detection(22 * MIN))
    for t in (opened, resolved, reopened):
        assert book.apply_record(t.record)
    assert not book.apply_record(opened.record)
    assert book.alerts[opened.key].first_seen == 22 * MIN and book.alerts[opened.key].firing
    assert [a.key for a in book.open_alerts()] == [opened.key]


@pytest.mark.parametrize(
    ("stats", "severity", "clear"),
    [
        ({"psi": 0.05, "ks": 0.05}, None, True),
        ({"psi": 0.09, "ks": 0.05}, None, False),  # above 0.8 x 0.1: neither breach nor clear
        ({"psi": 0.12, "ks": 0.05}, "warning", False),
        ({"psi": 0.12, "ks": 0.21}, "critical", False),
    ],
)
def test_severity_rules_and_the_resolve_band(
    stats: dict[str, float], severity: str | None, clear: bool
) -> None:
    verdict = classify(DEFAULT_RULES, "reference_drift.salary", stats, 0.8)
    assert (verdict.severity, verdict.clear) == (severity, clear)


def test_model_rules_come_first_and_below_rules_work() -> None:
    rules = (
        SeverityRule(
            signal="performance.f1*",
            statistic="f1",
            thresholds=Thresholds(warning=0.8, critical=0.6, below=True),
        ),
        *DEFAULT_RULES,
    )
    assert classify(rules, "performance.f1", {"f1": 0.7}, 0.8).severity == "warning"
    assert classify(rules, "performance.f1", {"f1": 0.5}, 0.8).severity == "critical"
    assert classify(rules, "performance.f1", {"f1": 0.9}, 0.8).clear is False  # 0.9 < 0.8/0.8
    assert classify(rules, "performance.f1", {"f1": 1.01}, 0.8).clear
