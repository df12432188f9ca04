"""How a client reaches the mesh: bootstrap servers, topic prefix, security, batching.

``ClientConfig.from_env()`` reads the same ``SCOREMESH_*`` variables as scoremesh's
services (``SCOREMESH_KAFKA_BOOTSTRAP``, ``SCOREMESH_TOPIC_PREFIX``, ...), then the
settings ``scoremesh dev up`` recorded for its embedded stack, then the defaults below,
which are production's: ``acks=all`` with idempotence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from scoremesh.client.errors import ClientConfigError
from scoremesh.contract.catalog import topic_name

ENV_PREFIX = "SCOREMESH_"
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

# ClientConfig field -> the services' setting (and so environment variable) of the same meaning
ENV_NAMES: dict[str, str] = {
    "bootstrap": "kafka_bootstrap",
    "topic_prefix": "topic_prefix",
    "security_protocol": "kafka_security_protocol",
    "sasl_mechanism": "kafka_sasl_mechanism",
    "sasl_username": "kafka_sasl_username",
    "sasl_password": "kafka_sasl_password",
    "ssl_cafile": "kafka_ssl_cafile",
    "ssl_certfile": "kafka_ssl_certfile",
    "ssl_keyfile": "kafka_ssl_keyfile",
    "client_id": "kafka_client_id",
    "idempotence": "kafka_idempotence",
    "linger_ms": "kafka_linger_ms",
    "max_batch_bytes": "kafka_max_batch_bytes",
    "max_request_bytes": "kafka_max_request_bytes",
    "fetch_max_wait_ms": "kafka_fetch_max_wait_ms",
    "session_timeout_ms": "kafka_session_timeout_ms",
    "heartbeat_interval_ms": "kafka_heartbeat_interval_ms",
    "rebalance_timeout_ms": "kafka_rebalance_timeout_ms",
    "connect_timeout_s": "kafka_connect_timeout_s",
}


@dataclass(frozen=True)
class ClientConfig:
    """Connection and producer/consumer settings shared by every client of this package."""

    bootstrap: str = "127.0.0.1:9092"
    """host:port[,host:port]"""
    topic_prefix: str = ""
    """prepended to every catalog topic name (the mesh's SCOREMESH_TOPIC_PREFIX)"""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "scoremesh-client"
    idempotence: bool = True
    """acks=all is always on; idempotence too unless the broker lacks it (the embedded one)"""
    linger_ms: int = 5
    max_batch_bytes: int = 256 * 1024
    max_request_bytes: int = 1024 * 1024
    fetch_max_wait_ms: int = 100
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 30_000
    connect_timeout_s: float = 30.0
    """give up starting a client after this long without a broker"""

    def __post_init__(self) -> None:
        if not self.bootstrap.strip():
            raise ClientConfigError("bootstrap: give host:port of at least one broker")
        if self.security_protocol not in get_args(SecurityProtocol):
            raise ClientConfigError(
                f"security_protocol {self.security_protocol!r}: one of "
                f"{', '.join(get_args(SecurityProtocol))}"
            )
        if self.sasl_mechanism is not None and self.sasl_mechanism not in get_args(SaslMechanism):
            raise ClientConfigError(
                f"sasl_mechanism {self.sasl_mechanism!r}: one of {', '.join(get_args(SaslMechanism))}"
            )
        for name in ("linger_ms",):
            if getattr(self, name) < 0:
                raise ClientConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "max_batch_bytes",
            "max_request_bytes",
            "fetch_max_wait_ms",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "rebalance_timeout_ms",
        ):
            if getattr(self, name) < 1:
                raise ClientConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.connect_timeout_s <= 0:
            raise ClientConfigError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")

    def topic(self, name: str) -> str:
        """The deployed name of a catalog topic (prefix + name); unknown names are refused."""
        return self.topic_prefix + topic_name(name)

    def replace(self, **changes: Any) -> ClientConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Keyword arguments, then ``SCOREMESH_*`` variables, then the embedded stack's
        recorded settings (after ``scoremesh dev up``), then the defaults."""
        values: dict[str, Any] = {}
        recorded = dev_stack_settings()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, setting in ENV_NAMES.items():
            env = f"{ENV_PREFIX}{setting.upper()}"
            if env in os.environ:
                values[name] = _parse(env, os.environ[env], fields[name].type)
            elif setting in recorded and recorded[setting] is not None:
                values[name] = _parse(
                    f"{dev_stack_file()}: {setting}", recorded[setting], fields[name].type
                )
        values.update(overrides)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ClientConfigError(f"ClientConfig: {exc}") from None


def _parse(source: str, raw: Any, annotation: Any) -> Any:
    kind = str(annotation)
    text = str(raw).strip()
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError as exc:
        raise ClientConfigError(f"{source}={raw!r}: {exc}") from None
    return text or None if "None" in kind else text


def default_home() -> Path:
    """Where scoremesh keeps local state: ``SCOREMESH_HOME``, else ``~/.scoremesh``."""
    return Path(os.environ.get(f"{ENV_PREFIX}HOME", Path.home() / ".scoremesh"))


def dev_stack_file(home: Path | None = None) -> Path:
    """The file ``scoremesh dev up`` writes for the embedded stack it started."""
    return (home or default_home()) / "dev" / "stack.json"


def dev_stack_settings(home: Path | None = None) -> dict[str, Any]:
    """The settings the running embedded stack recorded (none when it is not running, or
    when ``SCOREMESH_IGNORE_DEV_STACK`` is set)."""
    if os.environ.get(f"{ENV_PREFIX}IGNORE_DEV_STACK"):
        return {}
    try:
        data = json.loads(dev_stack_file(home).read_text())
    except (OSError, ValueError):
        return {}
    settings = data.get("settings", {}) if isinstance(data, dict) else {}
    return settings if isinstance(settings, dict) else {}
