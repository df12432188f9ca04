"""The topic catalog: ``schemas/topics.yaml`` loaded once, found in a checkout or a wheel."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from scoremesh.contract.topics import TopicName


def schemas_dir() -> Path:
    """``schemas/`` ships inside the client wheel as ``scoremesh/contract/schemas``; a
    checkout has it at the top of the repository (two levels above ``client/``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parents[2] / "schemas"):
        if (candidate / "topics.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"schemas/topics.yaml not found next to {here}; reinstall scoremesh-client "
        "(the wheel carries it as scoremesh/contract/schemas)"
    )


@dataclass(frozen=True)
class TopicSpec:
    name: TopicName
    key: str
    value: str
    partitions: int
    retention_ms: int
    cleanup_policy: str
    max_message_bytes: int
    replication_factor: int
    min_insync_replicas: int
    doc: str
    value_formats: tuple[str, ...] = ("avro",)

    @property
    def configs(self) -> dict[str, str]:
        """Broker-side topic configs, as Kafka expects them."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "max.message.bytes": str(self.max_message_bytes),
            "min.insync.replicas": str(self.min_insync_replicas),
        }


class CatalogError(ValueError):
    """topics.yaml does not describe a valid catalog."""


def parse_catalog(raw: dict[str, Any]) -> dict[TopicName, TopicSpec]:
    defaults = raw.get("defaults", {})
    topics = raw.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise CatalogError("topics.yaml: 'topics' must be a non-empty mapping")
    out: dict[Any, TopicSpec] = {}
    for name, spec in topics.items():
        merged = {**defaults, **spec}
        try:
            out[name] = TopicSpec(
                name=name,
                key=str(merged["key"]),
                value=str(merged["value"]),
                partitions=int(merged["partitions"]),
                retention_ms=int(merged["retention_ms"]),
                cleanup_policy=str(merged["cleanup_policy"]),
                max_message_bytes=int(merged["max_message_bytes"]),
                replication_factor=int(merged["replication_factor"]),
                min_insync_replicas=int(merged["min_insync_replicas"]),
                doc=str(merged.get("doc", "")),
                value_formats=tuple(merged.get("value_formats", ["avro"])),
            )
        except KeyError as exc:
            raise CatalogError(f"topics.yaml: topic {name!r} lacks {exc.args[0]!r}") from None
        if out[name].cleanup_policy not in ("delete", "compact"):
            raise CatalogError(
                f"topics.yaml: topic {name!r}: cleanup_policy must be delete|compact"
            )
        if out[name].partitions < 1:
            raise CatalogError(f"topics.yaml: topic {name!r}: partitions must be >= 1")
    return out


@lru_cache(maxsize=1)
def catalog() -> dict[TopicName, TopicSpec]:
    with (schemas_dir() / "topics.yaml").open() as fh:
        return parse_catalog(yaml.safe_load(fh))


def topic_name(name: str) -> TopicName:
    """A name given by a user or a file, checked against the catalog."""
    if name not in catalog():
        known = ", ".join(sorted(catalog()))
        raise CatalogError(f"unknown topic {name!r}; the catalog has: {known}")
    return name  # type: ignore[return-value]


def topic_spec(name: str) -> TopicSpec:
    return catalog()[topic_name(name)]
