"""scoremesh's client library: the contract's records, codecs and partitioner, for teams
that produce events and labels or consume predictions and alerts.

    from scoremesh.client import Prediction, decode, encode, partition_for

- ``encode(topic, record)`` / ``decode(topic, data)``: Avro single-object values of every
  catalog topic, typed per topic; every released schema version decodes (by fingerprint).
  ``encode_json`` for the topics that accept JSON.
- ``partition_for(event_id, partitions)``: the label join's partitioner (murmur2, Kafka's
  default): a label keyed by its event_id lands where the join expects it.
- Producers and consumers: ``scoremesh.client.aio`` (aiokafka, extra ``[aiokafka]``),
  ``scoremesh.client.confluent`` (confluent-kafka, extra ``[confluent]``); faust Records
  and codecs: ``scoremesh.client.faust_records`` (extra ``[faust]``).

Importing this package connects to nothing and imports no Kafka client.
"""

from __future__ import annotations

from scoremesh.client._typed import decode, encode, encode_json
from scoremesh.client._wire import (
    NotAPublicTopic,
    key_field,
    key_of,
    partition_for,
    partitions_for,
)
from scoremesh.client.config import ClientConfig
from scoremesh.client.errors import (
    ClientConfigError,
    ClientError,
    CodecError,
    DeliveryError,
    EncodeError,
    KafkaUnavailable,
    UndecodableRecord,
    UnknownFingerprint,
)
from scoremesh.contract.records import (
    RECORD_VERSIONS,
    Alert,
    Event,
    Label,
    LabeledPrediction,
    MonitoringStats,
    Prediction,
    Rejection,
    RejectReason,
    TrainingExample,
    UnmatchedLabel,
)
from scoremesh.contract.topics import TOPICS, TopicName

__version__ = "0.2.0"
"""The version of scoremesh-client: versioned with the contract (a new schema version
bumps the minor), so a client reads whatever a mesh of the same minor writes."""

__all__ = [
    "RECORD_VERSIONS",
    "TOPICS",
    "Alert",
    "ClientConfig",
    "ClientConfigError",
    "ClientError",
    "CodecError",
    "DeliveryError",
    "EncodeError",
    "Event",
    "KafkaUnavailable",
    "Label",
    "LabeledPrediction",
    "MonitoringStats",
    "NotAPublicTopic",
    "Prediction",
    "RejectReason",
    "Rejection",
    "TopicName",
    "TrainingExample",
    "UndecodableRecord",
    "UnknownFingerprint",
    "UnmatchedLabel",
    "__version__",
    "decode",
    "encode",
    "encode_json",
    "key_field",
    "key_of",
    "partition_for",
    "partitions_for",
]
