from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common.policies.retrain import PromotionPolicy, RetrainPolicy
from services.retrain.promotion import PromotionBook, Tally, judge, one_sided_p
from services.retrain.trigger import TriggerState, on_alert, on_schedule, on_stats

NOW = 1_800_000_000_000


def alert(
    first_seen: int = 1,
    state: str = "firing",
    kind: str = "performance",
    severity: str = "warning",
    key: str = "credit/1.0.0/error_rate",
) -> dict[str, Any]:
    return {
        "alert_key": key,
        "kind": kind,
        "severity": severity,
        "state": state,
        "model": "credit",
        "model_version": "1.0.0",
        "subject": {"signal": "error_rate"},
        "summary": "error rate up",
        "evidence": {"statistic": "0.3"},
        "first_seen": first_seen,
        "last_seen": first_seen,
        "count": 1,
    }


def stats(
    count: int,
    version: str = "1.0.0",
    variant: str = "champion",
    accuracy: float = 0.9,
    window: int = 0,
) -> dict[str, Any]:
    return {
        "model": "credit",
        "model_version": version,
        "variant": variant,
        "segment": "all",
        "window_kind": "tumbling",
        "window_start": window * 60_000,
        "window_end": (window + 1) * 60_000,
        "count": count,
        "metrics": {"accuracy": accuracy},
        "emitted_at": NOW,
    }


POLICY = RetrainPolicy(
    min_new_labels=100, min_interval_s=600, max_per_day=2, window_s=3600, train_from_change=False
)


def test_one_request_per_episode_and_updates_do_not_repeat_it() -> None:
    state = TriggerState()
    on_stats(state, stats(150))
    request = on_alert(state, alert(), POLICY, NOW)
    assert request is not None and request["model"] == "credit"
    assert request["window_end"] == 60_000 and request["window_start"] == 60_000 - 3_600_000
    assert request["evidence"]["episode"] == "credit/1.0.0/error_rate@1"
    assert on_alert(state, {**alert(), "count": 5}, POLICY, NOW + 1) is None  # same episode
    assert sum(state.suppressed.values()) == 0


def test_a_new_episode_inside_the_interval_is_suppressed_and_counted() -> None:
    state = TriggerState()
    on_stats(state, stats(150))
    assert on_alert(state, alert(first_seen=1), POLICY, NOW) is not None
    on_stats(state, stats(150, window=1))
    assert on_alert(state, alert(first_seen=2), POLICY, NOW + 60_000) is None
    assert state.suppressed["interval"] == 1


def test_too_few_labels_and_daily_cap() -> None:
    state = TriggerState()
    on_stats(state, stats(20))
    assert on_alert(state, alert(first_seen=1), POLICY, NOW) is None
    assert state.suppressed["too_few_labels"] == 1
    policy = POLICY.model_copy(update={"min_interval_s": 0})
    for i in range(3):
        on_stats(state, stats(200, window=i + 1))
        on_alert(state, alert(first_seen=10 + i), policy, NOW + i)
    assert state.suppressed["max_per_day"] == 1


def test_ignored_alerts() -> None:
    state = TriggerState()
    on_stats(state, stats(500))
    assert on_alert(state, alert(state="resolved"), POLICY, NOW) is None
    assert on_alert(state, alert(kind="model_load"), POLICY, NOW) is None
    assert on_alert(state, alert(severity="info"), POLICY, NOW) is None


def test_state_is_rebuilt_from_requests() -> None:
    state = TriggerState()
    on_stats(state, stats(500))
    request = on_alert(state, alert(), POLICY, NOW)
    rebuilt = TriggerState()
    rebuilt.fold_request(request)
    on_stats(rebuilt, stats(500, window=1))
    assert on_alert(rebuilt, alert(), POLICY, NOW + 10_000_000) is None  # episode known
    assert on_alert(rebuilt, alert(first_seen=99), POLICY, NOW + 10) is None  # interval
    assert rebuilt.suppressed["interval"] == 1


def test_schedule_is_skipped_without_new_labels() -> None:
    state = TriggerState()
    policy = POLICY.model_copy(update={"schedule": "0 3 * * 0"})
    assert on_schedule(state, "credit", policy, NOW) is None
    on_stats(state, stats(300))
    assert on_schedule(state, "credit", policy, NOW)["reason"].startswith("scheduled")


def test_policy_validation() -> None:
    with pytest.raises(ValidationError, match="cron"):
        RetrainPolicy(schedule="every sunday")
    with pytest.raises(ValidationError, match="min_severity"):
        RetrainPolicy(min_severity="loud")


def test_z_test() -> None:
    assert one_sided_p(Tally(1000, 900), Tally(1000, 700)) < 1e-6
    assert one_sided_p(Tally(1000, 700), Tally(1000, 900)) > 0.99
    assert 0.3 < one_sided_p(Tally(100, 70), Tally(100, 70)) <= 0.5


