"""One machine, as a new user runs it: services on the dev stack coexist (each binds a free
port and says which), `scoremesh dev status` shows them, and a taken port or a broker that
refuses a feature is one line naming the setting, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.devstack import StackState
from tests.conftest import ensure_topics_sync
from tests.helpers import cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(stack: StackState, home: Path, tmp_path: Path) -> dict[str, str]:
    """A new shell after `scoremesh dev up`: nothing configured but the home the stack file
    is in (and a topic prefix of its own, so tests do not share topics)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    tag = uuid.uuid4().hex[:8]
    environ.update(
        SCOREMESH_HOME=str(home),
        SCOREMESH_TOPIC_PREFIX=f"one-{tag}.",
        SCOREMESH_REDIS_KEY_PREFIX=f"test:{tag}:",
        SCOREMESH_ARTIFACT_DIR=str(tmp_path / "artifacts"),
    )
    ensure_topics_sync(environ)
    return environ


def scoremesh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(env, *args, timeout=60)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other program already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def one_error_line(output: str) -> dict[str, Any]:
    assert "Traceback" not in output, output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1 and "exc" not in errors[0], output
    return errors[0]


def test_services_on_the_dev_stack_coexist_and_dev_status_shows_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", name],
            env=env,
            stdout=(tmp_path / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for name in ("registry", "validator")
    }
    try:
        deadline = time.monotonic() + 60
        mine: list[dict[str, Any]] = []
        while len(mine) < 2:
            assert time.monotonic() < deadline, [p.read_text() for p in tmp_path.glob("*.log")]
            for name, proc in procs.items():
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
            status = json.loads(scoremesh(env, "dev", "status", "-o", "json").stdout)
            mine = [
                s for s in status["services"] if s["topic_prefix"] == env["SCOREMESH_TOPIC_PREFIX"]
            ]
            time.sleep(0.3)
        ports = {s["service"]: s["metrics_port"] for s in mine}
        assert set(ports) == {"registry", "validator"} and len(set(ports.values())) == 2
        assert 0 not in ports.values()
        for name, port in ports.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                assert json.loads(resp.read())["service"] == name
            logged = (tmp_path / f"{name}.log").read_text()
            assert f'"url":"http://127.0.0.1:{port}/readyz"' in logged
        table = scoremesh(env, "dev", "status").stdout
        assert f"http://127.0.0.1:{ports['registry']}" in table
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs.values()]
    assert codes == [0, 0]
    status = json.loads(scoremesh(env, "dev", "status", "-o", "json").stdout)
    assert not [s for s in status["services"] if s["pid"] in {p.pid for p in procs.values()}]


def test_a_taken_metrics_port_is_one_line_naming_the_setting(
    env: dict[str, str], listening: int
) -> None:
    done = scoremesh(
        {**env, "SCOREMESH_METRICS_HOST": "127.0.0.1", "SCOREMESH_METRICS_PORT": str(listening)},
        "run",
        "registry",
    )
    assert done.returncode == 1
    error = one_error_line(done.stdout + done.stderr)
    assert error["msg"] == (
        f"registry cannot listen on 127.0.0.1:{listening} for /healthz, /readyz and /metrics "
        "(address already in use); set SCOREMESH_METRICS_PORT to a free port (0 picks one)"
    )


def test_a_taken_api_port_is_one_line_naming_the_setting(
    env: dict[str, str], listening: int
) -> None:
    done = scoremesh(
        {**env, "SCOREMESH_API_HOST": "127.0.0.1", "SCOREMESH_API_PORT": str(listening)},
        "run",
        "query",
    )
    assert done.returncode == 1
    error = one_error_line(done.stdout + done.stderr)
    assert "SCOREMESH_API_PORT" in error["msg"] and f"127.0.0.1:{listening}" in error["msg"]
    assert "address already in use" in error["msg"]


def test_a_broker_without_idempotent_producers_is_named_not_called_unreachable(
    env: dict[str, str], tmp_path: Path
) -> None:
    # The embedded broker has no idempotent producer: the refusal a cluster without it gives.
    refusing = {**env, "SCOREMESH_KAFKA_IDEMPOTENCE": "true"}
    started = time.monotonic()
    service = scoremesh(refusing, "run", "registry")
    assert time.monotonic() - started < 25, "a refusal is final: no retrying until the timeout"
    assert service.returncode == 1
    error = one_error_line(service.stdout + service.stderr)
    assert "refused an idempotent producer (InitProducerId" in error["msg"]
    assert "SCOREMESH_KAFKA_IDEMPOTENCE=false" in error["msg"]

    events = tmp_path / "events.jsonl"
    events.write_text('{"event_id": "e-1", "entity_id": "c-1", "features": {"age": 30}}\n')
    cli = scoremesh(refusing, "events", "send", str(events))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    line = cli.stderr.strip().splitlines()[-1]
    assert line.startswith("scoremesh: events-send: Kafka at ") and "answered but refused" in line
    assert "SCOREMESH_KAFKA_IDEMPOTENCE=false" in line and "not reachable" not in cli.stderr


def test_mutating_commands_say_which_cluster_on_stderr(
    env: dict[str, str], stack: StackState, home: Path, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"event_id": "e-1", "entity_id": "c-1", "features": {"age": 30}}\n')
    prefix = env["SCOREMESH_TOPIC_PREFIX"]
    sent = scoremesh(env, "events", "send", str(events), "-o", "json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["sent"] == 1  # stdout stays machine-readable
    assert sent.stderr.splitlines() == [
        f"cluster: Kafka {stack.kafka_bootstrap} from the dev stack "
        f"({home / 'dev' / 'stack.json'}), topics prefixed {prefix!r}"
    ]
    exported = {**env, "SCOREMESH_KAFKA_BOOTSTRAP": stack.kafka_bootstrap}
    again = scoremesh(exported, "events", "send", str(events))
    assert (
        f"cluster: Kafka {stack.kafka_bootstrap} from SCOREMESH_KAFKA_BOOTSTRAP (the dev stack's)"
        in again.stderr
    )
    forgot = scoremesh(env, "forget", "c-1", "-o", "json")
    assert forgot.returncode == 0 and json.loads(forgot.stdout)["entity_id"] == "c-1"
    assert forgot.stderr.startswith(f"cluster: Redis {stack.redis_url} from the dev stack")
    read = scoremesh(env, "models", "list", "-o", "json")
    assert read.returncode == 0 and "cluster:" not in read.stderr  # reading changes nothing
