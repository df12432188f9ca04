"""faust downstream: the contract's Records decode and encode through the Avro codec, and
examples/faust_cases.py, run as a faust worker on the embedded broker, turns exactly the
served predictions at or above its threshold into cases."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from scoremesh.client import Prediction, decode, encode, partition_for
from scoremesh.client.faust_codecs import register_codecs
from scoremesh.client.faust_records import Alert
from scoremesh.client.faust_records import Prediction as PredictionRecord
from services.common.kafka import (
    assign_all,
    client_options,
    make_consumer,
    read_to_end,
    start_with_retry,
)
from services.common.settings import Settings
from tests.contract.samples import SAMPLES
from tests.helpers import produce, service_env

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "downstream.md"
THRESHOLD = 0.8


def test_records_decode_every_version_and_encode_the_newest() -> None:
    data = encode("predictions", SAMPLES["Prediction"])  # type: ignore[arg-type]
    record = PredictionRecord.loads(data)
    assert (record.event_id, record.score, record.attributes) == ("evt-1", 0.75, {"channel": "web"})
    assert record.dumps() == data
    alert = Alert(
        alert_key="credit/1.0.0/psi", kind="drift", severity="warning", state="firing",
        model="credit", summary="psi", first_seen=1, last_seen=2,
    )  # fmt: skip
    assert decode("alerts", alert.dumps())["subject"] == {}  # None -> the schema's default
    names = register_codecs()
    assert "scoremesh.Prediction" in names
    from faust.serializers import codecs

    assert codecs.loads("scoremesh.Prediction", data)["event_id"] == "evt-1"


def worker_command() -> list[str]:
    """The worker command docs/downstream.md shows, to run as written (python: this one)."""
    (line,) = [
        line
        for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
        for line in block.splitlines()
        if "examples/faust_cases.py" in line
    ]
    argv = shlex.split(line)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def predictions() -> list[Prediction]:
    out = []
    for i in range(48):
        score = round((i * 37 % 100) / 100, 2)
        out.append(
            {
                **SAMPLES["Prediction"],
                "event_id": f"evt-{i}",
                "entity_id": f"cust-{i % 5}",
                "score": score,
                "decision": "1" if score >= 0.5 else "0",
                "served": i % 4 != 0,
                "variant": "champion" if i % 4 != 0 else "shadow",
            }
        )
    return out  # type: ignore[return-value]


async def committed(settings: Settings, group: str, ends: dict[int, int]) -> bool:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        topic = settings.topic("predictions")
        tps = [TopicPartition(topic, p) for p in ends]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return all(
        offsets.get(tp) is not None and offsets[tp].offset >= ends[tp.partition] for tp in tps
    )


@pytest.mark.e2e
async def test_the_faust_example_opens_exactly_the_expected_cases(
    settings: Settings, tmp_path: Path
) -> None:
    sent = predictions()
    await produce(
        settings, "predictions", [(p["event_id"].encode(), encode("predictions", p)) for p in sent]
    )
    ends: dict[int, int] = {}
    for p in sent:
        partition = partition_for(p["event_id"], 6)
        ends[partition] = ends.get(partition, 0) + 1
    expected = sorted(
        (
            {
                "event_id": p["event_id"],
                "entity_id": p["entity_id"],
                "model": p["model"],
                "model_version": p["model_version"],
                "score": p["score"],
                "decision": p["decision"],
                "event_time": p["event_time"],
            }
            for p in sent
            if p["served"] and p["score"] >= THRESHOLD
        ),
        key=lambda c: str(c["event_id"]),
    )
    assert 3 < len(expected) < len(sent)

    group = f"cases-{uuid.uuid4().hex[:6]}"
    env = {
        **service_env(settings),
        "CASES_APP_ID": group,
        "CASES_THRESHOLD": str(THRESHOLD),
        "APP_DATADIR": str(tmp_path / "faust"),  # faust's state dir, else <app id>-data here
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = await asyncio.create_subprocess_exec(
        *worker_command(), env=env, cwd=ROOT, stdout=log, stderr=log
    )
    try:
        async with asyncio.timeout(120):
            while not await committed(settings, group, ends):
                assert worker.returncode is None, (tmp_path / "worker.log").read_text()[-3000:]
                await asyncio.sleep(0.5)
        # every prediction is processed and committed, and faust flushes its producer
        # before it commits: the cases topic is complete
        cases: list[dict[str, Any]] = []
        consumer = make_consumer(settings, group_id=None)
        await start_with_retry(consumer.start, "test", settings)
        try:
            tps = await assign_all(consumer, f"{settings.topic_prefix}cases")
            await read_to_end(consumer, tps, lambda r: cases.append(orjson.loads(r.value or b"")))
        finally:
            await consumer.stop()
        assert sorted(cases, key=lambda c: str(c["event_id"])) == expected
    finally:
        if worker.returncode is None:
            worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)
        log.close()
