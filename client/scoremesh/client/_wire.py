"""What goes on the wire for every catalog topic: values, keys and partitions.

The typed entry points (``encode``, ``decode``, ``encode_json``) are generated into
``_typed.py``; they call these, which work from the catalog at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any

import orjson

from scoremesh.client.errors import ClientError
from scoremesh.contract.catalog import TopicSpec, topic_spec
from scoremesh.contract.codec import MAGIC, AvroCodec, EncodeError, codec, decode_any
from scoremesh.contract.partitioner import murmur2_batch, partitions_for_keys
from scoremesh.contract.records import RECORD_VERSIONS


class NotAPublicTopic(ClientError):
    """The topic's values are internal to a service (not an Avro record of the contract)."""


@cache
def _codec(topic: str) -> AvroCodec[Any]:
    spec = topic_spec(topic)
    if spec.value not in RECORD_VERSIONS:
        raise NotAPublicTopic(
            f"{topic}: its values ({spec.value}) are internal to scoremesh, not a record of the "
            "contract; read it with `scoremesh tail`"
        )
    return codec(spec.value)


def _accepts_json(topic: str) -> TopicSpec:
    spec = topic_spec(topic)
    if "json" not in spec.value_formats:
        raise ClientError(
            f"{topic} accepts {' or '.join(spec.value_formats)} values, not JSON; "
            "use encode() for Avro"
        )
    return spec


def encode_value(topic: str, record: Any) -> bytes:
    """Avro single-object bytes of a record for a topic (the newest schema version)."""
    return _codec(topic).encode(record)


def encode_json_value(topic: str, record: Any) -> bytes:
    """JSON bytes of a record, for topics that accept JSON values."""
    _accepts_json(topic)
    if not isinstance(record, dict):
        raise EncodeError(f"{topic}: a record is a dict, not a {type(record).__name__}")
    try:
        return orjson.dumps(record)
    except TypeError as exc:
        raise EncodeError(f"{topic}: cannot encode record as JSON: {exc}") from exc


def decode_value(topic: str, data: bytes) -> Any:
    """A topic's value as a record: Avro single-object of any released schema version (found
    by its fingerprint and resolved into the newest), or JSON where the topic accepts it."""
    avro = _codec(topic)
    if data[:2] == MAGIC or "json" not in topic_spec(topic).value_formats:
        return avro.decode(data)
    return decode_any(topic, data)


def value_encoder(topic: str, value_format: str) -> Callable[[Any], bytes]:
    """``encode_value`` or ``encode_json_value`` for a topic, checked now: a producer asked
    for JSON on a topic that takes none is refused when it is made, not at its first send."""
    if value_format == "json":
        _accepts_json(topic)
        return partial(encode_json_value, topic)
    if value_format == "avro":
        _codec(topic)
        return partial(encode_value, topic)
    raise ClientError(f"value_format must be 'avro' or 'json', not {value_format!r}")


def key_field(topic: str) -> str:
    """The record field a topic is keyed by (``entity_id`` for events, ``event_id`` for
    labels and predictions), as the catalog declares it."""
    return topic_spec(topic).key


def key_of(topic: str, record: Any) -> bytes:
    """The Kafka key of a record on a topic: its key field, UTF-8 encoded."""
    field = key_field(topic)
    try:
        value = record[field]
    except (KeyError, TypeError):
        raise EncodeError(
            f"{topic}: records are keyed by {field!r}, which this one lacks"
        ) from None
    if not isinstance(value, str) or not value:
        raise EncodeError(f"{topic}: the key field {field!r} must be a non-empty string")
    return value.encode()


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _check_partitions(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client, aiokafka and
    faust use it) gives a key: where the label join expects a label or prediction keyed by
    ``event_id``."""
    _check_partitions(partitions)
    return (murmur2_batch([_as_bytes(key)])[0] & 0x7FFFFFFF) % partitions


def partitions_for(keys: list[str] | list[bytes], partitions: int) -> list[int]:
    """``partition_for`` of many keys at once (vectorised: a fraction of a µs per key)."""
    _check_partitions(partitions)
    return partitions_for_keys([_as_bytes(k) for k in keys], partitions)
