"""One frozen settings model, read once. Every knob has the env prefix ``SCOREMESH_``.

Precedence, highest first: keyword arguments, environment variables, the dev-stack file
written by ``scoremesh dev up`` (so services started after it find the embedded broker
and Redis without any configuration), then the defaults below.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from scoremesh.client.config import default_home as default_home
from scoremesh.client.config import dev_stack_file as dev_stack_file
from scoremesh.client.config import dev_stack_settings as dev_stack_settings
from scoremesh.contract.topics import TOPICS, TopicName
from services.common.policies.monitor import MonitorPolicy
from services.common.policies.retrain import PromotionPolicy, RetrainPolicy, TrainingWindowPolicy

ENV_PREFIX = "SCOREMESH_"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_CATALOG_NAMES = frozenset(TOPICS)


def in_environment(name: str) -> bool:
    """Whether the environment sets ``SCOREMESH_<NAME>`` (it wins over the dev stack file)."""
    variable = f"{ENV_PREFIX}{name}".upper()
    return any(key.upper() == variable for key in os.environ)


def _blank_is_none(value: object) -> object:
    # `SCOREMESH_API_TOKEN=` must disable mutating routes, not set an empty token.
    return None if isinstance(value, str) and not value.strip() else value


class _Group(BaseModel):
    """The settings of one service or concern, read as ``settings.<group>.<name>``; each is
    also set by its flat environment variable ``SCOREMESH_<GROUP>_<NAME>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class CanarySettings(_Group):
    guard: bool = Field(True, description="roll back a canary clearly worse than the champion")
    min_events: int = Field(500, ge=1)
    max_error_rate_delta: float = Field(0.01, ge=0, le=1)
    max_latency_ratio: float = Field(3.0, gt=1)
    min_batches: int = Field(
        100,
        ge=20,
        description="batches both versions scored before latency p99s are compared "
        "(fewer make the p99 the single slowest batch)",
    )


class RetrainSettings(_Group):
    policy: RetrainPolicy = Field(default_factory=RetrainPolicy)


class TrainerSettings(_Group):
    window: TrainingWindowPolicy = Field(
        default_factory=TrainingWindowPolicy,
        description="what a retrain trains on: the window plus a bounded older sample",
    )
    recipe_packages: list[str] = Field(
        default_factory=list,
        description="top-level packages the trainer may import recipe entry points from; "
        "empty = any installed package outside the standard library",
    )


