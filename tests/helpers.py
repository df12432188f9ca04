"""Test helpers that talk to the real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from services.common.artifacts import upload_artifact
from services.common.codec import decode_any
from services.common.featurespec import FeatureSpec
from services.common.kafka import assign_all, make_consumer, make_producer, start_with_retry
from services.common.model_version import VersionProposal
from services.common.settings import Settings
from services.registry.client import command, new_command
from services.trainer.datasets import CREDIT_SPEC


async def produce(
    settings: Settings, topic: str, values: list[tuple[bytes | None, bytes]], **opts: Any
) -> None:
    producer = make_producer(settings, **opts)
    await start_with_retry(producer.start, "test-producer", settings)
    try:
        futures = [await producer.send(settings.topic(topic), v, key=k) for k, v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume_until(
    settings: Settings,
    topic: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Decode a topic from the beginning until ``done(records)`` or the timeout."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "test-consumer", settings)
    out: list[dict[str, Any]] = []
    try:
        tps = await assign_all(consumer, settings.topic(topic))
        deadline = time.monotonic() + timeout_s
        while not done(out) and time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=300)
            for records in batches.values():
                out.extend(decode_any(topic, r.value or b"") for r in records)
    finally:
        await consumer.stop()
    return out


async def register_model(
    settings: Settings,
    onnx: bytes,
    version: str,
    stage: str | None = "champion",
    spec: FeatureSpec = CREDIT_SPEC,
    sha256: str | None = None,
    metadata: Any = None,
) -> dict[str, Any]:
    """Upload an artifact, register it and (optionally) promote it; returns the last outcome."""
    producer = make_producer(settings)
    await start_with_retry(producer.start, "test-upload", settings)
    try:
        ref = await upload_artifact(producer, settings, onnx)
    finally:
        await producer.stop()
    proposal = VersionProposal(
        version=version,
        artifact_uri=ref.uri,
        artifact_sha256=sha256 or ref.sha256,
        artifact_size=ref.size,
        feature_spec=spec,
        **({"metadata": metadata} if metadata is not None else {}),
    )
    outcome = await command(
        settings,
        new_command(settings.model_name, "register", "test", proposal=proposal.model_dump_json()),
    )
    if outcome["outcome"] != "applied" or stage is None:
        return outcome
    return await command(
        settings,
        new_command(settings.model_name, "promote", "test", version=version, target_stage=stage),
    )


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `scoremesh run` subprocess needs to share a test's settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env["SCOREMESH_HOME"] = os.environ["SCOREMESH_HOME"]
    for name, value in settings.model_dump(mode="json").items():
        if value is None or name in ("kafka_sasl_password", "api_token"):
            continue
        if isinstance(value, dict | list):
            env[f"SCOREMESH_{name.upper()}"] = orjson.dumps(value).decode()
        else:
            env[f"SCOREMESH_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    env.update(extra)
    return env


class ServiceProcess:
    """`scoremesh run <service>` as a real process, to be killed and restarted by tests."""

    def __init__(self, name: str, settings: Settings, log_dir: Any, **env: str) -> None:
        self.name = name
        self.env = service_env(settings, **{"SCOREMESH_METRICS_PORT": "0", **env})
        self.log_dir = log_dir
        self.proc: Any = None
        self.starts = 0

    def start(self) -> None:
        import subprocess
        import sys

        self.starts += 1
        log = (self.log_dir / f"{self.name}-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", self.name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return int(self.proc.wait(timeout))

    def log(self) -> str:
        return "".join(
            (self.log_dir / f"{self.name}-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )


async def wait_for_log(service: ServiceProcess, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in service.log():
        if time.monotonic() > deadline or service.proc.poll() is not None:
            raise AssertionError(f"{service.name} never logged {text!r}:\n{service.log()[-2000:]}")
        await asyncio.sleep(0.2)
