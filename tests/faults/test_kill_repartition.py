"""SIGKILL the label join between forwarding records to their partition and committing their
input: after the restart the forwards come again, and the join counts each label once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from scoremesh.contract.partitioner import partitions_for_keys
from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry
from services.common.settings import Settings
from services.label_join.repartition import KIND_HEADER
from tests.helpers import consume_until, stop_processes
from tests.integration.test_any_client import confluent_send, pending_labels
from tests.label_join.factories import scenario
from tests.label_join.test_join_core import latest_by
from tests.label_join.test_service import (
    CONFIG,
    SERVICE_CODE,
    assert_counted_once,
    join_settings,
    labels_kv,
    latest_sliding,
    predictions_kv,
    start_service,
)

pytestmark = pytest.mark.fault
__all__ = ["join_settings"]  # the fixture

KILL_AFTER = 500  # forwarded labels

# The join as `scoremesh run label-join` runs it, dying (SIGKILL, no clean-up) right after
# a batch's forwards are acknowledged by the broker, before the batch's offsets could be
# committed: the moment a forward is on the repartition topic and its input not done.
KILLED_AFTER_FORWARD = (
    f"""
import asyncio, os, signal
from services.label_join.repartition import Repartitioner

os.environ["SCOREMESH_LABEL_JOIN_BATCH_MAX_RECORDS"] = "300"  # batches committed before

_forward = Repartitioner.forward

async def forward_then_die(self, producer, forwards, service):
    futures = await _forward(self, producer, forwards, service)
    if any(f.kind == "label" for f in forwards) and self.forwarded["label"] >= {KILL_AFTER}:
        await asyncio.gather(*futures)
        print("forwarded and acknowledged; dying before the commit", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return futures

Repartitioner.forward = forward_then_die
"""
    + SERVICE_CODE
)


async def repartitioned(settings: Settings) -> dict[str, int]:
    """Records on the repartition topic, by kind."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "test-repartition", settings)
    kinds: dict[str, int] = {}

    def count(record: Any) -> None:
        kind = dict(record.headers)[KIND_HEADER].decode()
        kinds[kind] = kinds.get(kind, 0) + 1

    try:
        tps = await assign_all(consumer, settings.topic("label-join.repartition"))
        await read_to_end(consumer, tps, count, 30)
    finally:
        await consumer.stop()
    return kinds


async def test_sigkill_after_forwarding_before_the_commit_counts_every_label_once(
    join_settings: Settings, tmp_path: Path
) -> None:
    settings = join_settings
    s = scenario(2400, seed=17, window_ms=CONFIG.window_ms)
    # every record through librdkafka's default partitioner: ~5 in 6 on another partition
    preds = predictions_kv(s.predictions)
    labs = labels_kv(s.early_labels + s.labels)
    placed_preds = await asyncio.to_thread(confluent_send, settings, "predictions", preds)
    placed_labels = await asyncio.to_thread(confluent_send, settings, "labels", labs)

    def wrong(kvs: list[tuple[bytes | None, bytes]], placed: list[int]) -> int:
        home = partitions_for_keys([k or b"" for k, _ in kvs], 6)
        return sum(p != h for p, h in zip(placed, home, strict=True))

    misplaced = {"prediction": wrong(preds, placed_preds), "label": wrong(labs, placed_labels)}
    assert misplaced["label"] > KILL_AFTER * 2  # the kill comes well before the end

    log_path = tmp_path / "label-join.log"
    first = start_service(settings, log_path, code=KILLED_AFTER_FORWARD)
    second: subprocess.Popen[bytes] | None = None
    try:
        assert first.wait(120) == -signal.SIGKILL, log_path.read_text()[-3000:]
        assert "dying before the commit" in log_path.read_text()
        second = start_service(settings, log_path)

        def final(records: list[dict[str, Any]]) -> bool:
            sliding = latest_sliding(records)
            return len(sliding) == 2 and all(
                r["metrics"]["predicted"] >= len(s.predictions) // 2
                and r["metrics"]["labeled"] >= len(s.truth)
                for r in sliding.values()
            )

        started = time.monotonic()
        records = await consume_until(settings, "monitoring.stats", final, timeout_s=120)
        assert second.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() - started < 120, "the join never finished"
        await asyncio.sleep(1.5)  # anything a double count would still publish
        records = await consume_until(settings, "monitoring.stats", lambda r: False, timeout_s=3)
        assert await pending_labels(settings) == 0
    finally:
        stop_processes(first, second)

    # the killed batch's forwards were sent again after the restart: more on the topic ...
    on_topic = await repartitioned(settings)
    assert on_topic["label"] > misplaced["label"]
    assert on_topic["prediction"] >= misplaced["prediction"]
    # ... and still every label counted once, every prediction once, none lost
    assert_counted_once(records, s, len(s.predictions) // 2, log_path.read_text())
    labeled = await consume_until(settings, "predictions.labeled", lambda r: False, timeout_s=5)
    print(
        f"\nFAULT-TABLE | SIGKILL label-join after a forward is acknowledged, before its input's "
        f"commit | {len(preds)} predictions + {len(labs)} labels via librdkafka's default "
        f"partitioner, {misplaced['prediction']} + {misplaced['label']} misplaced | forwarded "
        f"{on_topic['prediction']} + {on_topic['label']} (the killed batch's again) | labeled "
        f"{len(s.truth)} of {len(s.truth)} per variant, 0 twice, 0 pending"
    )
    assert {k: v["label"] for k, v in latest_by(labeled, ("event_id", "variant")).items()} == {
        (e, v): y for e, y in s.truth.items() for v in ("champion", "shadow")
    }
