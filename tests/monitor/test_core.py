"""The monitor's batch logic on real, Avro-encoded predictions and labels (no broker).

Credit events from River's Agrawal generator are scored by the session's trained ONNX
model; the monitor sees them as six partitions of Kafka records in batches of 512, and
its signals come back through an in-process stand-in for monitor.signals.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from services.common.policies.monitor import MonitorPolicy
from services.common.registry_view import RegistryState
from services.common.serving.models import ServingSet
from services.common.serving.scoring import score_events
from services.common.settings import Settings
from services.monitor.core import MonitorCore
from services.monitor.inprocess import Loopback, run_batch
from services.trainer.datasets import credit_events
from tests.monitor.streams import as_records, credit_version, labeled, loaded, predictions

START_MS = 1_767_225_600_000
BATCH = 512


@pytest.fixture(scope="module")
def model(trained_model: Any) -> Any:
    return loaded(trained_model.onnx, credit_version(trained_model.onnx, trained_model.metadata))


def make_core(model: Any, policy: MonitorPolicy | None = None) -> MonitorCore:
    settings = Settings(kafka_bootstrap="127.0.0.1:9", topic_prefix="core.")
    core = MonitorCore(settings, policy or MonitorPolicy())
    state = RegistryState()
    state.apply(model.version)
    core.on_registry(state)
    return core


def run(
    core: MonitorCore, preds: list[dict[str, Any]], labels: list[str] | None = None
) -> list[Any]:
    """Feed predictions (and, interleaved, their labels) batch by batch; all transitions."""
    topic = core.settings.topic
    records = as_records(topic("predictions"), "Prediction", preds)
    label_records = (
        as_records(
            topic("predictions.labeled"),
            "LabeledPrediction",
            [labeled(p, y) for p, y in zip(preds, labels, strict=True)],
        )
        if labels is not None
        else []
    )
    transitions = []
    loop = Loopback(topic("monitor.signals"))
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH] + label_records[start : start + BATCH]
        transitions += run_batch(core, loop, batch)[0]
    return transitions


def index_of(ms: int) -> int:
    return (ms - START_MS) // 1_000


def first_alerts(transitions: list[Any]) -> dict[str, tuple[int, str]]:
    """Per alert key: the event index it opened at and its highest severity."""
    out: dict[str, tuple[int, str]] = {}
    for t in transitions:
        key, record = t.key, t.record
        if t.event == "opened" and key not in out:
            out[key] = (index_of(record["first_seen"]), record["severity"])
        elif t.event == "escalated":
            out[key] = (out[key][0], record["severity"])
    return out


def test_a_stationary_stream_of_100000_events_pages_nothing(model: Any) -> None:
    n = 100_000
    preds = list(predictions(model, n, seed=5))
    labels = [y for _, y in credit_events(n, seed=5)]
    core = make_core(model)
    transitions = run(core, preds, labels)
    # a detector may notice noise (info: a detection alone never pages); nothing pages
    assert [t.key for t in transitions if t.record["severity"] != "info"] == []
    assert all(t.key.split("/")[-1].startswith("stream_drift.") for t in transitions)
    state = core.states[("credit", "1.0.0")]
    # not vacuous: every event went through one detector per signal and the windows
    assert state.bank.score[0].seen == n and state.errors.detectors[0].seen == n
    assert state.window.total == n
    rows = core.drift[("credit", "1.0.0")]
    assert len(rows) == 19 and all(row.severity is None for row in rows.values())


def test_feature_drift_is_detected_at_pinned_events(model: Any) -> None:
    """Salary x1.3 from event 30,000 on (0.67 sd): one detector over the whole stream of
    six partitions warns (from the size of the shift); the windowed test against the
    training reference says info only, as the score and decisions hold."""
    preds = list(predictions(model, 40_000, seed=5, drift_at=30_000, drift={"salary": 1.3}))
    alerts = first_alerts(run(make_core(model), preds))
    # (detections of noise on other features are info: left out)
    alerts = {k: v for k, v in alerts.items() if v[1] != "info" or "salary" in k}
    assert alerts == {
        "credit/1.0.0/stream_drift.salary": (30_047, "warning"),
        "credit/1.0.0/reference_drift.salary": (32_767, "info"),
    }


def test_concept_drift_raises_the_error_rate_alert_only(model: Any) -> None:
    """Agrawal's labelling function switches from 0 to 2 at event 30,000; features and
    scores do not change, the error stream does."""
    n = 30_000
    before = credit_events(n, seed=5)
    after = credit_events(
        n, seed=6, classification_function=2, start_ms=START_MS + n * 1_000, id_prefix="late"
    )
    pairs = list(itertools.chain(before, after))
    serving = ServingSet(champion=model)
    preds = [
        p
        for start in range(0, 2 * n, 2_000)
        for p in score_events(
            serving, [e for e, _ in pairs[start : start + 2_000]], "stream", 0.0
        ).predictions
    ]
    alerts = first_alerts(run(make_core(model), preds, [y for _, y in pairs]))
    alerts = {k: v for k, v in alerts.items() if v[1] != "info"}
    # one detector over the whole labelled stream; the rise is large: critical
    assert alerts == {"credit/1.0.0/error_rate": (30_107, "critical")}


def stats_record(f1: float, window_end: int, labeled: int = 500) -> dict[str, Any]:
    return {
        "model": "credit",
        "model_version": "1.0.0",
        "variant": "champion",
        "segment": "all",
        "window_kind": "sliding",
        "window_start": window_end - 3_600_000,
        "window_end": window_end,
        "count": labeled,
        "metrics": {"f1": f1, "accuracy": 0.9, "labeled": float(labeled)},
        "emitted_at": window_end,
    }


def test_performance_thresholds_from_monitoring_stats_open_and_resolve(model: Any) -> None:
    core = make_core(model)
    baseline = model.version.metadata.holdout_metrics["f1"]
    topic = core.settings.topic("monitoring.stats")

    def feed(*records: dict[str, Any]) -> list[Any]:
        values = [{**r, "event_id": "-", "variant": r["variant"]} for r in records]
        encoded = as_records(topic, "MonitoringStats", values, partitions=1)
        return core.process(encoded).transitions

    hour = 3_600_000
    assert feed(stats_record(baseline - 0.01, START_MS + hour)) == []
    assert feed(stats_record(baseline - 0.5, START_MS + 2 * hour, labeled=50)) == []  # too few
    (opened,) = feed(stats_record(baseline - 0.3, START_MS + 3 * hour))
    assert opened.key == "credit/1.0.0/performance.f1" and opened.record["severity"] == "critical"
    assert opened.record["evidence"]["baseline"] == f"{baseline:.4g}"
    assert feed(stats_record(baseline, START_MS + 4 * hour)) == []  # clear, not yet long enough
    (resolved,) = feed(stats_record(baseline, START_MS + 5 * hour))
    assert resolved.event == "resolved"


def test_refused_commands_and_load_failures_from_deployments_log_alert(model: Any) -> None:
    import time

    core = make_core(model)
    now = int(time.time() * 1000)
    base = {
        "model": "credit",
        "from_stage": None,
        "to_stage": None,
        "previous_champion": None,
        "new_champion": None,
        "generation": 7,
        "actor": "cli",
        "reason": "",
    }
    events = [
        {
            **base,
            "request_id": "r1",
            "version": "2.0.0",
            "action": "promote",
            "outcome": "refused",
            "detail": "a major version is already in canary",
            "at": now,
        },
        {
            **base,
            "request_id": "r2",
            "version": "1.1.0",
            "action": "load_failed",
            "outcome": "applied",
            "detail": "onnxruntime: invalid graph",
            "at": now,
        },
        {
            **base,
            "request_id": "r0",
            "version": "0.9.0",
            "action": "promote",
            "outcome": "refused",
            "detail": "ancient history",
            "at": now - 3 * 86_400_000,
        },  # older than the max age
    ]
    values = [{**e, "event_id": e["request_id"], "variant": "-"} for e in events]
    transitions = core.process(
        as_records(core.settings.topic("deployments.log"), "DeploymentEvent", values, partitions=1)
    ).transitions
    got = {(t.key, t.record["kind"], t.record["severity"]) for t in transitions}
    assert got == {
        ("credit/2.0.0/deployment_refused.promote", "deployment", "warning"),
        ("credit/1.1.0/model_load", "model_load", "critical"),
    }


def test_a_retrain_that_needs_a_person_alerts_until_a_retrain_succeeds(model: Any) -> None:
    import time

    core = make_core(model)
    now = int(time.time() * 1000)
    base = {
        "model": "credit",
        "attempt": 1,
        "version": None,
        "parent_version": "1.0.0",
        "metrics": {},
        "champion_metrics": {},
        "examples": 0,
        "window_start": 0,
        "window_end": 1,
        "trainer": "trainer:t",
    }
    topic = core.settings.topic("retrain.results")

    def results(*values: dict[str, Any]) -> list[Any]:
        keyed = [{**v, "event_id": v["request_id"], "variant": "-"} for v in values]
        return core.process(as_records(topic, "RetrainResult", keyed, partitions=1)).transitions

    opened = results(
        {**base, "request_id": "r1", "status": "started", "detail": "received", "at": now},
        {
            **base,
            "request_id": "r1",
            "status": "needs_person",
            "detail": "credit@1.0.0 has no training recipe",
            "at": now,
        },
    )
    assert [(t.event, t.key, t.record["kind"]) for t in opened] == [
        ("opened", "credit/1.0.0/retrain.needs_person", "retrain")
    ]
    assert "needs a person: credit@1.0.0 has no training recipe" in opened[0].record["summary"]
    # A later retrain of that version succeeded: clear, and resolved after the cooldown.
    assert (
        results(
            {**base, "request_id": "r2", "status": "succeeded", "detail": "ok", "at": now + 1000}
        )
        == []
    )
    cooldown = int(core.policy.alerts.cooldown_s * 1000)
    resolved = core.manager.sweep({"wall": now + 1000 + cooldown})
    assert [(t.event, t.key) for t in resolved] == [
        ("resolved", "credit/1.0.0/retrain.needs_person")
    ]


def test_a_core_restored_from_its_snapshot_pages_like_one_that_never_stopped(model: Any) -> None:
    """The second stage stops after 6,144 predictions; another core restores the JSON
    snapshot (and the alert book, as folded from the alerts topic) and goes on. Its
    detector transitions are those of a core that never stopped, salary step included."""
    import orjson

    preds = list(predictions(model, 12_288, seed=5, drift_at=8_000, drift={"salary": 1.3}))
    whole = make_core(model)
    topic = whole.settings.topic
    records = as_records(topic("predictions"), "Prediction", preds)
    loop = Loopback(topic("monitor.signals"))
    expected = []
    for start in range(0, len(records), BATCH):
        expected += run_batch(whole, loop, records[start : start + BATCH])[0]

    first = make_core(model)
    loop = Loopback(topic("monitor.signals"))
    got = []
    half = 12 * BATCH
    for start in range(0, half, BATCH):
        got += run_batch(first, loop, records[start : start + BATCH])[0]
    snapshots = [orjson.loads(out.value) for out in first.snapshot_outs(range(loop.partitions))]
    assert len(snapshots) == 1 and snapshots[0]["next_offset"] > 0
    second = make_core(model)
    second.manager.book = first.manager.book
    assert [second.restore(s) for s in snapshots] == [snapshots[0]["next_offset"]]
    for start in range(half, len(records), BATCH):
        got += run_batch(second, loop, records[start : start + BATCH])[0]

    def detectors_view(transitions: list[Any]) -> list[tuple[str, str, int, str]]:
        return [
            (t.key, t.event, t.record["first_seen"], t.record["severity"])
            for t in transitions
            if "/stream_drift." in t.key or t.key.endswith("/error_rate")
        ]

    assert detectors_view(got) == detectors_view(expected)
    assert ("credit/1.0.0/stream_drift.salary", "escalated") in {
        (k, e) for k, e, _, sev in detectors_view(got) if sev == "warning"
    }
    assert second.states[("credit", "1.0.0")].bank.score[0].seen == len(preds)
