"""The README's path, as a user runs it: real processes, real broker, real Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from services.common.devstack import free_port, pid_alive
from tests.helpers import cli

pytestmark = pytest.mark.e2e


def scoremesh(
    args: list[str], home: Path, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    environ.update(SCOREMESH_HOME=str(home), **env)
    return cli(environ, *args, timeout=timeout)


def test_dev_up_is_idempotent_and_down_stops_what_it_started(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # forces the bundled redis-server
    up = scoremesh(["dev", "up", "-o", "json"], tmp_path, SCOREMESH_DEV_REDIS_PROBE_URL=closed)
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    assert set(state["started"]) == {"broker", "redis"} and not state["already_running"]
    pids = list(state["started"].values())
    assert all(pid_alive(p) for p in pids)
    again = scoremesh(["dev", "up", "-o", "json"], tmp_path, SCOREMESH_DEV_REDIS_PROBE_URL=closed)
    assert json.loads(again.stdout)["already_running"] is True
    assert scoremesh(["dev", "status"], tmp_path).returncode == 0
    down = scoremesh(["dev", "down", "-o", "json"], tmp_path)
    assert down.returncode == 0 and len(json.loads(down.stdout)["stopped"]) == 2
    assert not any(pid_alive(p) for p in pids)
    assert scoremesh(["dev", "status"], tmp_path).returncode == 1


def test_demo_accounts_for_every_event(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    token, password = "tok-7c1f0e5a9b", "pw-3d8e2b6f41"  # must never reach a log
    result = scoremesh(
        ["demo", "--events", "2000", "--no-retrain-loop", "--output", str(out)],
        tmp_path,
        SCOREMESH_API_TOKEN=token,
        SCOREMESH_KAFKA_SASL_PASSWORD=password,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["accounted"] is True
    assert report["produced"] == 2000
    assert report["valid"] + report["rejected"] == 2000
    assert report["scored"] == report["valid"] and report["unscored"] == 0
    assert report["rejected"] == 2000 - report["produced_by_kind"]["valid"]
    assert report["model_versions"] == {"1.0.0": report["valid"]}
    assert "every event accounted for" in result.stdout
    assert re.search(r"^console: http://127\.0\.0\.1:\d+/console ", result.stdout, re.M)
    assert report["service_exit_codes"]["query"] == 0
    assert not (tmp_path / "dev" / "stack.json").exists()  # the demo stopped what it started
    logs = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".html")]
    assert len(logs) >= 4
    for path in logs:
        text = path.read_text(errors="replace")
        assert token not in text and password not in text, f"a secret leaked into {path}"
    assert token not in result.stdout + result.stderr


def test_usage_errors_exit_2_and_config_errors_say_what_to_do(tmp_path: Path) -> None:
    bad = scoremesh(["demo", "--events", "-5"], tmp_path)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
    no_broker = scoremesh(["models", "list"], tmp_path)
    assert no_broker.returncode == 1
    assert (
        "SCOREMESH_KAFKA_BOOTSTRAP" in no_broker.stderr and len(no_broker.stderr.splitlines()) == 1
    )