class S3Settings(_Group):
    """S3-compatible object storage for artifacts (``artifact_store=s3://...``); unset
    credentials fall back to boto3's own chain (environment, shared files, a role)."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, ...); unset = AWS"
    )
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    path_style: bool = Field(
        False, description="path-style addressing (most S3-compatible servers want it)"
    )

    @field_validator("endpoint_url", "access_key_id", "secret_access_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return _blank_is_none(value)


class PromotionSettings(_Group):
    policy: PromotionPolicy = Field(default_factory=PromotionPolicy)


class LabelJoinSettings(_Group):
    """Event-time windows, in seconds."""

    window_s: float = Field(
        7 * 86400, gt=0, description="how long a prediction waits for its label"
    )
    grace_s: float = Field(3600, ge=0, description="lateness allowed past a window")
    tumbling_s: float = Field(3600, gt=0, description="metric window length")
    sliding_s: float = Field(86400, gt=0, description="sliding metric window (tumbling multiple)")
    marker_s: float = Field(7 * 86400, ge=0, description="remember expired events (too_late)")
    publish_interval_s: float = Field(2.0, gt=0, description="monitoring.stats cadence")
    batch_max_records: int = Field(
        2048,
        ge=1,
        le=100_000,
        description="records per label-join batch: larger than the scorer's, since labels "
        "wait minutes anyway and each batch costs broker requests and a commit",
    )
    expire_per_batch: int = Field(
        10_000,
        ge=1,
        description="entries a partition expires per batch: a larger hour of events is "
        "worked through over the next batches, so a batch's memory and time stay bounded "
        "whatever the rate (keep it above batch_max_records, or expiry falls behind)",
    )
    store: Literal["disk", "memory"] = Field(
        "disk",
        description="where the join state lives: `disk` (RocksDB under data_dir, memory "
        "bounded by the store_* settings) or `memory` (tests and small deployments; rebuilt "
        "from the changelog on every start) -- docs/adr/0016-label-join-disk-store.md",
    )
    data_dir: Path = Field(
        default_factory=lambda: default_home() / "label-join",
        description="the disk store's directory (one RocksDB per changelog partition); keep "
        "it on a persistent volume so a restart resumes without reading the changelog",
    )
    store_cache_mb: int = Field(
        256, ge=8, description="RocksDB block cache shared by the process's partitions (MiB)"
    )
    store_write_buffer_mb: int = Field(
        16, ge=1, description="RocksDB memtable size per partition, two at most (MiB)"
    )
    store_max_stale_s: float = Field(
        72_000,
        gt=0,
        description="a local store last checkpointed longer ago is rebuilt from the changelog: "
        "keep it below the changelog's delete.retention.ms (Kafka: 24 h), after which "
        "compaction may have dropped tombstones the store has not seen",
    )


class MonitorSettings(_Group):
    policy: MonitorPolicy = Field(default_factory=MonitorPolicy)
    policy_file: Path | None = Field(
        None, description="a YAML or JSON policy file; replaces `policy` when set"
    )
    webhook_url: str | None = Field(
        None, description="generic JSON webhook for alerts; `file:/path` reads it from a file"
    )
    slack_webhook_url: SecretStr | None = Field(
        None, description="Slack incoming webhook; `file:/run/secrets/...` reads a secret"
    )
    pagerduty_routing_key: SecretStr | None = Field(
        None, description="PagerDuty Events API v2 routing key; `file:/path` reads a secret"
    )

    @field_validator("webhook_url", "slack_webhook_url", "pagerduty_routing_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and value.startswith("file:"):
            path = Path(value[len("file:") :])
            try:
                value = path.read_text().strip()
            except FileNotFoundError:
                value = None  # an optional secret that was not given: that sink is off
            except OSError as exc:
                raise ValueError(f"cannot read the secret file {path}: {exc.strerror}") from None
        return _blank_is_none(value)


class ApiSettings(_Group):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr | None = None
    max_batch: int = Field(256, ge=1, le=10_000, description="events in one predict body")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="larger bodies get 413")
    request_timeout_s: float = Field(10.0, gt=0, description="a slower request gets 504")
    batch_max_size: int = Field(64, ge=1, le=4096, description="events per ONNX call")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="wait for batch-mates")
    require_token_for_reads: bool = False
    publish_max_inflight: int = Field(
        20_000,
        ge=1,
        description="sync predictions awaiting Kafka; beyond it predict answers 503",
    )
    publish_wait_ms: float = Field(50.0, ge=0, description="how long a request waits for room")
    publish_linger_ms: float = Field(
        20.0, ge=0, description="gather before one Kafka/Redis round (lookups lag up to this)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="empty = CORS off")
    history_cache_s: float = Field(5.0, ge=0)
    command_timeout_s: float = Field(30.0, gt=0, description="wait for the registry's answer")
    access_log: bool = True

    @field_validator("token", mode="before")
    @classmethod
    def _blank_token_is_unset(cls, value: object) -> object:
        return _blank_is_none(value)


class ConsoleSettings(_Group):
    """The web console under /console on the query API."""

    enabled: bool = Field(True, description="serve the web console under /console")
    history_s: float = Field(
        86_400.0,
        gt=0,
        description="monitoring.stats the console reads back at start (seconds of records)",
    )
    history_points: int = Field(
        240, ge=1, le=100_000, description="points kept per chart series (oldest dropped)"
    )
    history_series: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="series kept in all (the least recently updated dropped)",
    )
    session_ttl_s: float = Field(8 * 3600.0, gt=0, description="how long a console sign-in lasts")
    runbook_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="where alert runbooks live (#<alert kind> appended); unset = /console/runbooks",
    )
    refresh_s: float = Field(
        10.0, ge=1, description="how often an open console page refreshes its charts"
    )

    @field_validator("runbook_url", mode="before")
    @classmethod
    def _blank_url_is_unset(cls, value: object) -> object:
        return _blank_is_none(value)


GROUPS: dict[str, type[_Group]] = {
    "canary": CanarySettings,
    "retrain": RetrainSettings,
    "promotion": PromotionSettings,
    "trainer": TrainerSettings,
    "s3": S3Settings,
    "label_join": LabelJoinSettings,
    "monitor": MonitorSettings,
    "api": ApiSettings,
    "console": ConsoleSettings,
}


def nest_flat(data: dict[str, Any]) -> dict[str, Any]:
    """Flat names of grouped settings (``label_join_window_s``) nested under their group;
    a name that is neither a group's nor a known flat one is left for validation to judge."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        lowered = key.lower()
        for group, model in GROUPS.items():
            name = lowered.removeprefix(f"{group}_")
            if name != lowered and name in model.model_fields:
                held = out.setdefault(group, {})
                if isinstance(held, dict):
                    held[name] = value
                break
        else:
            if isinstance(value, dict) and isinstance(out.get(lowered), dict):
                out[lowered] = {**value, **out[lowered]}
            else:
                out[lowered] = value
    return out


