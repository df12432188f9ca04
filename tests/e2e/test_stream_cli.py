"""Feed, inspect, replay and forget from the CLI, against running services."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from services.common.kafka import make_producer, send_records
from services.common.settings import Settings
from services.label_join.join import Entry
from services.label_join.rows import EventRows
from services.label_join.service import CHANGELOG
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import CREDIT_SPEC, credit_events
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, register_model

pytestmark = pytest.mark.e2e


async def sm(settings: Settings, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env.update(SCOREMESH_HOME=os.environ["SCOREMESH_HOME"])
    for name in (
        "kafka_bootstrap",
        "redis_url",
        "topic_prefix",
        "redis_key_prefix",
        "kafka_idempotence",
        "kafka_fetch_max_wait_ms",
    ):
        value = getattr(settings, name)
        env[f"SCOREMESH_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_send_tail_replay_after_a_rule_fix_and_forget(
    settings: Settings, trained_model: Any, trained_model_b: Any, tmp_path: Path
) -> None:
    events = [e for e, _ in credit_events(40, seed=61)]
    old = [
        dict(e, features={**e["features"], "age": 104}, event_id=f"old-{i}")
        for i, e in enumerate(events[:5])
    ]
    good = tmp_path / "events.jsonl"
    good.write_bytes(b"\n".join(orjson.dumps(e) for e in events + old))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(orjson.dumps(events[0]) + b"\n{not json\n" + orjson.dumps({"event_id": "x"}))

    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        async with (
            Running(ValidatorService(settings)) as validator,
            Running(ScorerService(settings)),
        ):
            code, out, err = await sm(settings, "events", "send", str(broken))
            assert (
                code == 1
                and "line 2: not valid JSON" in err
                and "line 3: entity_id must be a non-empty string" in err
            )
            assert "nothing sent" in err

            code, out, err = await sm(settings, "events", "send", str(good), "-o", "json")
            assert code == 0, err
            assert orjson.loads(out) == {"sent": 45, "failed": 0, "skipped_bad_lines": 0}
            await consume_until(settings, "predictions", lambda r: len(r) >= 40)
            rejected = await consume_until(settings, "events.rejected", lambda r: len(r) >= 5)
            assert {r["reasons"][0]["code"] for r in rejected} == {"out_of_range"}

            code, out, _ = await sm(
                settings,
                "tail",
                "predictions",
                "--from-beginning",
                "--max",
                "3",
                "--filter",
                "variant=champion",
            )
            lines = [orjson.loads(line) for line in out.splitlines()]
            assert code == 0 and len(lines) == 3
            assert all(p["model_version"] == "1.0.0" and p["variant"] == "champion" for p in lines)

            # The fix: a new version whose rules accept applicants up to 110.
            relaxed = CREDIT_SPEC.model_copy(
                update={
                    "features": [
                        r.model_copy(update={"max": 110}) if r.name == "age" else r
                        for r in CREDIT_SPEC.features
                    ]
                }
            )
            assert (await register_model(settings, trained_model_b.onnx, "1.1.0", spec=relaxed))[
                "outcome"
            ] == "applied"
            deadline = time.monotonic() + 20
            while (
                "1.1.0"
                not in (rules.version if (rules := validator.core.rules.get("credit")) else "")
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.2)

            code, out, err = await sm(
                settings, "dlq", "replay", "--reason", "out_of_range", "-o", "json"
            )
            assert code == 0, err
            assert orjson.loads(out)["replayed"] == 5
            code, out, _ = await sm(settings, "dlq", "replay", "--reason", "out_of_range", "--json")
            summary = orjson.loads(out)
            assert (
                summary["replayed"] == 0
                and summary["already_valid"] + summary["already_replayed"] == 5
            )

            predictions = await consume_until(
                settings,
                "predictions",
                lambda r: {p["event_id"] for p in r} >= {e["event_id"] for e in old},
                timeout_s=60,
            )
            await asyncio.sleep(1.0)
            predictions = await consume_until(settings, "predictions", lambda r: False, timeout_s=2)
    replayed = [
        p for p in predictions if p["event_id"].startswith("old-") and p["variant"] == "champion"
    ]
    assert sorted(p["event_id"] for p in replayed) == sorted(
        e["event_id"] for e in old
    )  # each once
    assert {p["model_version"] for p in replayed} == {"1.1.0"}

    entity = events[0]["entity_id"]
    code, out, _ = await sm(settings, "forget", entity, "-o", "json")
    result = orjson.loads(out)
    assert code == 0 and result["predictions_removed"] >= 1 and result["keys_removed"] >= 2
    code, out, _ = await sm(settings, "forget", entity, "--json")
    assert orjson.loads(out)["keys_removed"] == 0


async def test_cli_input_errors(settings: Settings) -> None:
    code, _, err = await sm(settings, "tail", "no.such.topic")
    assert code == 1 and "unknown topic" in err
    code, _, err = await sm(settings, "tail", "predictions", "--filter", "novalue")
    assert code == 1 and "write FIELD OP VALUE" in err
    code, _, err = await sm(settings, "tail", "predictions", "--offset", "3", "--from-beginning")
    assert code == 1 and "give one" in err
    code, _, err = await sm(settings, "dlq", "replay", "--since", "yesterday")
    assert code == 1 and "ISO-8601" in err
    code, _, err = await sm(settings, "events", "send", "-", stdin=b"")
    assert code == 1 and "no events" in err


async def test_tail_reads_the_label_join_state(settings: Settings) -> None:
    """The join's changelog holds a JSON line and then the event's own Avro fields: tail
    shows both as one JSON record."""
    head_fields = {
        "event_id": "evt-tail-1",
        "entity_id": "cust-9",
        "event_time": 1_700_000_000_000,
        "features": {"age": 41, "salary": 52_000.5, "car": "c3"},
        "attributes": {"channel": "web"},
    }
    entry = Entry("evt-tail-1", event_time=head_fields["event_time"], label="1", label_time=5)
    entry.head, entry.time_end, entry.attrs_at = EventRows().head_of(head_fields)
    producer = make_producer(settings)
    await producer.start()
    try:
        topic = settings.topic(CHANGELOG)
        await send_records(producer, [(topic, 0, b"evt-tail-1", entry.encode())])
    finally:
        await producer.stop()
    code, out, err = await sm(settings, "tail", CHANGELOG, "--from-beginning", "--max", "1")
    assert code == 0, err
    shown = orjson.loads(out.splitlines()[0])
    assert shown["v"] == 2 and shown["l"] == ["1", 5]
    assert shown["head"] == head_fields


async def test_tail_shows_what_kcat_shows_and_starts_and_stops_where_asked(
    settings: Settings,
) -> None:
    """Key, partition, offset, timestamp and headers (-J); --partition, --offset (negative:
    from the end), --from-beginning, --exit-at-end; nested filters; table and YAML."""
    topic = settings.topic("events.raw")
    records = []
    for i in range(6):
        event = {
            "event_id": f"e{i}",
            "entity_id": f"c{i}",
            "event_time": 1_700_000_000_000 + i,
            "features": {"age": 50 + 5 * i},
        }
        records.append((topic, i % 2, f"c{i}".encode(), orjson.dumps(event)))
    producer = make_producer(settings)
    await producer.start()
    try:
        await send_records(producer, records[:4])
        await producer.send_and_wait(
            topic, records[4][3], key=b"c4", partition=0, headers=[("trace", b"t-4")]
        )
        await send_records(producer, records[5:])
    finally:
        await producer.stop()

    code, out, err = await sm(settings, "tail", "events.raw", "-J", "--from-beginning", "-e")
    assert code == 0, err
    shown = [orjson.loads(line) for line in out.splitlines()]
    assert sorted(r["value"]["event_id"] for r in shown) == [f"e{i}" for i in range(6)]
    four = next(r for r in shown if r["value"]["event_id"] == "e4")
    assert four["key"] == "c4" and four["partition"] == 0 and four["offset"] == 2
    assert four["headers"] == {"trace": "t-4"} and four["timestamp"] > 0
    assert four["topic"] == topic and four["time"].endswith("+00:00")

    code, out, _ = await sm(
        settings, "tail", "events.raw", "-p", "1", "--from-beginning", "--exit-at-end"
    )
    assert [orjson.loads(x)["event_id"] for x in out.splitlines()] == ["e1", "e3", "e5"]
    code, out, _ = await sm(settings, "tail", "events.raw", "--offset", "-1", "-e")
    assert sorted(orjson.loads(x)["event_id"] for x in out.splitlines()) == ["e4", "e5"]
    code, out, _ = await sm(settings, "tail", "events.raw", "-p", "0", "--offset", "1", "-e")
    assert [orjson.loads(x)["event_id"] for x in out.splitlines()] == ["e2", "e4"]
    code, out, _ = await sm(
        settings, "tail", "events.raw", "--from-beginning", "-e", "--filter", "features.age>60"
    )
    assert sorted(orjson.loads(x)["event_id"] for x in out.splitlines()) == ["e3", "e4", "e5"]
    code, out, _ = await sm(
        settings, "tail", "events.raw", "-p", "0", "--from-beginning", "-e", "-o", "table"
    )
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["PARTITION", "OFFSET", "TIME", "(UTC)"]
    assert [row.split()[:2] for row in rows] == [["0", "0"], ["0", "1"], ["0", "2"]]
    code, out, _ = await sm(
        settings, "tail", "events.raw", "-p", "1", "--from-beginning", "-e", "-J", "-o", "yaml"
    )
    assert [d["offset"] for d in yaml.safe_load_all(out)] == [0, 1, 2]
    code, _, err = await sm(settings, "tail", "events.raw", "-p", "9", "-e")
    assert code == 1 and "has partitions 0-" in err


async def test_topics_create_list_describe_on_a_cluster_without_them(settings: Settings) -> None:
    """Idempotent, with --dry-run; a topic that differs from the catalog is reported."""
    from scoremesh.contract.catalog import catalog
    from services.common.kafka import delete_topics

    fresh = settings.replace(topic_prefix=settings.topic_prefix + "own.")
    try:
        code, out, err = await sm(fresh, "topics", "create", "predictions", "labels", "--dry-run")
        assert code == 0, err
        assert "cluster: Kafka" in err and "would create 2, 0 already there" in out
        code, out, _ = await sm(fresh, "topics", "list", "-o", "json")
        listed = {r["topic"]: r for r in orjson.loads(out)}
        assert not listed[fresh.topic("predictions")]["on_broker"]
        code, out, err = await sm(fresh, "topics", "create", "predictions", "labels", "-o", "json")
        assert code == 0, err
        made = orjson.loads(out)
        assert [(t["topic"], t["action"]) for t in made["topics"]] == [
            (fresh.topic("predictions"), "created"),
            (fresh.topic("labels"), "created"),
        ]
        predictions = made["topics"][0]
        assert predictions["partitions"] == catalog()["predictions"].partitions
        assert predictions["configs"]["retention.ms"] == str(catalog()["predictions"].retention_ms)
        code, out, _ = await sm(fresh, "topics", "create", "predictions", "labels")
        assert code == 0 and "created 0, 2 already there" in out
        code, out, _ = await sm(fresh, "topics", "describe", "predictions", "-o", "yaml")
        described = yaml.safe_load(out)
        assert described["broker"]["partitions"] == described["catalog"]["partitions"]
        assert described["differences"] == []
        code, out, _ = await sm(fresh, "topics", "list")
        assert any(
            line.split()[0] == fresh.topic("labels") and "missing" not in line
            for line in out.splitlines()
        )
        code, _, err = await sm(fresh, "topics", "describe", "nope")
        assert code == 1 and "unknown topic 'nope'" in err
    finally:
        await delete_topics(fresh, list(catalog()))
