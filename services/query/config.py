"""The query API's knobs, as one value taken from Settings at start."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import Settings


@dataclass(frozen=True)
class ApiConfig:
    max_events: int
    max_body_bytes: int
    request_timeout_s: float
    batch_max_size: int
    batch_max_wait_ms: float
    require_token_for_reads: bool
    publish_max_inflight: int
    publish_wait_ms: float
    publish_linger_ms: float
    cors_origins: tuple[str, ...]
    history_cache_s: float
    command_timeout_s: float
    access_log: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        return cls(
            max_events=settings.api_max_batch,
            max_body_bytes=settings.api_max_body_bytes,
            request_timeout_s=settings.api_request_timeout_s,
            batch_max_size=settings.api_batch_max_size,
            batch_max_wait_ms=settings.api_batch_max_wait_ms,
            require_token_for_reads=settings.api_require_token_for_reads,
            publish_max_inflight=settings.api_publish_max_inflight,
            publish_wait_ms=settings.api_publish_wait_ms,
            publish_linger_ms=settings.api_publish_linger_ms,
            cors_origins=tuple(settings.api_cors_origins),
            history_cache_s=settings.api_history_cache_s,
            command_timeout_s=settings.api_command_timeout_s,
            access_log=settings.api_access_log,
        )