class GroupedEnvSource(PydanticBaseSettingsSource):
    """``SCOREMESH_<GROUP>_<NAME>`` environment variables, nested under their group. Complex
    values (policies, lists) are JSON, as for top-level settings."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
        out: dict[str, Any] = {}
        for group, model in GROUPS.items():
            for name, field in model.model_fields.items():
                raw = env.get(f"{ENV_PREFIX}{group}_{name}".upper())
                if raw is None:
                    continue
                value = (
                    self.decode_complex_value(name, field, raw)
                    if (self.field_is_complex(field) and raw.strip())
                    else raw
                )
                out.setdefault(group, {})[name] = value
        return out


class DevStackSource(PydanticBaseSettingsSource):
    """Settings that ``scoremesh dev up`` recorded for the stack it is running."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        nested = nest_flat(dev_stack_settings())
        self._values = {k: v for k, v in nested.items() if k in settings_cls.model_fields}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    # --- Kafka -----------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]; unset = the embedded dev broker"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_client_id: str = "scoremesh"
    kafka_idempotence: bool = Field(
        True, description="producers use acks=all + idempotence; the dev broker lacks it"
    )
    kafka_fetch_max_wait_ms: int = Field(100, ge=1, le=10_000)
    kafka_session_timeout_ms: int = Field(30_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_rebalance_timeout_ms: int = Field(30_000, ge=1000)
    kafka_linger_ms: int = Field(5, ge=0, le=1000)
    kafka_max_batch_bytes: int = Field(256 * 1024, ge=1024)
    kafka_max_request_bytes: int = Field(1024 * 1024, ge=1024)
    kafka_connect_timeout_s: float = Field(
        30.0, gt=0, description="give up on start-up after this long without a broker"
    )
    topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")

    # --- Redis (query store) ---------------------------------------------------------
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = dev Redis")
    redis_key_prefix: str = "sm:"
    dev_redis_probe_url: str = Field(
        "redis://127.0.0.1:6379/0", description="dev up uses this Redis if it answers"
    )
    redis_prediction_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    redis_entity_cap: int = Field(100, ge=1, description="predictions kept per entity")

    # --- Models ----------------------------------------------------------------------
    model_name: str = Field(
        "credit",
        pattern=MODEL_NAME_PATTERN,
        description="the default model: events and labels that name no model are for it",
    )
    models: list[str] | None = Field(
        None,
        description="the models a scorer serves (comma-separated, e.g. fraud,churn); "
        "unset = every model with a champion",
    )
    artifact_dir: Path = Field(default_factory=lambda: default_home() / "artifacts")
    artifact_chunk_bytes: int = Field(512 * 1024, ge=1024)
    artifact_store: str = Field(
        "kafka://models.artifacts",
        pattern=r"^(kafka://models\.artifacts|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?)$",
        description="where new artifacts go: kafka://models.artifacts, or "
        "s3://<bucket>/<prefix> (versions load from wherever their URI points)",
    )
    s3: S3Settings = Field(default_factory=lambda: S3Settings())
    onnx_threads: int = Field(1, ge=1, le=64)

    canary: CanarySettings = Field(default_factory=lambda: CanarySettings())

    # --- Retraining and promotion (JSON in the environment) -------------------------
    retrain: RetrainSettings = Field(default_factory=lambda: RetrainSettings())
    promotion: PromotionSettings = Field(default_factory=lambda: PromotionSettings())
    trainer: TrainerSettings = Field(default_factory=lambda: TrainerSettings())

    # --- Label join ------------------------------------------------------------------
    label_join: LabelJoinSettings = Field(default_factory=lambda: LabelJoinSettings())

    # --- Monitoring and alerting -----------------------------------------------------
    monitor: MonitorSettings = Field(default_factory=lambda: MonitorSettings())

    # --- Hot path --------------------------------------------------------------------
    batch_max_records: int = Field(512, ge=1, le=100_000)
    batch_pipeline_depth: int = Field(
        4,
        ge=0,
        le=64,
        description="batches of the validator and scorer awaiting acknowledgement while the "
        "next is processed (0: each batch waits for its own)",
    )
    batch_timeout_ms: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="how long a batch loop waits for records when none are buffered",
    )
    max_event_bytes: int = Field(64 * 1024, ge=256, description="validator size limit")
    rejection_keep_bytes: int = Field(4 * 1024, ge=0, description="original bytes kept in DLQ")
    shutdown_deadline_s: float = Field(20.0, gt=0)

    # --- Ports / API -----------------------------------------------------------------
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9400, ge=0, le=65535, description="0 = pick a free port")
    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    console: ConsoleSettings = Field(default_factory=lambda: ConsoleSettings())
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("artifact_store")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("kafka_bootstrap", "redis_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            if not value.startswith("["):
                return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(
                    f"{name!r} is not a model name (lowercase letters, digits, - and _)"
                )
        return sorted(set(value)) if value else None

    @field_validator("kafka_sasl_password", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        return _blank_is_none(value)

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """``label_join_window_s=60`` (a keyword, or a dev-stack entry) means
        ``label_join={"window_s": 60}``: the flat names stay valid everywhere."""
        return nest_flat(data) if isinstance(data, dict) else data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            GroupedEnvSource(settings_cls),
            DevStackSource(settings_cls),
            file_secret_settings,
        )

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with some settings changed, by flat name (``api_token=...``,
        ``label_join_window_s=...``) or by group (``api={...}``)."""
        data = self.model_dump()
        for group, values in nest_flat(changes).items():
            if isinstance(values, dict) and isinstance(data.get(group), dict):
                data[group] = {**data[group], **values}
            else:
                data[group] = values
        return type(self).model_validate(data)

    def topic(self, name: TopicName) -> str:
        """The physical topic name for a catalog topic; a name outside the catalog is an error
        (mypy checks the literal, this checks names that come from users or files)."""
        if name not in _CATALOG_NAMES:
            raise ConfigError(
                f"unknown topic {name!r}: the catalog (schemas/topics.yaml) has "
                + ", ".join(TOPICS)
            )
        return f"{self.topic_prefix}{name}"

    def require_bootstrap(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError(
                "no Kafka broker configured: set SCOREMESH_KAFKA_BOOTSTRAP=host:port "
                "or start the embedded stack with `scoremesh dev up`"
            )
        return self.kafka_bootstrap

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "no Redis configured: set SCOREMESH_REDIS_URL=redis://host:port/0 "
                "or start the embedded stack with `scoremesh dev up`"
            )
        return self.redis_url


def env_names() -> set[str]:
    """Every ``SCOREMESH_*`` variable the settings read: top-level fields, and each grouped
    field by its flat name (``SCOREMESH_LABEL_JOIN_WINDOW_S``) or its group as JSON."""
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for group, model in GROUPS.items():
        names.update(f"{ENV_PREFIX}{group}_{field}".upper() for field in model.model_fields)
    return names


class ConfigError(RuntimeError):
    """A setting is missing or wrong; the message says which and how to fix it."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
