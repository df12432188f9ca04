"""scoremesh.client without a broker: imports, values of every topic, keys, partitions,
JSON, configuration."""

from __future__ import annotations

import random
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

import scoremesh.client as client
from scoremesh.client import _typed
from scoremesh.client.config import ENV_NAMES, ClientConfig
from scoremesh.contract.catalog import catalog
from scoremesh.contract.records import RECORD_VERSIONS
from scoremesh.contract.topics import VALUE_TYPE
from services.common.settings import Settings
from tests.contract.samples import SAMPLES
from tests.contract.test_golden_bytes import GOLDEN, load_expected

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("onnxruntime", "sklearn", "river", "fastapi", "services", "skl2onnx", "redis")
PUBLIC = [name for name, spec in catalog().items() if spec.value in RECORD_VERSIONS]


@pytest.mark.parametrize(
    "module",
    [
        "scoremesh.client",
        "scoremesh.client.aio",
        "scoremesh.client.confluent",
        "scoremesh.client.faust_records",
    ],
)
def test_importing_the_client_pulls_in_nothing_heavy(module: str) -> None:
    code = (
        f"import sys; import {module}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_the_plain_client_imports_no_kafka_client() -> None:
    code = "import sys, scoremesh.client; print(sorted(m for m in ('aiokafka', 'confluent_kafka', 'faust') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("topic", PUBLIC)
def test_every_public_topic_round_trips(topic: str) -> None:
    record = SAMPLES[catalog()[topic].value]  # type: ignore[index]
    data = client.encode(topic, record)  # type: ignore[call-overload]
    assert data[:2] == b"\xc3\x01"
    decoded = client.decode(topic, data)  # type: ignore[call-overload]
    assert {k: decoded[k] for k in record} == record


@pytest.mark.parametrize(
    ("topic", "name", "version"),
    [("events.raw", "Event", 1), ("labels", "Label", 1), ("events.valid", "Event", 2)],
)
def test_older_schema_versions_decode_by_fingerprint(topic: str, name: str, version: int) -> None:
    decoded = client.decode(topic, (GOLDEN / f"{name}.v{version}.bin").read_bytes())  # type: ignore[call-overload]
    for key, value in load_expected(GOLDEN / f"{name}.v{version}.json").items():
        assert decoded[key] == value
    assert decoded.get("model") in (None, "credit")  # v1 has none: the default model's


def test_the_typed_api_covers_exactly_the_public_topics() -> None:
    overloads = typing.get_overloads(_typed.decode)
    covered = {typing.get_args(typing.get_type_hints(f)["topic"])[0]: f for f in overloads}
    assert sorted(covered) == sorted(PUBLIC)
    for topic, fn in covered.items():
        assert typing.get_type_hints(fn)["return"].__name__ == VALUE_TYPE[topic]  # type: ignore[index]


def test_internal_topics_are_refused_with_a_reason() -> None:
    with pytest.raises(client.NotAPublicTopic, match="internal to scoremesh"):
        client.decode("label-join.changelog", b"{}")  # type: ignore[call-overload]


def test_codec_errors_say_what_is_wrong() -> None:
    with pytest.raises(client.UnknownFingerprint, match="unknown schema fingerprint"):
        client.decode("predictions", b"\xc3\x01" + b"\x00" * 8 + b"\x02")
    with pytest.raises(client.CodecError, match="not Avro single-object"):
        client.decode("predictions", b'{"event_id": "e"}')
    with pytest.raises(client.EncodeError, match="score"):
        bad = dict(SAMPLES["Prediction"])
        del bad["score"]
        client.encode("predictions", bad)  # type: ignore[call-overload]


def test_json_where_the_topic_accepts_it() -> None:
    event = SAMPLES["Event"]
    data = client.encode_json("events.raw", event)  # type: ignore[arg-type]
    assert data.startswith(b"{")
    assert client.decode("events.raw", data) == event
    with pytest.raises(client.ClientError, match="not JSON"):
        client.encode_json("predictions", event)  # type: ignore[arg-type]
    with pytest.raises(client.CodecError, match="not an object"):
        client.decode("events.raw", b"[1, 2]")


def test_partition_for_is_kafkas_default_partitioner() -> None:
    rng = random.Random(7)
    keys = [f"evt-{rng.getrandbits(40):x}".encode() for _ in range(500)] + [b"", b"a", b"\xff" * 9]
    for partitions in (1, 6, 7, 48):
        ids = list(range(partitions))
        expected = [DefaultPartitioner()(k, ids, ids) for k in keys]
        assert [client.partition_for(k, partitions) for k in keys] == expected
        assert client.partitions_for(keys, partitions) == expected
    assert client.partition_for("evt-1", 6) == client.partition_for(b"evt-1", 6)
    with pytest.raises(ValueError, match="positive int"):
        client.partition_for("evt-1", 0)


def test_keys_follow_the_catalog() -> None:
    assert client.key_of("events.raw", SAMPLES["Event"]) == b"cust-9"  # type: ignore[arg-type]
    assert client.key_of("labels", SAMPLES["Label"]) == SAMPLES["Label"]["event_id"].encode()  # type: ignore[arg-type]
    with pytest.raises(client.EncodeError, match="keyed by 'event_id'"):
        client.key_of("labels", {"value": "1"})  # type: ignore[arg-type]


def test_client_config_reads_the_services_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(ENV_NAMES.values()) <= set(Settings.model_fields)
    monkeypatch.setenv("SCOREMESH_IGNORE_DEV_STACK", "1")
    monkeypatch.setenv("SCOREMESH_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    monkeypatch.setenv("SCOREMESH_TOPIC_PREFIX", "team.")
    monkeypatch.setenv("SCOREMESH_KAFKA_IDEMPOTENCE", "false")
    monkeypatch.setenv("SCOREMESH_KAFKA_LINGER_MS", "20")
    config = ClientConfig.from_env(client_id="fraud")
    assert (config.bootstrap, config.idempotence, config.linger_ms) == (
        "k1:9092,k2:9092",
        False,
        20,
    )
    assert config.topic("predictions") == "team.predictions"
    assert config.client_id == "fraud"
    with pytest.raises(ValueError, match="unknown topic 'cases'"):
        config.topic("cases")
    monkeypatch.setenv("SCOREMESH_KAFKA_LINGER_MS", "soon")
    with pytest.raises(client.ClientConfigError, match="SCOREMESH_KAFKA_LINGER_MS='soon'"):
        ClientConfig.from_env()
    with pytest.raises(client.ClientConfigError, match="linger_ms must be >= 0"):
        ClientConfig(linger_ms=-1)
    with pytest.raises(client.ClientConfigError, match="security_protocol"):
        ClientConfig(security_protocol="TLS")  # type: ignore[arg-type]


def test_client_config_falls_back_to_the_dev_stack(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(
        '{"settings": {"kafka_bootstrap": "127.0.0.1:4321", "kafka_idempotence": false,'
        ' "kafka_fetch_max_wait_ms": 20, "redis_url": "redis://x"}}'
    )
    for name in ENV_NAMES.values():
        monkeypatch.delenv(f"SCOREMESH_{name.upper()}", raising=False)
    monkeypatch.delenv("SCOREMESH_IGNORE_DEV_STACK", raising=False)
    monkeypatch.setenv("SCOREMESH_HOME", str(tmp_path))
    config = ClientConfig.from_env()
    assert (config.bootstrap, config.idempotence, config.fetch_max_wait_ms) == (
        "127.0.0.1:4321",
        False,
        20,
    )
    monkeypatch.setenv("SCOREMESH_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    assert ClientConfig.from_env().bootstrap == "10.0.0.1:9092"


def test_version_is_the_distributions() -> None:
    pyproject = (ROOT / "client" / "pyproject.toml").read_text()
    assert f'version = "{client.__version__}"' in pyproject
    assert f'"scoremesh-client=={client.__version__}"' in (ROOT / "pyproject.toml").read_text()
