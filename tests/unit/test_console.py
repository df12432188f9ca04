"""The console's pure parts: the bounded stats history, sessions and CSRF, what pages show."""

from __future__ import annotations

import re

import pytest
from jinja2 import Environment, PackageLoader

from services.query.console.history import StatsHistory
from services.query.console.session import (
    csrf_ok,
    csrf_token,
    open_session,
    read_session,
)
from services.query.console.views import (
    RUNBOOK_KINDS,
    alert_view,
    drift_lines,
    latest_drift,
    paginate,
    performance_lines,
    performance_metrics,
    pick_drift_version,
    pick_metric,
    runbook_url,
)
from tests.console.factories import alert_record, drift_record, performance_record


def test_a_tumbling_window_republished_keeps_one_point_with_the_latest_values() -> None:
    history = StatsHistory()
    history.add(performance_record("1.0.0", 0, 0.80))
    history.add(performance_record("1.0.0", 1, 0.85))
    history.add(performance_record("1.0.0", 0, 0.90))  # more labels arrived for window 0
    (series,) = history.series("credit", "tumbling")
    assert [v for _, v in series.values("accuracy")] == [0.90, 0.85]
    assert "error_rate:age:0" not in series.metrics[0], "only the charted metrics are kept"


def test_sliding_windows_are_not_kept_and_points_stay_in_time_order() -> None:
    history = StatsHistory()
    assert not history.add({**performance_record("1.0.0", 0, 0.5), "window_kind": "sliding"})
    for w in (3, 1, 2):
        history.add(performance_record("1.0.0", w, 0.5 + w / 10))
    (series,) = history.series("credit", "tumbling")
    assert series.ends == sorted(series.ends) and history.skipped == 1


def test_the_history_is_bounded_in_points_and_series() -> None:
    history = StatsHistory(max_points=3, max_series=2)
    for w in range(10):
        history.add(performance_record("1.0.0", w, 0.9))
    (series,) = history.series("credit", "tumbling")
    assert (
        len(series) == 3 and series.starts[0] == performance_record("1.0.0", 7, 0)["window_start"]
    )
    history.add(performance_record("2.0.0", 0, 0.9))
    history.add(performance_record("1.0.0", 11, 0.9))  # 1.0.0 is now the most recent
    history.add(performance_record("3.0.0", 0, 0.9))  # evicts 2.0.0, updated longest ago
    assert [s.key.version for s in history.series("credit", "tumbling")] == ["1.0.0", "3.0.0"]
    assert history.dropped_series == 1 and history.point_count == 4
    with pytest.raises(ValueError, match="at least 1"):
        StatsHistory(max_points=0)


def test_drift_records_become_a_line_per_feature_and_the_score() -> None:
    history = StatsHistory()
    for e in range(4):
        history.add(drift_record("1.0.0", e, 0.1 * e))
    lines = drift_lines(history, "credit", "1.0.0")
    assert [ln["name"] for ln in lines["psi"]] == ["score", "age", "loan", "salary"]
    assert [ln["name"] for ln in lines["ks"]] == ["age", "loan", "salary"]
    assert lines["psi"][1]["data"][-1] == ["2026-01-01T00:04:00Z", pytest.approx(0.3)]
    latest = latest_drift(history, "credit", "1.0.0")
    assert latest[0]["feature"] == "loan" and latest[0]["psi"] == pytest.approx(0.9)
    assert next(r for r in latest if r["feature"] == "score")["ks"] is None
    assert history.drift_versions("credit") == ["1.0.0"]
    assert pick_drift_version(history, "credit", "2.0.0", None) == "1.0.0"
    assert pick_drift_version(history, "credit", "1.0.0", "9.9.9") == "1.0.0"


def test_a_version_measured_as_two_variants_names_the_variant() -> None:
    history = StatsHistory()
    history.add(drift_record("1.1.0", 0, 0.2, variant="shadow"))
    history.add(drift_record("1.1.0", 0, 0.2, variant="canary"))
    names = {ln["name"] for ln in drift_lines(history, "credit", "1.1.0")["psi"]}
    assert "age (shadow)" in names and "age (canary)" in names


