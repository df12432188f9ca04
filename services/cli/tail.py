"""`scoremesh tail`: kcat's essentials for catalog topics, decoded.

Where to start (``--from-beginning``, ``--offset N``, negative ``--offset`` counting back
from the end, default the end), which partitions, when to stop (``--max``,
``--exit-at-end``, ``--idle-timeout``), filters on nested fields (``features.age>60``), and
each record's metadata with ``-J``: topic, partition, offset, timestamp, key, headers.
"""

from __future__ import annotations

import base64
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from services.common.errors import UserError

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from services.common.settings import Settings

FILTER = re.compile(r"^\s*([A-Za-z0-9_.$-]+)\s*(!=|>=|<=|=|>|<|~)\s*(.*)$")
COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class TailError(UserError, ValueError):
    """A tail argument is wrong; the message says how to write it."""


@dataclass(frozen=True)
class Filter:
    """FIELD OP VALUE on a decoded record; FIELD is a dotted path into nested objects."""

    path: tuple[str, ...]
    op: str
    value: str

    def __call__(self, record: dict[str, Any]) -> bool:
        have: Any = record
        for part in self.path:
            if not isinstance(have, dict) or part not in have:
                return self.op == "!="  # a record without the field is not equal to anything
            have = have[part]
        shown = str(have).lower() if isinstance(have, bool) else str(have)
        if have is None:
            shown = "null"
        if self.op == "=":
            return shown == self.value
        if self.op == "!=":
            return shown != self.value
        if self.op == "~":
            return self.value in shown
        number = _number(self.value)
        if isinstance(have, int | float) and not isinstance(have, bool) and number is not None:
            return COMPARE[self.op](have, number)
        if isinstance(have, str) and number is None:
            return COMPARE[self.op](have, self.value)
        return False


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_filter(text: str) -> Filter:
    match = FILTER.match(text)
    if not match or not match.group(1):
        raise TailError(
            f"--filter {text!r}: write FIELD OP VALUE with OP one of = != > >= < <= ~, "
            "e.g. --filter variant=shadow or --filter 'features.age>60'"
        )
    path, op, value = match.groups()
    if op in COMPARE and not value:
        raise TailError(f"--filter {text!r}: {op} needs a value to compare with")
    return Filter(tuple(path.split(".")), op, value.strip())


@dataclass
class TailOptions:
    from_beginning: bool = False
    offset: int | None = None
    partitions: list[int] = field(default_factory=list)
    exit_at_end: bool = False
    limit: int | None = None
    filters: list[Filter] = field(default_factory=list)
    envelope: bool = False
    idle_timeout: float | None = None
    output: str = "json"  # json | yaml | table


def _decoder(name: str) -> Callable[[str, bytes], dict[str, Any]]:
    """How a topic's values are shown: the catalog's format, or a service's own for its
    internal topics (the label join's state is a JSON line and the event's Avro fields; the
    monitor's signals are a JSON header and arrays, shown as the header)."""
    from scoremesh.contract.codec import decode_any
    from scoremesh.contract.topics import (
        LABEL_JOIN_CHANGELOG,
        LABEL_JOIN_REPARTITION,
        MONITOR_SIGNALS,
    )

    if name == LABEL_JOIN_CHANGELOG:
        from services.label_join.join import state_record  # only this topic needs the join

        return lambda _, data: state_record(data)
    if name == LABEL_JOIN_REPARTITION:
        from services.label_join.repartition import repartition_record

        return lambda _, data: repartition_record(data)
    if name == MONITOR_SIGNALS:
        from services.monitor.signals import describe  # the header; the arrays are binary

        return lambda _, data: describe(data)
    return decode_any


def _text(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"$base64": base64.b64encode(data).decode()}


