"""`scoremesh monitor status` and the query API show the label join's performance per
version, variant and segment, as the label join published it to Redis."""

from __future__ import annotations

import pytest

from services.common.performance import Contribution, GroupStats, delay_bucket
from services.common.settings import Settings
from services.label_join.join import DAY_MS, HOUR_MS, JoinConfig
from services.label_join.service import ShardStore
from services.monitor.status import SEGMENT_COLUMNS, format_table, monitor_status
from services.monitor.store import AlertStore

pytestmark = pytest.mark.integration

CONFIG = JoinConfig(window_ms=DAY_MS, grace_ms=HOUR_MS, tumbling_ms=HOUR_MS, sliding_ms=DAY_MS)


def stats(rows: list[tuple[str, str, str]]) -> GroupStats:
    """(label, decision, salary bin) per joined row, each label an hour late."""
    out = GroupStats(("bad", "good"), "bad")
    out.predicted = len(rows) + 10
    for label, decision, salary in rows:
        c = Contribution(label, decision, 0.5, 0.25, delay_bucket(3_600_000), (f"salary:{salary}",))
        out.add(c)
    return out


def record(segment: str, window_kind: str, s: GroupStats) -> dict[str, object]:
    return {
        "model": "churn",
        "model_version": "2.0.0",
        "variant": "champion",
        "segment": segment,
        "window_kind": window_kind,
        "window_start": 0,
        "window_end": DAY_MS,
        "count": s.labeled,
        "metrics": s.metrics(),
        "emitted_at": DAY_MS,
    }


async def test_status_shows_each_segments_metrics_and_its_worst_feature_bin(
    settings: Settings,
) -> None:
    # bin9: 30 rows, 12 wrong; bin1: 40 rows, 2 wrong; bin5: 5 rows, all wrong (too few)
    rows = [("bad", "good", "bin9")] * 12 + [("good", "good", "bin9")] * 18
    rows += [("bad", "good", "bin1")] * 2 + [("good", "good", "bin1")] * 38
    rows += [("bad", "good", "bin5")] * 5
    all_rows = stats(rows)
    west = stats(rows[:30])
    shards = ShardStore(settings, CONFIG, None)
    store = AlertStore(settings, ttl_s=60, recent=1)
    shards.client = store.client
    try:
        await shards.put_latest(
            [
                record("all", "tumbling", all_rows),
                record("all", "sliding", all_rows),
                record("region=west", "tumbling", west),  # no sliding window yet
            ]
        )
        status = await monitor_status(settings, alerts_from="redis", store=store)
        by_segment = {r["segment"]: r for r in status.segments}
        assert list(by_segment) == ["all", "region=west"]
        whole = by_segment["all"]
        assert whole["window"].startswith("sliding") and whole["labeled"] == 75
        assert whole["accuracy"] == f"{56 / 75:.4g}" and whole["label_delay_p50_s"]
        assert whole["worst_bin"] == "salary bin9: 0.4 of 30"
        assert [b["bin"] for b in whole["error_bins"]] == ["bin9", "bin1", "bin5"]
        assert by_segment["region=west"]["window"].startswith("tumbling")
        assert "salary bin9" in format_table(status.segments, SEGMENT_COLUMNS, width=250)
        # the same records through the read model, one model at a time (the query API)
        only = await store.performance_records("churn")
        assert {r["segment"] for r in only} == {"all", "region=west"}
        assert await store.performance_records("credit") == []
    finally:
        keys = await store.client.keys(f"{settings.redis_key_prefix}*")
        if keys:
            await store.client.delete(*keys)
        await store.close()