def test_shadow_beating_the_champion_goes_to_canary_then_champion() -> None:
    policy = PromotionPolicy(min_labels=200, canary_percent=30)
    book = PromotionBook()
    for w in range(3):
        book.observe(stats(100, "1.0.0", "champion", 0.70, window=w), "accuracy")
        book.observe(stats(100, "1.1.0", "shadow", 0.90, window=w), "accuracy")
    (move,) = judge(book, "credit", "1.0.0", {"1.1.0": "shadow"}, policy)
    assert (move.action, move.target_stage, move.options) == (
        "promote",
        "canary",
        {"percent": "30.0"},
    )
    assert "lift +0.200" in move.reason
    for w in range(3, 6):
        book.observe(stats(100, "1.0.0", "champion", 0.70, window=w), "accuracy")
        book.observe(stats(30, "1.1.0", "canary", 0.90, window=w), "accuracy")
    assert (
        judge(book, "credit", "1.0.0", {"1.1.0": "canary"}, policy) == []
    )  # 90 canary labels: too few
    for w in range(6, 12):
        book.observe(stats(100, "1.0.0", "champion", 0.70, window=w), "accuracy")
        book.observe(stats(30, "1.1.0", "canary", 0.90, window=w), "accuracy")
    (move,) = judge(book, "credit", "1.0.0", {"1.1.0": "canary"}, policy)
    assert (move.action, move.target_stage) == ("promote", "champion")


def test_a_worse_or_flat_challenger_is_retired_or_rolled_back() -> None:
    policy = PromotionPolicy(min_labels=200, max_labels=600)
    book = PromotionBook()
    for w in range(3):
        book.observe(stats(100, "1.0.0", "champion", 0.80, window=w), "accuracy")
        book.observe(stats(100, "1.1.0", "shadow", 0.60, window=w), "accuracy")
        book.observe(stats(100, "1.2.0", "canary", 0.60, window=w), "accuracy")
    moves = {
        m.version: m
        for m in judge(book, "credit", "1.0.0", {"1.1.0": "shadow", "1.2.0": "canary"}, policy)
    }
    assert moves["1.1.0"].action == "retire" and "significantly worse" in moves["1.1.0"].reason
    assert moves["1.2.0"].action == "rollback"
    flat = PromotionBook()
    for w in range(7):
        flat.observe(stats(100, "1.0.0", "champion", 0.80, window=w), "accuracy")
        flat.observe(stats(100, "1.1.0", "shadow", 0.80, window=w), "accuracy")
    (move,) = judge(flat, "credit", "1.0.0", {"1.1.0": "shadow"}, policy)
    assert move.action == "retire" and "no significant lift" in move.reason


def test_re_emitted_windows_count_once_and_only_shared_windows_compare() -> None:
    book = PromotionBook()
    book.observe(stats(100, "1.0.0", "champion", 0.5, window=0), "accuracy")
    book.observe(stats(100, "1.0.0", "champion", 0.5, window=0), "accuracy")
    book.observe(stats(100, "1.0.0", "champion", 0.9, window=1), "accuracy")
    book.observe(stats(100, "1.1.0", "shadow", 0.9, window=1), "accuracy")
    mine, theirs = book.paired(("credit@1.1.0", "shadow"), ("credit@1.0.0", "champion"))
    assert (mine.labels, theirs.labels) == (100, 100) and theirs.rate == pytest.approx(0.9)


def test_after_a_change_wait_for_labels_from_after_it_then_train_on_them() -> None:
    policy = RetrainPolicy(min_new_labels=0, min_interval_s=0, min_labels_after_change=250)
    state = TriggerState()
    for w in range(5):
        assert on_stats(state, stats(100, window=w), policy, NOW) == []
    change_at = 5 * 60_000
    assert on_alert(state, alert(first_seen=change_at), policy, NOW) is None  # pending
    assert on_stats(state, stats(100, window=5), policy, NOW) == []
    assert on_stats(state, stats(100, window=6), policy, NOW) == []
    (request,) = on_stats(state, stats(100, window=7), policy, NOW)
    assert request["window_start"] == change_at and request["window_end"] == 8 * 60_000
    assert request["evidence"]["trained_from"] == "change"
    assert on_stats(state, stats(100, window=8), policy, NOW) == []  # released once
    rebuilt = TriggerState()
    rebuilt.fold_request(request)
    assert on_alert(rebuilt, alert(first_seen=change_at), policy, NOW, replay=True) is None
    assert rebuilt.of("credit").pending == {}


def test_input_drift_alone_does_not_retrain_by_default() -> None:
    state = TriggerState()
    on_stats(state, stats(500))
    drift = alert(kind="drift", key="credit/1.0.0/stream_drift.hvalue")
    assert (
        on_alert(state, drift, RetrainPolicy(train_from_change=False, min_interval_s=0), NOW)
        is None
    )
    opted_in = RetrainPolicy(
        train_from_change=False, min_interval_s=0, alert_kinds=("performance", "drift")
    )
    assert on_alert(state, {**drift, "first_seen": 2}, opted_in, NOW) is not None
