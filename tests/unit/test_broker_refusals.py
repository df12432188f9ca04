"""A broker that answers with a refusal is not an unreachable broker: the error names what
was refused and the setting that changes it (pure: exceptions in, messages out)."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnknownError,
    UnsupportedVersionError,
)

from services.common.kafka import refusal
from services.common.settings import Settings

SETTINGS = Settings(kafka_bootstrap="broker-1:9092", topic_prefix="team-a.")


def test_silence_is_retried_not_explained() -> None:
    for exc in (KafkaConnectionError("no route"), NodeNotReadyError(), OSError("refused")):
        assert refusal(exc, "client", SETTINGS) is None


def _raised_in_init_pid() -> UnknownError:
    def _do_init_pid() -> None:  # named like aiokafka's sender step that asks for a producer id
        raise UnknownError()

    try:
        _do_init_pid()
    except UnknownError as exc:
        return exc
    raise AssertionError("unreachable")


def test_an_idempotent_producer_refused_names_the_setting() -> None:
    refused = refusal(_raised_in_init_pid(), "events-send", SETTINGS)
    assert refused is not None
    message = str(refused)
    assert message.startswith("events-send: Kafka at broker-1:9092 answered but refused")
    assert "InitProducerId: UnknownError" in message
    assert "SCOREMESH_KAFKA_IDEMPOTENCE=false" in message
    assert "did not answer" not in message and "not reachable" not in message


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SaslAuthenticationFailed(), "SCOREMESH_KAFKA_SASL_USERNAME"),
        (TopicAuthorizationFailedError(), "refused access to a topic"),
        (ClusterAuthorizationFailedError(), "refused access to the cluster"),
        (UnsupportedVersionError(), "does not support a request"),
        (UnknownError(), "retrying will not change it"),
    ],
)
def test_other_refusals_say_what_was_refused_and_what_to_check(
    exc: Exception, expected: str
) -> None:
    refused = refusal(exc, "admin", SETTINGS)
    assert refused is not None and expected in str(refused)
    assert "broker-1:9092" in str(refused)


def test_an_acl_refusal_names_the_topic_prefix_the_acls_need() -> None:
    refused = refusal(TopicAuthorizationFailedError(), "tail", SETTINGS)
    assert refused is not None and "'team-a.'" in str(refused)
