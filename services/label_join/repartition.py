"""The join owns its partitioning: a record on another partition than its event_id's goes
to that partition through ``label-join.repartition`` (docs/adr/0019-join-owns-its-partitioning.md).

The join keeps its state per input partition and finds an event's prediction and label only
when both are on the partition murmur2 of the event_id picks (Kafka's default partitioner:
the Java client's, aiokafka's, scoremesh.client's). Producers are free to use any client:
librdkafka's default partitioner hashes with CRC32, a client may key a label by something
else or not at all. So each input record's event_id is read from its value (the first
field of every Label and Prediction schema version; a JSON label's ``event_id``), hashed
for the whole batch at once, and compared with the partition the record came on:

- on the right partition: joined here, as before (the check is all it costs);
- on another: forwarded as it came (value, record timestamp) to the right partition of
  the repartition topic, keyed by the event_id, with a ``kind`` header; the join consumes
  that topic as a third input, co-partitioned like the other two, so the record reaches
  the state that owns its event_id. The input's offset is committed only after the
  forward is acknowledged (the batch loop's rule), so a crash in between forwards it again
  and the join, which ignores a repeated prediction or label, counts it once;
- no event_id to read (undecodable, not a JSON object): stays, and the join dead-letters
  it with the reason where it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaProducer

from scoremesh.contract.codec import HEADER_LEN, MAGIC, all_schema_versions, codec, decode_any
from scoremesh.contract.partitioner import murmur2_batch
from services.common.batchloop import Record
from services.common.kafka import enqueue_records
from services.common.metrics import EVENTS_OUT
from services.label_join import telemetry

Kind = Literal["label", "prediction"]
KIND_HEADER = "kind"
_HEADERS: dict[Kind, list[tuple[str, bytes]]] = {
    "label": [(KIND_HEADER, b"label")],
    "prediction": [(KIND_HEADER, b"prediction")],
}


def _event_id_first() -> frozenset[bytes]:
    """Fingerprints of the schema versions whose first field is the string ``event_id``."""
    return frozenset(
        v.fingerprint
        for name in ("Label", "Prediction")
        for v in all_schema_versions()[name]
        if v.raw["fields"][0]["name"] == "event_id" and v.raw["fields"][0]["type"] == "string"
    )


def event_id_of(value: bytes | None, avro_first: frozenset[bytes]) -> bytes | None:
    """The event_id of a Label or Prediction value (its UTF-8 bytes), without decoding the
    rest; None when there is none to read (the join then says what is wrong with it)."""
    if not value:
        return None
    if value[:2] == MAGIC:
        if value[2:HEADER_LEN] not in avro_first or len(value) <= HEADER_LEN:
            return None
        pos, size, shift = HEADER_LEN, 0, 0
        while True:  # the string's length: a zigzag varint (one byte below 64 characters)
            if pos >= len(value) or shift > 28:
                return None
            byte = value[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if size & 1 or size == 0:  # negative or empty
            return None
        end = pos + (size >> 1)
        return value[pos:end] if end <= len(value) else None
    try:
        raw: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return event_id.encode() if isinstance(event_id, str) and event_id else None


@dataclass(slots=True)
class Forward:
    kind: Kind
    record: Record
    partition: int
    event_id: bytes


@dataclass(slots=True)
class Routed:
    """A batch's records: those to join here, by kind, and those to forward."""

    predictions: list[Record] = field(default_factory=list)
    labels: list[Record] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)


class Repartitioner:
    """Which input records belong to another partition, and their forwarding.

    ``check``: off only to measure what the check costs (scripts/bench_repartition.py);
    then every record is joined where it arrived, as a join that trusts its producers would.
    """

    def __init__(self, predictions: str, labels: str, repartition: str, partitions: int) -> None:
        self.predictions = predictions
        self.labels = labels
        self.topic = repartition
        self.partitions = partitions  # of each input topic (the service checks they agree)
        self.check = True
        self.forwarded: dict[Kind, int] = {"label": 0, "prediction": 0}
        self._avro_first = _event_id_first()
        self._heads = frozenset(MAGIC + fingerprint for fingerprint in self._avro_first)
        self._kinds: dict[str, Kind] = {predictions: "prediction", labels: "label"}

    def kind_of(self, record: Record) -> Kind:
        kind = self._kinds.get(record.topic)
        if kind is not None:
            return kind
        for name, value in record.headers or ():  # the repartition topic: as forwarded
            if name == KIND_HEADER:
                return "prediction" if value == b"prediction" else "label"
        return "label"  # not forwarded by a join: if it is no label, labels.unmatched says so

    def route(self, records: Sequence[Record]) -> Routed:
        out = Routed()
        if not self.check:
            for record in records:
                self._keep(out, record, self.kind_of(record))
            return out
        heads, first = self._heads, self._avro_first
        ids: list[bytes | None] = []
        keys: list[bytes] = []
        for record in records:
            value = record.value
            # the common case inline: Avro of a known version, an id of 1-63 bytes
            if value is not None and value[:HEADER_LEN] in heads and len(value) > HEADER_LEN:
                size = value[HEADER_LEN]
                end = HEADER_LEN + 1 + (size >> 1)
                if 0 < size < 0x80 and not size & 1 and end <= len(value):
                    event_id: bytes | None = value[HEADER_LEN + 1 : end]
                else:
                    event_id = event_id_of(value, first)
            else:
                event_id = event_id_of(value, first)
            ids.append(event_id)
            if event_id is not None:
                keys.append(event_id)
        hashes = iter(murmur2_batch(keys))
        n = self.partitions
        for record, event_id in zip(records, ids, strict=True):
            kind = self.kind_of(record)
            if event_id is None:  # nothing to place it by: the join says what is wrong
                self._keep(out, record, kind)
                continue
            partition = (next(hashes) & 0x7FFFFFFF) % n
            if partition == record.partition:
                self._keep(out, record, kind)
            else:
                out.forwards.append(Forward(kind, record, partition, event_id))
        return out

    @staticmethod
    def _keep(out: Routed, record: Record, kind: Kind) -> None:
        (out.predictions if kind == "prediction" else out.labels).append(record)

    async def forward(
        self, producer: AIOKafkaProducer, forwards: list[Forward], service: str
    ) -> list[asyncio.Future[Any]]:
        """Queue the forwards; the futures complete when the broker has them."""
        if not forwards:
            return []
        futures, n = await enqueue_records(
            producer,
            [(self.topic, f.partition, f.event_id, f.record.value) for f in forwards],
            close_batches=True,
            headers=[_HEADERS[f.kind] for f in forwards],
            timestamps=[f.record.timestamp if f.record.timestamp >= 0 else None for f in forwards],
        )
        for kind in ("label", "prediction"):
            count = sum(1 for f in forwards if f.kind == kind)
            if count:
                self.forwarded[kind] += count
                telemetry.REPARTITIONED.labels(kind).inc(count)
        EVENTS_OUT.labels(service, self.topic).inc(n)
        return futures


def repartition_record(data: bytes) -> dict[str, Any]:
    """A repartition topic's value as one readable record (``scoremesh tail``): the Label or
    Prediction it carries, decoded by its fingerprint, or the JSON label as it came."""
    if data[:2] == MAGIC:
        fingerprint = data[2:HEADER_LEN]
        for name in ("Label", "Prediction"):
            if any(v.fingerprint == fingerprint for v in all_schema_versions()[name]):
                return {name.lower(): codec(name).decode(data)}
        return {"label": codec("Label").decode(data)}  # raises: says what is wrong
    return {"label": decode_any("labels", data)}
