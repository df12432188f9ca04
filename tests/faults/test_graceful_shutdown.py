"""SIGTERM mid-stream: the in-flight batch finishes, offsets are committed, nothing replays."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import Settings
from services.registry.service import RegistryService
from tests.conftest import Running
from tests.faults.test_kill_hot_path import account, produce_raw, wait_all
from tests.helpers import ServiceProcess, register_model, wait_for_log

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("victim", ["validator", "scorer"])
async def test_sigterm_mid_stream_is_clean(
    victim: str, settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        procs = {name: ServiceProcess(name, settings, tmp_path) for name in ("validator", "scorer")}
        for p in procs.values():
            p.start()
        try:
            for p in procs.values():
                await wait_for_log(p, "partitions assigned")
            traffic = asyncio.create_task(produce_raw(settings, 8_000, 2_000.0))
            await asyncio.sleep(3)
            started = time.monotonic()
            code = procs[victim].terminate(timeout=settings.shutdown_deadline_s + 5)
            took = time.monotonic() - started
            assert code == 0, procs[victim].log()[-3000:]
            assert took < settings.shutdown_deadline_s
            assert '"msg":"service stopped"' in procs[victim].log()
            procs[victim].start()
            expected = await traffic
            valid, rejected, predictions = await wait_all(settings, expected)
        finally:
            for p in procs.values():
                if p.proc.poll() is None:
                    p.terminate()
    counts = account(expected, valid, rejected, predictions)
    assert counts["duplicated_valid"] == 0 and counts["duplicated_predictions"] == 0, counts
