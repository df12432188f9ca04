"""The Python shown in README.md and docs/downstream.md, run as written against the embedded
broker (settings from the environment, as the docs say). Consumers run until stopped, as a
consumer does: each test waits for the output it expects, then stops it."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from scoremesh.client import Alert, Prediction, decode, encode, partition_for
from services.common.settings import Settings
from tests.client.test_producers import raw_records
from tests.contract.samples import SAMPLES
from tests.helpers import produce, service_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOWNSTREAM = ROOT / "docs" / "downstream.md"
CLIENT_README = ROOT / "client" / "README.md"


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)


def block(doc: Path, marker: str) -> str:
    (found,) = [b for b in python_blocks(doc) if marker in b]
    return found


def test_every_python_block_is_run_here() -> None:
    assert len(python_blocks(README)) == 2  # the producer and the consumer
    assert len(python_blocks(DOWNSTREAM)) == 3  # alerts, predictions, faust
    assert len(python_blocks(CLIENT_README)) == 1  # codec and partitioner, no broker
    assert "msg.value()[10:]" not in README.read_text()


async def run_until(
    settings: Settings, tmp_path: Path, code: str, expected: list[str], timeout_s: float = 60
) -> list[str]:
    """Run ``code`` until it has printed ``len(expected)`` lines, or until it exits when
    nothing is expected; its lines."""
    script = tmp_path / "example.py"
    script.write_text(code)
    out = tmp_path / "out.txt"
    env = {**service_env(settings), "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=env, cwd=tmp_path, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + timeout_s
        while proc.returncode is None and (
            not expected or len(out.read_text().splitlines()) < len(expected)
        ):
            assert time.monotonic() < deadline, out.read_text()
            await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    return out.read_text().splitlines()


async def test_the_readme_producer_sends_an_event_and_a_label(
    settings: Settings, tmp_path: Path
) -> None:
    lines = await run_until(settings, tmp_path, block(README, "EventProducer"), [])
    assert lines == []  # it exited, quietly
    (event,) = await raw_records(settings, "events.raw", 1)
    assert event.key == b"cust-42"
    assert decode("events.raw", event.value)["features"]["salary"] == 52000.0
    (label,) = await raw_records(settings, "labels", 1)
    assert (label.key, label.partition) == (b"e-1001", partition_for("e-1001", 6))
    assert decode("labels", label.value)["value"] == "1"


def some_predictions() -> list[Prediction]:
    return [
        {
            **SAMPLES["Prediction"],  # type: ignore[typeddict-item]
            "event_id": f"e-{i}",
            "served": i % 3 != 0,
            "decision": "1" if i % 2 else "0",
            "score": 0.1 + i / 20,
        }
        for i in range(12)
    ]


async def send_predictions(settings: Settings, predictions: list[Prediction]) -> None:
    await produce(
        settings,
        "predictions",
        [(p["event_id"].encode(), encode("predictions", p)) for p in predictions],
    )


async def test_the_readme_consumer_prints_served_predictions(
    settings: Settings, tmp_path: Path
) -> None:
    predictions = some_predictions()
    await send_predictions(settings, predictions)
    expected = [
        f"{p['event_id']} {p['decision']} {p['score']} {p['model_version']} {p['variant']}"
        for p in predictions
        if p["served"]
    ]
    code = block(README, "PredictionConsumer")
    assert sorted(await run_until(settings, tmp_path, code, expected)) == sorted(expected)


async def test_the_downstream_asyncio_consumer_queues_served_positives(
    settings: Settings, tmp_path: Path
) -> None:
    predictions = some_predictions()
    await send_predictions(settings, predictions)
    expected = [
        f"review {p['entity_id']} {p['event_id']} {round(p['score'], 3)}"
        for p in predictions
        if p["served"] and p["decision"] == "1"
    ]
    code = block(DOWNSTREAM, "async for p in predictions")
    assert sorted(await run_until(settings, tmp_path, code, expected)) == sorted(expected)


async def test_the_downstream_alert_consumer_pages_on_critical_firing(
    settings: Settings, tmp_path: Path
) -> None:
    alerts: list[Alert] = [
        {
            "alert_key": f"credit/1.0.0/{signal}",
            "kind": "drift",
            "severity": severity,
            "state": state,
            "model": "credit",
            "summary": f"{signal} {state}",
            "first_seen": 1,
            "last_seen": 2,
        }
        for signal, severity, state in (
            ("psi.age", "critical", "firing"),
            ("psi.salary", "warning", "firing"),
            ("error_rate", "critical", "resolved"),
            ("latency", "critical", "firing"),
        )
    ]
    await produce(
        settings, "alerts", [(a["alert_key"].encode(), encode("alerts", a)) for a in alerts]
    )
    expected = [
        "page: credit/1.0.0/psi.age psi.age firing",
        "page: credit/1.0.0/latency latency firing",
    ]
    code = block(DOWNSTREAM, "AlertConsumer")
    assert sorted(await run_until(settings, tmp_path, code, expected)) == sorted(expected)


async def test_the_downstream_faust_snippet_types_the_topic(
    settings: Settings, tmp_path: Path
) -> None:
    code = block(DOWNSTREAM, "faust.App") + (
        "\nassert predictions.value_type is Prediction\n"
        "assert app.conf.broker[0].port == int(__import__('os').environ"
        "['SCOREMESH_KAFKA_BOOTSTRAP'].rsplit(':', 1)[1])\nprint('ok')\n"
    )
    assert await run_until(settings, tmp_path, code, ["ok"]) == ["ok"]


async def test_the_client_readme_snippet_runs(settings: Settings, tmp_path: Path) -> None:
    assert await run_until(settings, tmp_path, python_blocks(CLIENT_README)[0], []) == []
