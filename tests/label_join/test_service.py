"""label-join against the embedded broker and Redis: in-process, and killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from scoremesh.contract.codec import codec
from services.common.kafka import delete_topics, ensure_topics
from services.common.settings import Settings
from services.label_join.join import DAY_MS, HOUR_MS, JoinConfig
from services.label_join.labels import send_labels
from services.label_join.service import CHANGELOG, LabelJoinService, changelog_spec
from tests.conftest import Running
from tests.helpers import consume_until, produce, stop_processes, wait_until
from tests.label_join.factories import (
    T0,
    Scenario,
    encode_label,
    encode_prediction,
    model_version,
    scenario,
)
from tests.label_join.test_join_core import latest_by, sklearn_metrics

pytestmark = pytest.mark.integration

CONFIG = JoinConfig(window_ms=DAY_MS, grace_ms=HOUR_MS, tumbling_ms=HOUR_MS, sliding_ms=DAY_MS)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def join_settings(settings: Settings) -> AsyncIterator[Settings]:
    """The catalog's topics (from `settings`), the changelog, and a registry with two versions."""
    await ensure_topics(settings, [changelog_spec()])
    await produce(
        settings,
        "models.registry",
        [
            (mv.key.encode(), codec("ModelVersion").encode(mv.to_record()))
            for mv in (model_version("1.0.0", "champion", 2), model_version("1.1.0", "shadow", 3))
        ],
    )
    yield settings
    with contextlib.suppress(Exception):
        await delete_topics(settings, [CHANGELOG])
    client = aioredis.from_url(settings.require_redis())
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def predictions_kv(rows: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(p["event_id"].encode(), encode_prediction(p)) for p in rows]


def labels_kv(rows: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(lab["event_id"].encode(), encode_label(lab)) for lab in rows]


def _all_stats(service: LabelJoinService) -> dict[tuple[Any, ...], bytes]:
    return {
        (p, key): stats.to_json()
        for p, ps in service.core.partitions.items()
        for key, stats in ps.stats.items()
    }


