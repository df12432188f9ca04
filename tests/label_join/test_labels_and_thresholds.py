"""The label file reader and the threshold evaluation the monitor calls: pure, no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.performance import (
    PerformancePolicy,
    ThresholdRule,
    performance_breaches,
)
from services.label_join.labels import LabelFileError, read_labels

NOW = 1_767_300_000_000


def test_jsonl_labels_are_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"event_id": "e1", "value": "1", "label_time": 1767225600000}\n'
        "\n"
        '{"event_id": "e2", "value": 0, "label_time": "2026-01-01T00:00:05Z"}\n'
        '{"event_id": "e3", "value": "1"}\n'
        "not json\n"
        '{"event_id": "", "value": "1"}\n'
        '{"event_id": "e6", "value": "7"}\n'
        '{"event_id": "e7", "value": "1", "label_time": "yesterday"}\n'
        "[1, 2]\n"
    )
    fmt, good, bad, read = read_labels(path, classes={"0", "1"}, now_ms=NOW)
    assert fmt == "jsonl" and read == 8
    assert good == [
        (1, {"event_id": "e1", "value": "1", "label_time": 1767225600000}),
        (3, {"event_id": "e2", "value": "0", "label_time": 1767225605000}),
        (4, {"event_id": "e3", "value": "1", "label_time": NOW}),
    ]
    assert [b.line for b in bad] == [5, 6, 7, 8, 9]
    assert "not valid JSON" in bad[0].message
    assert "event_id" in bad[1].message
    assert "'7' is not one of the model's classes" in bad[2].message
    assert "label_time 'yesterday'" in bad[3].message
    assert str(bad[4]).startswith("line 9: ")


def test_csv_labels_need_the_header(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "event_id,value,label_time\ne1,1,1767225600000\ne2,0,\ne3,1,2026-01-01T00:00:01+00:00\ne4,1\n"
    )
    fmt, good, bad, _ = read_labels(path, classes=None, now_ms=NOW)
    assert fmt == "csv"
    assert [g[1]["label_time"] for g in good] == [1767225600000, NOW, 1767225601000]
    assert [(b.line, "columns" in b.message) for b in bad] == [(5, True)]
    headerless = tmp_path / "bad.csv"
    headerless.write_text("e1,1,5\n")
    with pytest.raises(LabelFileError, match="header must name event_id,value,label_time"):
        read_labels(headerless)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(LabelFileError, match="cannot read"):
        read_labels(tmp_path / "nope.jsonl")


def stats(
    metric_values: dict[str, float],
    version: str = "1.0.0",
    segment: str = "all",
    kind: str = "sliding",
    end: int = 2,
) -> dict[str, Any]:
    return {
        "model": "credit",
        "model_version": version,
        "variant": "champion",
        "segment": segment,
        "window_kind": kind,
        "window_start": 0,
        "window_end": end,
        "count": int(metric_values.get("labeled", 0)),
        "metrics": metric_values,
        "emitted_at": end,
    }


TRAINING = {"credit@1.0.0": {"f1": 0.90, "log_loss": 0.30}}


def test_f1_below_training_minus_x_over_enough_labels_breaches() -> None:
    policy = PerformancePolicy(
        (ThresholdRule("f1", max_drop=0.05, critical_drop=0.2, min_labels=100),)
    )
    assert performance_breaches([stats({"f1": 0.86, "labeled": 500})], TRAINING, policy) == []
    assert performance_breaches([stats({"f1": 0.5, "labeled": 99})], TRAINING, policy) == []
    [warning] = performance_breaches([stats({"f1": 0.80, "labeled": 500})], TRAINING, policy)
    assert warning.severity == "warning" and warning.threshold == pytest.approx(0.85)
    assert warning.key == "credit@1.0.0:performance:f1:champion:all"
    [critical] = performance_breaches([stats({"f1": 0.6, "labeled": 500})], TRAINING, policy)
    assert critical.severity == "critical" and critical.observed == 0.6


def test_lower_is_better_metrics_breach_upwards_and_only_the_newest_window_counts() -> None:
    policy = PerformancePolicy((ThresholdRule("log_loss", max_drop=0.1, min_labels=10),))
    old = stats({"log_loss": 0.9, "labeled": 50}, end=1)
    new = stats({"log_loss": 0.35, "labeled": 50}, end=2)
    assert performance_breaches([new, old], TRAINING, policy) == []
    [b] = performance_breaches([old], TRAINING, policy)
    assert b.metric == "log_loss" and b.threshold == pytest.approx(0.4)


def test_rules_pick_their_window_kind_and_segments_and_need_a_baseline() -> None:
    rule = ThresholdRule(
        "f1", max_drop=0.05, min_labels=1, window_kind="tumbling", segments="every"
    )
    policy = PerformancePolicy((rule,))
    records = [
        stats({"f1": 0.1, "labeled": 5}, kind="sliding"),
        stats({"f1": 0.1, "labeled": 5}, kind="tumbling", segment="channel=web"),
        stats({"f1": 0.1, "labeled": 5}, kind="tumbling", version="9.9.9"),  # no baseline
    ]
    [b] = performance_breaches(records, TRAINING, policy)
    assert (b.segment, b.window_kind) == ("channel=web", "tumbling")


def test_join_config_reads_label_join_settings_when_declared() -> None:

    from services.common.settings import Settings
    from services.label_join.join import DAY_MS, HOUR_MS, JoinConfig

    assert JoinConfig.from_settings(Settings.model_validate({})) == JoinConfig(
        keep_original_bytes=4096
    )
    custom = JoinConfig.from_settings(
        Settings.model_validate(
            {"label_join_window_s": 86400, "label_join_grace_s": 60, "rejection_keep_bytes": 10}
        )
    )
    assert (custom.window_ms, custom.grace_ms, custom.tumbling_ms) == (DAY_MS, 60_000, HOUR_MS)
    assert custom.keep_original_bytes == 10
    with pytest.raises(ValueError, match="whole number of tumbling windows"):
        JoinConfig(tumbling_ms=HOUR_MS, sliding_ms=90 * 60_000)