def test_performance_lines_by_version_or_by_segment_and_the_metric_picked() -> None:
    history = StatsHistory()
    history.add(performance_record("1.0.0", 0, 0.9))
    history.add(performance_record("1.1.0", 0, 0.8, variant="shadow"))
    history.add(performance_record("1.0.0", 0, 0.7, segment="channel=web"))
    by_version = performance_lines(history, "credit", "accuracy")
    assert [ln["name"] for ln in by_version] == ["1.0.0 champion", "1.1.0 shadow"]
    by_segment = performance_lines(
        history, "credit", "accuracy", segment=None, version="1.0.0", by="segment"
    )
    assert [ln["name"] for ln in by_segment] == ["all", "channel=web"]
    assert history.segments("credit") == ["all", "channel=web"]
    metrics = performance_metrics(history, "credit")
    assert metrics[0] == "accuracy" and "coverage" not in metrics
    assert pick_metric(metrics, "f1") == "f1" and pick_metric(metrics, "nope") == "accuracy"
    assert pick_metric(["rmse"], None) == "rmse"


def test_sessions_prove_the_token_and_expire() -> None:
    cookie = open_session("tok", "alice", 1_000)
    assert "tok" not in cookie
    session = read_session("tok", cookie, 2_000, ttl_s=60)
    assert session is not None and session.actor == "console:alice"
    assert read_session("other-token", cookie, 2_000, ttl_s=60) is None  # the token changed
    assert read_session("tok", cookie, 1_000 + 61_000, ttl_s=60) is None  # expired
    assert read_session("tok", cookie.replace("alice", "mallory"), 2_000, ttl_s=60) is None
    assert read_session("tok", "garbage", 2_000, ttl_s=60) is None
    assert read_session("tok", None, 2_000, ttl_s=60) is None
    with pytest.raises(ValueError, match="letters, digits"):
        open_session("tok", "a:b", 1_000)


def test_csrf_tokens_belong_to_one_session_and_one_token() -> None:
    cookie = open_session("tok", "alice", 1_000)
    sent = csrf_token("tok", cookie)
    assert csrf_ok("tok", cookie, sent)
    assert not csrf_ok("tok", open_session("tok", "alice", 2_000), sent)
    assert not csrf_ok("other", cookie, sent)
    assert not csrf_ok("tok", cookie, None) and not csrf_ok("tok", None, sent)


def test_runbook_links_only_follow_http_urls_from_evidence() -> None:
    own = alert_record("psi.age", evidence={"runbook_url": "https://wiki.example/drift"})
    assert runbook_url(own, None) == "https://wiki.example/drift"
    sneaky = alert_record("psi.age", evidence={"runbook_url": "javascript:alert(1)"})
    assert runbook_url(sneaky, None) == "/console/runbooks#drift"
    odd = alert_record("x", kind="something_new")
    assert runbook_url(odd, "https://runbooks.example/ml") == "https://runbooks.example/ml#other"
    shown = alert_view({"alert_key": "credit/-/model_load", "kind": "model_load"}, None)
    assert shown["severity"] == "info" and shown["evidence"] == [] and shown["count"] == 1


def test_every_runbook_kind_has_its_section() -> None:
    env = Environment(loader=PackageLoader("services.query.console", "templates"))
    source = env.loader.get_source(env, "runbooks.html")[0]  # type: ignore[union-attr]
    assert set(re.findall(r'<section class="runbook" id="([a-z_]+)">', source)) == set(
        RUNBOOK_KINDS
    )


def test_pages_of_alerts() -> None:
    page = paginate(list(range(250)), 3, size=100)
    assert page.items == list(range(200, 250)) and page.pages == 3 and page.total == 250
    assert paginate([], 7).number == 1 and paginate(list(range(5)), -2).items == list(range(5))