def when(ms: int) -> str | None:
    if ms is None or ms < 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def envelope_of(record: ConsumerRecord[bytes, bytes], value: Any) -> dict[str, Any]:
    """A record as kcat -J shows it, with the decoded value."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp if record.timestamp >= 0 else None,
        "time": when(record.timestamp),
        "key": _text(record.key),
        "headers": {k: _text(v) for k, v in (record.headers or ())},
        "value": value,
    }


class Printer:
    """Writes records to ``out`` as JSON lines, YAML documents or table rows."""

    def __init__(self, out: TextIO, options: TailOptions) -> None:
        self.out = out
        self.options = options
        self.header = False

    def write(self, record: ConsumerRecord[bytes, bytes], value: Any) -> None:
        from services.cli.output import to_json, to_yaml

        kind = self.options.output
        if kind == "table":
            if not self.header:
                self.out.write(
                    f"{'PARTITION':>9} {'OFFSET':>8}  {'TIME (UTC)':<23}  {'KEY':<20}  VALUE\n"
                )
                self.header = True
            summary = to_json(value).replace("\n", "").replace("  ", "")
            key = str(_text(record.key) or "-")
            self.out.write(
                f"{record.partition:>9} {record.offset:>8}  {when(record.timestamp) or '-':<23}  "
                f"{key[:20]:<20}  {summary[:160]}\n"
            )
            return
        shown = envelope_of(record, value) if self.options.envelope else value
        if kind == "yaml":
            self.out.write("---\n" + to_yaml(shown))
        else:
            import orjson

            from services.cli.output import _bytes

            self.out.write(orjson.dumps(shown, default=_bytes).decode() + "\n")


async def tail_topic(settings: Settings, name: str, options: TailOptions, out: TextIO) -> int:
    """Print the records of a catalog topic as ``options`` say; returns how many."""
    from aiokafka import TopicPartition

    from scoremesh.contract.catalog import topic_name
    from scoremesh.contract.codec import CodecError
    from services.common.kafka import (
        assign_all,
        make_consumer,
        start_with_retry,
        true_end_offsets,
    )

    decode = _decoder(name)
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "tail", settings)
    printer = Printer(out, options)
    written = 0
    try:
        every = await assign_all(consumer, settings.topic(topic_name(name)))
        tps = every
        if options.partitions:
            known = {tp.partition for tp in every}
            missing = [p for p in options.partitions if p not in known]
            if missing:
                raise TailError(
                    f"--partition {missing[0]}: {name} has partitions 0-{len(every) - 1}"
                )
            tps = [TopicPartition(every[0].topic, p) for p in options.partitions]
            consumer.assign(tps)
        ends = await true_end_offsets(consumer, tps)  # leaves each partition at its end
        if options.from_beginning:
            await consumer.seek_to_beginning(*tps)
        elif options.offset is not None:
            starts = await consumer.beginning_offsets(tps)
            for tp in tps:
                wanted = options.offset if options.offset >= 0 else ends[tp] + options.offset
                consumer.seek(tp, min(max(wanted, starts[tp]), ends[tp]))
        pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        if options.exit_at_end and not pending:
            return 0
        last = time.monotonic()
        while options.limit is None or written < options.limit:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            if not batches and not options.exit_at_end:
                if (
                    options.idle_timeout is not None
                    and time.monotonic() - last > options.idle_timeout
                ):
                    break
                continue
            last = time.monotonic() if batches else last
            for tp, records in batches.items():
                for record in records:
                    if options.exit_at_end and record.offset >= ends[tp]:
                        break
                    try:
                        value = decode(name, record.value or b"")
                    except CodecError as exc:
                        value = {"$undecodable": str(exc), "$raw": record.value}
                    if not all(f(value) for f in options.filters):
                        continue
                    printer.write(record, value)
                    written += 1
                    if options.limit is not None and written >= options.limit:
                        break
                if options.limit is not None and written >= options.limit:
                    break
            out.flush()
            if options.exit_at_end:
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
                if not pending:
                    break
                if (
                    not batches
                    and options.idle_timeout is not None
                    and time.monotonic() - last > options.idle_timeout
                ):
                    break
    finally:
        await consumer.stop()
    return written
