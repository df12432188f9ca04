"""The errors a client raises. Each says what was wrong and what to do."""

from __future__ import annotations

from scoremesh.contract.codec import (
    BadBody,
    CodecError,
    EncodeError,
    NotSingleObject,
    TruncatedMessage,
    UnknownFingerprint,
)

__all__ = [
    "BadBody",
    "ClientConfigError",
    "ClientError",
    "CodecError",
    "DeliveryError",
    "EncodeError",
    "KafkaUnavailable",
    "NotSingleObject",
    "TruncatedMessage",
    "UndecodableRecord",
    "UnknownFingerprint",
]


class ClientError(Exception):
    """Base of the client's own errors (codec errors are ``CodecError``, a ValueError)."""


class ClientConfigError(ClientError, ValueError):
    """A setting (an argument or a ``SCOREMESH_*`` environment variable) is invalid."""


class KafkaUnavailable(ClientError, RuntimeError):
    """The broker did not answer, or refused the client at start."""


class DeliveryError(ClientError):
    """The broker did not acknowledge some records; ``failures`` holds (key, reason) pairs."""

    def __init__(self, message: str, failures: list[tuple[bytes | None, str]]) -> None:
        super().__init__(message)
        self.failures = failures


class UndecodableRecord(ClientError):
    """A consumed record is not a value of its topic; where it is, and why."""

    def __init__(self, topic: str, partition: int, offset: int, cause: CodecError) -> None:
        super().__init__(
            f"{topic}[{partition}]@{offset}: {cause} (a newer schema than this client knows "
            "means: upgrade scoremesh-client; pass on_undecodable= to skip such records)"
        )
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.cause = cause