def newest_stats(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The last published record per (version, variant, segment, kind, window start)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (r["model_version"], r["variant"], r["segment"], r["window_kind"], r["window_start"])
        if key not in out or r["emitted_at"] >= out[key]["emitted_at"]:
            out[key] = r
    return out


def latest_sliding(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest sliding-window record of segment "all", per (version, variant)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["window_kind"] != "sliding" or r["segment"] != "all":
            continue
        key = (r["model_version"], r["variant"])
        if key not in out or r["emitted_at"] >= out[key]["emitted_at"]:
            out[key] = r
    return out


def expected(s: Scenario, variant: str, channel: str | None = None) -> dict[str, float]:
    rows = [
        p
        for p in s.predictions
        if p["variant"] == variant
        and p["event_id"] in s.truth
        and (channel is None or p["attributes"]["channel"] == channel)
    ]
    truth = [s.truth[p["event_id"]] for p in rows]
    return sklearn_metrics(truth, [p["decision"] for p in rows], [p["scores"]["1"] for p in rows])


def assert_counted_once(
    records: list[dict[str, Any]], s: Scenario, predicted: int, log: str
) -> None:
    """Both variants' newest sliding window counts every prediction and label of the
    scenario exactly once, with scikit-learn's metrics on the same rows."""
    sliding = latest_sliding(records)
    for variant, version in (("champion", "1.0.0"), ("shadow", "1.1.0")):
        r = sliding[(version, variant)]
        m = r["metrics"]
        assert (m["predicted"], m["labeled"], r["count"]) == (
            predicted,
            len(s.truth),
            len(s.truth),
        ), log[-3000:]
        for name, value in expected(s, variant).items():
            assert m[name] == pytest.approx(value, rel=1e-9), (variant, name)


@pytest.mark.parametrize("store", ["disk", "memory"])
async def test_join_on_the_broker_matches_sklearn_and_routes_every_label(
    join_settings: Settings, store: str, tmp_path: Path
) -> None:
    settings = join_settings.replace(label_join_store=store, label_join_data_dir=tmp_path)
    s = scenario(300, seed=8, window_ms=CONFIG.window_ms)
    service = LabelJoinService(settings, CONFIG, publish_interval_s=0.3)
    counts = service.core.counts
    async with Running(service):
        # phases, so event time advances as the scenario says (labels may still come first)
        await produce(settings, "labels", labels_kv(s.early_labels))
        await wait_until("early labels", lambda: counts["label_pending"] == len(s.early_labels))
        await produce(settings, "predictions", predictions_kv(s.predictions))
        await produce(settings, "labels", labels_kv(s.labels + s.unknown))
        n_labels = len(s.early_labels) + len(s.labels) + len(s.unknown)
        await wait_until(
            "predictions and labels",
            lambda: (
                counts["prediction"] + counts["prediction_duplicate"] == len(s.predictions)
                and counts["label"] == n_labels
            ),
        )
        await produce(settings, "predictions", predictions_kv(s.flush))
        await wait_until("the flush", lambda: counts["expired"] >= 300)
        await produce(settings, "labels", labels_kv(s.late_labels))
        await wait_until("late labels", lambda: counts["unmatched_too_late"] == len(s.late_labels))
        await asyncio.sleep(1.0)  # a publish after the last batch
        health_ok = {tp.partition for tp in service.loop.assigned} <= service.restored_partitions
        held = (service.core.pending_entries, _all_stats(service))
    assert health_ok
    if store == "disk":  # a clean restart on the same disk reads nothing from the changelog
        again = LabelJoinService(settings, CONFIG, publish_interval_s=0.3)
        async with Running(again):
            await wait_until("the restore", lambda: len(again.restored_partitions) == 6)
            assert again.changelog_read == {p: 0 for p in range(6)}
            assert (again.core.pending_entries, _all_stats(again)) == held

    stats = newest_stats(
        await consume_until(settings, "monitoring.stats", lambda r: False, timeout_s=3)
    )
    window = (T0, "tumbling")
    for variant, version in (("champion", "1.0.0"), ("shadow", "1.1.0")):
        for channel in (None, "web", "branch", "partner"):
            segment = "all" if channel is None else f"channel={channel}"
            record = stats[(version, variant, segment, window[1], window[0])]
            for name, value in expected(s, variant, channel).items():
                assert record["metrics"][name] == pytest.approx(value, rel=1e-9), (
                    variant,
                    segment,
                    name,
                )
        all_ = stats[(version, variant, "all", "tumbling", T0)]
        assert all_["count"] == len(s.truth) and all_["window_end"] == T0 + HOUR_MS
        assert all_["metrics"]["predicted"] == 300
        assert all_["metrics"]["expired_unlabeled"] == 300 - len(s.truth)
        assert "error_rate:age:bin0" in all_["metrics"]

    labeled = await consume_until(settings, "predictions.labeled", lambda r: False, timeout_s=3)
    assert {k: v["label"] for k, v in latest_by(labeled, ("event_id", "variant")).items()} == {
        (e, v): y for e, y in s.truth.items() for v in ("champion", "shadow")
    }
    examples = await consume_until(settings, "training.examples", lambda r: False, timeout_s=3)
    assert {k[0]: v["label"] for k, v in latest_by(examples, ("event_id",)).items()} == s.truth
    unmatched = await consume_until(settings, "labels.unmatched", lambda r: False, timeout_s=3)
    assert sorted((u["reason"], u["event_id"]) for u in unmatched) == sorted(
        [("too_late", lab["event_id"]) for lab in s.late_labels]
        + [("unknown_event", lab["event_id"]) for lab in s.unknown]
    )

    client = aioredis.from_url(settings.require_redis())
    try:
        prefix = f"{settings.redis_key_prefix}monitor:credit"
        latest = await client.hgetall(f"{prefix}:1.0.0:champion:all")
        index = await client.smembers(f"{prefix}:index")
    finally:
        await client.aclose()
    sliding = orjson.loads(latest[b"sliding"])
    newest_sliding = max(
        (r for k, r in stats.items() if k[:4] == ("1.0.0", "champion", "all", "sliding")),
        key=lambda r: r["window_end"],
    )
    assert sliding == newest_sliding  # the flush's day: the first window has left it
    assert sliding["metrics"]["predicted"] == len(s.flush) and sliding["count"] == 0
    assert b"1.1.0:shadow:channel=web" in index


async def test_send_labels_checks_the_whole_file_before_sending(join_settings: Settings) -> None:
    settings = join_settings
    good = Path(os.environ["SCOREMESH_HOME"]) / f"labels-{settings.topic_prefix}jsonl"
    good.write_text(
        '{"event_id": "a", "value": "1", "label_time": 1767225600000}\n'
        '{"event_id": "b", "value": "0"}\n'
    )
    summary = await send_labels(settings, good)
    assert summary.ok and summary.sent == 2 and summary.format == "jsonl"
    bad = good.with_suffix(".csv")
    bad.write_text("event_id,value,label_time\nc,1,1767225600000\nd,2,\n")
    refused = await send_labels(settings, bad)  # "2" is no class of the registered versions
    assert not refused.ok and refused.sent == 0
    assert [str(b) for b in refused.bad] == [
        "line 3: value '2' is not one of the model's classes ['0', '1']"
    ]
    partial = await send_labels(settings, bad, skip_bad=True)
    assert partial.ok and partial.sent == 1
    sent = await consume_until(settings, "labels", lambda r: len(r) >= 3, timeout_s=10)
    assert [r["event_id"] for r in sent] == ["a", "b", "c"] or sorted(
        r["event_id"] for r in sent
    ) == ["a", "b", "c"]


# --- SIGKILL mid-stream --------------------------------------------------------------------

SERVICE_CODE = """
import sys
from services.common.lifecycle import run_service
from services.common.settings import Settings
from services.label_join.join import DAY_MS, HOUR_MS, JoinConfig
from services.label_join.service import LabelJoinService

settings = Settings()
config = JoinConfig(window_ms=DAY_MS, grace_ms=HOUR_MS, tumbling_ms=HOUR_MS, sliding_ms=DAY_MS)
sys.exit(
    run_service(
        "label-join", lambda: LabelJoinService(settings, config, publish_interval_s=0.5), settings
    )
)
"""


def start_service(
    settings: Settings,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    code: str = SERVICE_CODE,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env["SCOREMESH_HOME"] = os.environ["SCOREMESH_HOME"]
    env["SCOREMESH_IGNORE_DEV_STACK"] = "1"
    for name in (
        "kafka_bootstrap",
        "redis_url",
        "topic_prefix",
        "redis_key_prefix",
        "kafka_idempotence",
        "kafka_fetch_max_wait_ms",
        "kafka_session_timeout_ms",
        "kafka_heartbeat_interval_ms",
        "kafka_rebalance_timeout_ms",
    ):
        env[f"SCOREMESH_{name.upper()}"] = str(getattr(settings, name))
    env["SCOREMESH_METRICS_PORT"] = "0"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env or {})
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_sigkill_mid_stream_loses_no_join_state_and_counts_nothing_twice(
    join_settings: Settings, tmp_path: Path
) -> None:
    settings = join_settings
    s = scenario(6000, seed=13, window_ms=CONFIG.window_ms)
    # labels first for some events, then predictions and labels interleaved, paced, so the
    # kill lands while batches are in flight
    stream: list[tuple[str, tuple[bytes | None, bytes]]] = [
        ("labels", kv) for kv in labels_kv(s.early_labels)
    ]
    preds, labs = predictions_kv(s.predictions), labels_kv(s.labels)
    chunks = -(-len(preds) // 200)
    per_chunk = -(-len(labs) // chunks)
    for c in range(chunks):
        stream.extend(("predictions", kv) for kv in preds[c * 200 : (c + 1) * 200])
        stream.extend(("labels", kv) for kv in labs[c * per_chunk : (c + 1) * per_chunk])
    log_path = tmp_path / "label-join.log"

    async def send_all() -> None:
        for i in range(0, len(stream), 500):
            chunk = stream[i : i + 500]
            for topic in ("predictions", "labels"):
                part = [kv for t, kv in chunk if t == topic]
                if part:
                    await produce(settings, topic, part)
            await asyncio.sleep(0.15)

    first = start_service(settings, log_path)
    second: subprocess.Popen[bytes] | None = None
    killed_after = 0
    try:
        sender = asyncio.create_task(send_all())
        # kill once the join is visibly under way, while the sender is still producing
        labeled: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while len(labeled) < 1500 and time.monotonic() < deadline:
            labeled = await consume_until(
                settings, "predictions.labeled", lambda r: len(r) >= 1500, timeout_s=2
            )
            assert first.poll() is None, log_path.read_text()[-3000:]
        assert not sender.done(), "the stream ended before the kill: make it longer"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        killed_after = len(labeled)
        second = start_service(settings, log_path)
        await sender

        def final(records: list[dict[str, Any]]) -> bool:
            sliding = latest_sliding(records)
            return len(sliding) == 2 and all(
                r["metrics"]["predicted"] >= len(s.predictions) // 2
                and r["metrics"]["labeled"] >= len(s.truth)
                for r in sliding.values()
            )

        records = await consume_until(settings, "monitoring.stats", final, timeout_s=120)
        assert second.poll() is None, log_path.read_text()[-3000:]
        await asyncio.sleep(1.5)  # anything a double count would still publish
        records = await consume_until(settings, "monitoring.stats", lambda r: False, timeout_s=3)
    finally:
        stop_processes(first, second)
    assert killed_after < 2 * len(s.truth), "the kill came after the join had finished"

    assert_counted_once(records, s, len(s.predictions) // 2, log_path.read_text())

    labeled = await consume_until(settings, "predictions.labeled", lambda r: False, timeout_s=5)
    assert {k: v["label"] for k, v in latest_by(labeled, ("event_id", "variant")).items()} == {
        (e, v): y for e, y in s.truth.items() for v in ("champion", "shadow")
    }
    examples = await consume_until(settings, "training.examples", lambda r: False, timeout_s=5)
    assert {k[0]: v["label"] for k, v in latest_by(examples, ("event_id",)).items()} == s.truth
    assert "join state restored" in log_path.read_text()
