"""Test helpers that talk to the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from scoremesh.contract.codec import decode_any
from scoremesh.contract.featurespec import FeatureSpec
from services.common.artifacts import upload_artifact
from services.common.commands import command, new_command
from services.common.devstack import broker_binary, port_open
from services.common.kafka import assign_all, make_consumer, make_producer, start_with_retry
from services.common.model_version import VersionProposal
from services.common.settings import Settings
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
    model: str | None = None,
) -> dict[str, Any]:
    """Upload an artifact, register it and (optionally) promote it; returns the last outcome.
    ``model``: the model's name (the default model when not given)."""
    name = model or settings.model_name
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
        settings, new_command(name, "register", "test", proposal=proposal.model_dump_json())
    )
    if outcome["outcome"] != "applied" or stage is None:
        return outcome
    return await command(
        settings, new_command(name, "promote", "test", version=version, target_stage=stage)
    )


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`scoremesh ARGS` as a process with exactly this environment."""
    import sys

    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_in_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`scoremesh ARGS` in this process with exactly this environment: what ``cli`` does,
    without a Python start-up per command (for tests that run many)."""
    import contextlib
    import io
    import os

    from services.cli.main import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["scoremesh", *args], code, out.getvalue(), err.getvalue())


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `scoremesh run` subprocess needs to share a test's settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    env["SCOREMESH_HOME"] = os.environ["SCOREMESH_HOME"]
    typed = settings.model_dump()
    for name, value in settings.model_dump(mode="json").items():
        if value is None or name in ("kafka_sasl_password", "api_token"):
            continue
        if isinstance(value, dict):  # a group (api, monitor): secrets and unset values stay
            # out, so that a flat variable (SCOREMESH_API_TOKEN) given in ``extra`` applies
            value = {
                k: v
                for k, v in value.items()
                if v is not None and not isinstance(typed[name][k], SecretStr)
            }
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


def stop_processes(*procs: Any, timeout_s: float = 20) -> None:
    """SIGTERM each process still running, wait for it, SIGKILL it if it does not stop."""
    import signal
    import subprocess

    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_until(
    what: str, check: Callable[[], bool], timeout_s: float = 60.0, every_s: float = 0.05
) -> None:
    """Until ``check()`` (asked every ``every_s``); TimeoutError naming ``what`` past the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        await asyncio.sleep(every_s)


async def wait_for_log(service: ServiceProcess, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in service.log():
        if time.monotonic() > deadline or service.proc.poll() is not None:
            raise AssertionError(f"{service.name} never logged {text!r}:\n{service.log()[-2000:]}")
        await asyncio.sleep(0.2)


def start_broker(
    port: int, log: Path, advertised_port: int | None = None
) -> subprocess.Popen[bytes]:
    """A private tansu broker; ``advertised_port`` sends every client to another port."""
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised_port or port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def health(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET a service's /healthz or /readyz: (status, JSON body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of a metric's samples on a service's /metrics whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def produce_steadily(
    settings: Settings,
    topic: str,
    values: list[tuple[bytes | None, bytes]],
    rate: float,
    sent: list[int] | None = None,
    **opts: Any,
) -> None:
    """Send at about ``rate`` records/s, waiting for acknowledgements every 200 records.

    ``sent`` (if given) holds the number acknowledged so far, for tests that act mid-stream.
    """
    producer = make_producer(settings, **opts)
    await start_with_retry(producer.start, "steady-producer", settings)
    started = time.monotonic()
    futures = []
    try:
        for i, (key, value) in enumerate(values):
            futures.append(await producer.send(settings.topic(topic), value, key=key))
            if i % 200 == 199:
                await asyncio.gather(*futures)
                futures.clear()
                if sent is not None:
                    sent[:] = [i + 1]
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        await asyncio.gather(*futures)
        if sent is not None:
            sent[:] = [len(values)]
    finally:
        await producer.stop()


class TcpProxy:
    """A TCP relay between Kafka clients and the broker, so a test can cut the network.

    ``cut()`` aborts every open connection and closes the listening socket (new connections
    are refused); ``restore()`` listens again on the same port.
    """

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.connections):
            writer.transport.abort()
        self.connections.clear()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None

    async def restore(self) -> None:
        await self.start()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self.accepted += 1
        self.connections |= {client_w, broker_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))
        self.connections -= {client_w, broker_w}


class S3Server:
    """A real S3-compatible server: moto's server mode as a subprocess on a free port."""

    def __init__(self, log: Path) -> None:
        import sys

        from services.common.devstack import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"moto server did not start; see {log}")
            time.sleep(0.05)

    def settings(self, bucket: str, prefix: str = "scoremesh") -> dict[str, Any]:
        """Settings (flat names, for ``Settings.replace``) that store new artifacts in
        ``bucket`` (created here)."""
        self.client().create_bucket(Bucket=bucket)
        return {
            "artifact_store": f"s3://{bucket}/{prefix}",
            "s3_endpoint_url": self.endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
            "s3_path_style": True,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
