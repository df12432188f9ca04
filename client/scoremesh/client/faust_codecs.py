"""faust codecs for the contract's records (Avro single-object, every schema version).

Downstream teams write their own faust stream processors over scoremesh's topics. The
Records in ``scoremesh.client.faust_records`` carry a codec from here, so

    app.topic("predictions", value_type=Prediction)

decodes every released schema version of a Prediction (found by its fingerprint) and
encodes with the newest; never pickle. For a Record of your own over a contract topic, or a
plain dict stream, call ``register_codecs()`` once and name the codec:
``value_serializer="scoremesh.Prediction"``.

``faust_settings(config)`` gives an App the broker settings a scoremesh deployment (and its
embedded development broker) needs. Requires the ``[faust]`` extra.
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from scoremesh.client.config import ClientConfig
from scoremesh.contract.codec import AvroCodec, all_schema_versions, codec

CODEC_PREFIX = "scoremesh."


class AvroRecordCodec(codecs.Codec):  # type: ignore[misc]
    """A faust codec for one record of the contract: ``AvroRecordCodec(record="Prediction")``.

    Encoding accepts what a Record's ``to_representation()`` gives: a None in a field whose
    schema is not nullable but has a default (a map or array) is encoded as that default.
    """

    def __init__(self, children: tuple[Any, ...] | None = None, **kwargs: Any) -> None:
        super().__init__(children, **kwargs)
        name = kwargs.get("record")
        if not isinstance(name, str):
            raise TypeError("AvroRecordCodec(record=<record name>), e.g. record='Prediction'")
        self.codec: AvroCodec[Any] = codec(name)
        self._defaulted = tuple(
            field["name"]
            for field in self.codec.current.raw["fields"]
            if "default" in field and field["default"] is not None
        )

    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, dict) and any(obj.get(name, 0) is None for name in self._defaulted):
            obj = {k: v for k, v in obj.items() if v is not None or k not in self._defaulted}
        return self.codec.encode(obj)

    def _loads(self, s: bytes) -> Any:
        return self.codec.decode(s)


def record_options(name: str) -> dict[str, Any]:
    """The class options of the faust Record for a contract record ``name``."""
    return {
        "serializer": AvroRecordCodec(record=name),
        "include_metadata": False,  # no faust namespace key: the value is the contract's
        "namespace": f"{CODEC_PREFIX}{name}",
    }


def register_codecs() -> list[str]:
    """Register ``scoremesh.<Record>`` in faust's codec registry for every record of the
    contract (idempotent); returns the names."""
    names = []
    for name in sorted(all_schema_versions()):
        codecs.register(f"{CODEC_PREFIX}{name}", AvroRecordCodec(record=name))
        names.append(f"{CODEC_PREFIX}{name}")
    return names


def faust_settings(config: ClientConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for ``faust.App`` from a client config (default: from the
    environment): the broker, its security, and group timings.

    The timings are the config's (the embedded development stack records short ones: its
    broker answers JoinGroup only after about half the session timeout). faust's fetch
    wait is its own (1.5 s); it must not be set below ~100 ms on the embedded broker,
    where table recovery from a changelog then stalls."""
    config = config or ClientConfig.from_env()
    if config.security_protocol != "PLAINTEXT":
        raise NotImplementedError(
            "faust_settings: only PLAINTEXT is mapped; pass faust's broker_credentials yourself"
        )
    return {
        "broker": ";".join(f"kafka://{host.strip()}" for host in config.bootstrap.split(",")),
        "broker_client_id": config.client_id,
        "broker_session_timeout": config.session_timeout_ms / 1000,
        "broker_heartbeat_interval": config.heartbeat_interval_ms / 1000,
        "broker_rebalance_timeout": config.rebalance_timeout_ms / 1000,
        "producer_acks": -1,
        "producer_linger": config.linger_ms / 1000,
        "producer_max_request_size": config.max_request_bytes,
        "consumer_auto_offset_reset": "earliest",
        "key_serializer": "raw",
        "value_serializer": "raw",  # a Record brings its codec; anything else stays bytes
    }
