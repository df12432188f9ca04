"""The broker unreachable in the middle of a stream, for 15 s: every client connection goes
through a TCP relay the test cuts (open connections aborted, new ones refused) and then
restores. The hot path stays up, says so, reports not ready, retries without spinning,
and afterwards every event is accounted for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.common.devstack import DEV_KAFKA_SETTINGS, free_port
from services.common.kafka import ensure_topics
from services.common.settings import Settings
from services.registry.service import RegistryService
from tests.conftest import Running
from tests.faults.test_kill_hot_path import account, produce_raw, wait_all
from tests.helpers import (
    ServiceProcess,
    TcpProxy,
    cpu_seconds,
    health,
    metric,
    register_model,
    start_broker,
    wait_for_log,
)

pytestmark = pytest.mark.fault

N = 24_000
RATE = 1_000.0
OUTAGE_S = 15.0


def produced(port: int, settings: Settings) -> float:
    """Predictions the scorer has had acknowledged by the broker so far."""
    topic = settings.topic("predictions")
    return metric(port, "scoremesh_events_produced_total", service="scorer", topic=topic)


def log_lines(service: ServiceProcess, text: str) -> int:
    return sum(text in line for line in service.log().splitlines())


async def test_broker_cut_mid_stream_then_restored(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    kafka_port, proxy_port = free_port(), free_port()
    broker = start_broker(kafka_port, tmp_path / "tansu.log", advertised_port=proxy_port)
    proxy = TcpProxy(proxy_port, kafka_port)
    await proxy.start()
    s = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{proxy_port}", **DEV_KAFKA_SETTINGS}
    )
    ports = {"validator": free_port(), "scorer": free_port()}
    services = {
        name: ServiceProcess(name, s, tmp_path, SCOREMESH_METRICS_PORT=str(port))
        for name, port in ports.items()
    }
    try:
        await ensure_topics(s)
        async with Running(RegistryService(s)):
            assert (await register_model(s, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        for svc in services.values():
            svc.start()
        for svc in services.values():
            await wait_for_log(svc, "partitions assigned", timeout_s=90)
        traffic = asyncio.create_task(produce_raw(s, N, RATE))
        flowing = time.monotonic() + 60  # a loaded machine may take a while for the first hop
        while produced(ports["scorer"], s) == 0:
            assert time.monotonic() < flowing, "no predictions before the outage:\n" + "\n".join(
                svc.log()[-1500:] for svc in services.values()
            )
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)  # a steady stream, then the cut
        assert not traffic.done(), "the stream ended before the cut: make it longer"

        # --- the outage -------------------------------------------------------------------
        cpu_before = {n: cpu_seconds(svc.proc.pid) for n, svc in services.items()}
        lines_before = {n: len(svc.log().splitlines()) for n, svc in services.items()}
        await proxy.cut()
        cut_at = time.monotonic()
        not_ready: dict[str, str] = {}
        await asyncio.sleep(2)  # what was in flight at the cut settles or stalls
        stalled_at = produced(ports["scorer"], s)
        while time.monotonic() - cut_at < OUTAGE_S:
            for name, port in ports.items():
                status, body = health(port, "/readyz")
                if status == 503 and body["checks"]["kafka"].startswith("not ready"):
                    not_ready.setdefault(name, body["checks"]["kafka"])
            await asyncio.sleep(0.5)
        outage_s = time.monotonic() - cut_at
        cpu_share = {
            n: (cpu_seconds(svc.proc.pid) - cpu_before[n]) / outage_s for n, svc in services.items()
        }
        lines_during = {
            n: len(svc.log().splitlines()) - lines_before[n] for n, svc in services.items()
        }
        retries = {
            n: log_lines(svc, "Kafka not reachable, retrying") for n, svc in services.items()
        }
        during = produced(ports["scorer"], s) - stalled_at
        await proxy.restore()
        restored_at = time.monotonic()

        # --- recovery -----------------------------------------------------------------------
        while produced(ports["scorer"], s) <= stalled_at + during:
            assert time.monotonic() - restored_at < 90, "no prediction after the restore"
            await asyncio.sleep(0.05)
        first_prediction_s = time.monotonic() - restored_at
        ready_again: dict[str, float] = {}
        while len(ready_again) < len(ports) and time.monotonic() - restored_at < 60:
            for name, port in ports.items():
                if name not in ready_again and health(port, "/readyz")[0] == 200:
                    ready_again[name] = time.monotonic() - restored_at
            await asyncio.sleep(0.25)
        expected = await traffic
        valid, rejected, predictions = await wait_all(s, expected)
        drained_s = time.monotonic() - restored_at
        for name, svc in services.items():
            assert svc.proc.poll() is None, f"{name} died in the outage:\n{svc.log()[-3000:]}"
    finally:
        for svc in services.values():
            if svc.proc is not None and svc.proc.poll() is None:
                svc.terminate()
        await proxy.cut()
        broker.terminate()
        broker.wait(10)

    counts = account(expected, valid, rejected, predictions)
    for name, svc in services.items():
        log = svc.log()
        assert "Kafka unreachable; consuming and producing paused" in log, name
        assert "Kafka reachable again" in log, name
        # backoff 0.5 s doubling to 4 s: ~6 retries in 15 s, never a tight loop
        assert 3 <= retries[name] <= 12, f"{name}: {retries[name]} retry lines in {outage_s:.0f}s"
        assert lines_during[name] <= 40, f"{name} logged {lines_during[name]} lines in the outage"
        assert cpu_share[name] < 0.5, f"{name} used {cpu_share[name]:.0%} of a core while down"
    assert during == 0, f"{during} predictions acknowledged while the broker was cut off"
    assert set(not_ready) == set(ports), f"/readyz never said the broker was gone: {not_ready}"
    assert set(ready_again) == set(ports), f"/readyz did not recover: {ready_again}"
    assert counts["duplicated_valid"] <= 6 * 512 and counts["duplicated_predictions"] <= 6 * 512
    print(
        f"\nFAULT-TABLE | broker cut {outage_s:.0f}s mid-stream (validator+scorer) | "
        f"sent {counts['sent']} | lost 0 | duplicated valid {counts['duplicated_valid']}, "
        f"rejected {counts['duplicated_rejected']}, predictions "
        f"{counts['duplicated_predictions']} | restore -> first prediction "
        f"{first_prediction_s:.1f}s, ready {max(ready_again.values()):.1f}s, all accounted "
        f"{drained_s:.1f}s | retry log lines {retries}, CPU while down "
        f"{ {n: f'{v:.0%}' for n, v in cpu_share.items()} } | not ready said {not_ready}"
    )
