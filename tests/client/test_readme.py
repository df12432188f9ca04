"""The README's Python producer and consumer, run as written against the embedded broker
(the settings come from the environment, as the README says)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from scoremesh.client import Prediction, decode, encode, partition_for
from services.common.settings import Settings
from tests.client.test_producers import raw_records
from tests.contract.samples import SAMPLES
from tests.helpers import produce, service_env

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block(marker: str) -> str:
    (found,) = [b for b in python_blocks() if marker in b]
    return found


def test_the_readme_shows_a_producer_and_a_consumer() -> None:
    assert len(python_blocks()) == 2
    assert "msg.value()[10:]" not in README.read_text()


async def test_the_readme_producer_sends_an_event_and_a_label(
    settings: Settings, tmp_path: Path
) -> None:
    script = tmp_path / "producer.py"
    script.write_text(block("EventProducer"))
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=service_env(settings),
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()
    (event,) = await raw_records(settings, "events.raw", 1)
    assert event.key == b"cust-42"
    assert decode("events.raw", event.value)["features"]["salary"] == 52000.0
    (label,) = await raw_records(settings, "labels", 1)
    assert (label.key, label.partition) == (b"e-1001", partition_for("e-1001", 6))
    assert decode("labels", label.value)["value"] == "1"


async def test_the_readme_consumer_prints_served_predictions(
    settings: Settings, tmp_path: Path
) -> None:
    predictions: list[Prediction] = [
        {**SAMPLES["Prediction"], "event_id": f"e-{i}", "served": i % 3 != 0}  # type: ignore[typeddict-item]
        for i in range(12)
    ]
    await produce(
        settings,
        "predictions",
        [(p["event_id"].encode(), encode("predictions", p)) for p in predictions],
    )
    expected = sorted(
        f"{p['event_id']} {p['decision']} {p['score']} {p['model_version']} {p['variant']}"
        for p in predictions
        if p["served"]
    )
    script = tmp_path / "consumer.py"
    script.write_text(block("PredictionConsumer"))
    out = tmp_path / "out.txt"
    env = {**service_env(settings), "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=env, cwd=tmp_path, stdout=sink, stderr=sink
        )
    try:  # it runs until stopped, as a consumer does: wait for its output, then stop it
        deadline = time.monotonic() + 60
        while len(out.read_text().splitlines()) < len(expected) and proc.returncode is None:
            assert time.monotonic() < deadline, out.read_text()
            await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert sorted(out.read_text().splitlines()) == expected
