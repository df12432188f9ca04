"""`scoremesh events send | tail | dlq replay | forget`: feed, inspect, replay, forget."""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from scoremesh.contract.catalog import catalog, topic_name
from scoremesh.contract.codec import CodecError, decode_any
from services.cli.target import announce_kafka, announce_redis
from services.common.errors import UserError
from services.common.kafka import (
    assign_all,
    make_consumer,
    make_producer,
    start_with_retry,
    true_end_offsets,
)
from services.common.settings import Settings


class InputError(UserError, ValueError):
    """A file or argument is wrong; the message says where."""


def add_parsers(sub: Any) -> None:
    events = sub.add_parser(
        "events",
        help="send events to events.raw",
        epilog="example: scoremesh events send events.jsonl --rate 500",
    )
    esub = events.add_subparsers(dest="action", required=True)
    send = esub.add_parser(
        "send",
        help="send JSON lines or CSV (header row) events; - for stdin",
        epilog="example: head -100 events.jsonl | scoremesh events send -",
    )
    send.add_argument("file", help="path, or - for standard input")
    send.add_argument("--format", choices=("auto", "jsonl", "csv"), default="auto")
    send.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    send.add_argument("--skip-bad", action="store_true", help="send the good lines, report the bad")
    send.add_argument("--json", action="store_true", help="machine-readable summary")

    labels = sub.add_parser(
        "labels",
        help="send ground truth to the labels topic",
        epilog="example: scoremesh labels send labels.csv --skip-bad",
    )
    lsub = labels.add_subparsers(dest="action", required=True)
    lsend = lsub.add_parser(
        "send",
        help="send JSON lines or CSV (event_id,value,label_time)",
        epilog="example: scoremesh labels send labels.jsonl",
    )
    lsend.add_argument("file", type=Path)
    lsend.add_argument(
        "--skip-bad", action="store_true", help="send the good lines, report the bad"
    )
    lsend.add_argument("--json", action="store_true")

    tail = sub.add_parser(
        "tail",
        help="decode a catalog topic to JSON lines",
        epilog="example: scoremesh tail predictions --from-beginning --max 5 | jq .model_version",
    )
    tail.add_argument("topic", help="a catalog topic, e.g. predictions")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--max", type=int, help="stop after N records")
    tail.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only records whose top-level KEY equals VALUE (repeatable)",
    )
    tail.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="stop after this many seconds without a record",
    )

    dlq = sub.add_parser("dlq", help="the dead-letter topic")
    dsub = dlq.add_subparsers(dest="action", required=True)
    replay = dsub.add_parser(
        "replay",
        help="re-send rejected events to events.raw after a fix",
        epilog="examples: scoremesh dlq replay --reason out_of_range --since 2026-11-25T00:00:00Z\n"
        "          scoremesh dlq replay --model fraud --reason model_unavailable",
    )
    replay.add_argument("--reason", action="append", default=[], help="only these reason codes")
    replay.add_argument(
        "--model",
        action="append",
        default=[],
        help="only events for this model (repeatable), e.g. after fixing its champion",
    )
    replay.add_argument("--since", help="only rejections at or after this ISO-8601 time")
    replay.add_argument("--dry-run", action="store_true", help="count, send nothing")
    replay.add_argument("--json", action="store_true")

    forget = sub.add_parser(
        "forget",
        help="remove an entity's data from the query store",
        epilog="example: scoremesh forget cust-42",
    )
    forget.add_argument("entity_id")
    forget.add_argument("--json", action="store_true")


# --- events send -----------------------------------------------------------------------


def _scalar(text: str) -> Any:
    if text == "":
        return None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Parsed:
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)


def _check_envelope(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "not a JSON object"
    for key in ("event_id", "entity_id"):
        if not isinstance(event.get(key), str) or not event[key]:
            return f"{key} must be a non-empty string"
    if not isinstance(event.get("features"), dict):
        return "features must be an object"
    return None


def parse_events(text: str, fmt: str) -> Parsed:
    """Every line checked before anything is sent; bad ones reported with line numbers."""
    parsed = Parsed()
    if not text.strip():
        raise InputError("no events to send: the input is empty")
    if fmt == "auto":
        first = next((line for line in text.splitlines() if line.strip()), "")
        fmt = "jsonl" if first.lstrip().startswith("{") else "csv"
    if fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                parsed.bad.append((lineno, f"not JSON ({exc})"))
                continue
            problem = _check_envelope(event)
            if problem:
                parsed.bad.append((lineno, problem))
            else:
                parsed.events.append((lineno, event))
        return parsed
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in ("event_id", "entity_id") if c not in header]
    if missing:
        raise InputError(
            f"the CSV header lacks {missing}; it needs event_id, entity_id, "
            "optional event_time, attr.* columns and one column per feature"
        )
    for row in reader:
        lineno = reader.line_num
        if None in row:
            parsed.bad.append((lineno, f"{len(row[None])} more fields than the header"))  # type: ignore[index]
            continue
        built: dict[str, Any] = {
            "event_id": row["event_id"],
            "entity_id": row["entity_id"],
            "features": {},
            "attributes": {},
        }
        for column, value in row.items():
            if column in ("event_id", "entity_id"):
                continue
            if column == "event_time":
                built["event_time"] = _scalar(value) if value.isdigit() else value
            elif column.startswith("attr."):
                built["attributes"][column[5:]] = value
            else:
                built["features"][column] = _scalar(value)
        problem = _check_envelope(built)
        if problem:
            parsed.bad.append((lineno, problem))
        else:
            parsed.events.append((lineno, built))
    return parsed


async def send_events(
    settings: Settings, events: list[dict[str, Any]], rate: float | None, progress: Any
) -> tuple[int, int]:
    producer = make_producer(settings)
    await start_with_retry(producer.start, "events-send", settings)
    topic = settings.topic("events.raw")
    sent = failed = 0
    started = time.monotonic()
    try:
        futures = []
        for i, event in enumerate(events):
            if "event_time" not in event:
                event["event_time"] = int(time.time() * 1000)
            futures.append(
                await producer.send(topic, orjson.dumps(event), key=event["entity_id"].encode())
            )
            if rate:
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if len(futures) >= 1000 or i == len(events) - 1:
                for result in await asyncio.gather(*futures, return_exceptions=True):
                    if isinstance(result, BaseException):
                        failed += 1
                    else:
                        sent += 1
                futures.clear()
                progress.bar("send", sent + failed, len(events))
        progress.bar("send", sent + failed, len(events), force=True)
        progress.end()
    finally:
        await producer.stop()
    return sent, failed


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    from services.demo.runner import Progress

    text = sys.stdin.read() if args.file == "-" else _read(Path(args.file))
    parsed = parse_events(text, args.format)
    for lineno, problem in parsed.bad[:20]:
        print(f"line {lineno}: {problem}", file=sys.stderr)
    if len(parsed.bad) > 20:
        print(f"... and {len(parsed.bad) - 20} more bad lines", file=sys.stderr)
    if parsed.bad and not args.skip_bad:
        raise InputError(
            f"{len(parsed.bad)} bad line(s), nothing sent; fix them or pass --skip-bad"
        )
    if not parsed.events:
        raise InputError("no events to send")
    announce_kafka(settings)
    progress = Progress(quiet=args.json or not sys.stderr.isatty())
    sent, failed = asyncio.run(
        send_events(settings, [e for _, e in parsed.events], args.rate, progress)
    )
    summary = {"sent": sent, "failed": failed, "skipped_bad_lines": len(parsed.bad)}
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print(f"sent {sent}, failed {failed}, skipped {len(parsed.bad)} bad line(s)")
    return 0 if failed == 0 else 1


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


# --- labels send ---------------------------------------------------------------------


def cmd_labels(args: argparse.Namespace, settings: Settings) -> int:
    from services.label_join.labels import send_labels

    announce_kafka(settings)
    summary = asyncio.run(send_labels(settings, args.file, skip_bad=args.skip_bad))
    for bad in summary.bad[:20]:
        print(f"line {bad.line}: {bad.message}", file=sys.stderr)
    if args.json:
        print(orjson.dumps(summary.as_dict()).decode())
    else:
        print(
            f"read {summary.read}, valid {summary.valid}, sent {summary.sent}, bad {len(summary.bad)}"
        )
    if not summary.ok:
        raise InputError(
            f"{len(summary.bad)} bad line(s), nothing sent; fix them or pass --skip-bad"
        )
    return 0


# --- tail ------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode()}
    raise TypeError


def _filters(raw: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--filter {item!r}: use KEY=VALUE, e.g. --filter variant=shadow")
        out.append((key, value))
    return out


def _matches(record: dict[str, Any], filters: list[tuple[str, str]]) -> bool:
    for key, value in filters:
        have = record.get(key)
        shown = str(have).lower() if isinstance(have, bool) else str(have)
        if shown != value:
            return False
    return True


def _decoder(name: str) -> Callable[[str, bytes], dict[str, Any]]:
    """How a topic's values are shown: the catalog's format, or a service's own for its
    internal topics (the label join's state is a JSON line and the event's Avro fields)."""
    from services.label_join.join import state_record  # only tail needs the join's modules
    from services.label_join.service import CHANGELOG

    if name == CHANGELOG:
        return lambda _, data: state_record(data)
    return decode_any


async def tail_topic(
    settings: Settings,
    name: str,
    from_beginning: bool,
    limit: int | None,
    filters: list[tuple[str, str]],
    idle_timeout: float | None,
    out: Any,
) -> int:
    decode = _decoder(name)
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "tail", settings)
    written = 0
    try:
        tps = await assign_all(consumer, settings.topic(topic_name(name)))
        if not from_beginning:
            await true_end_offsets(consumer, tps)
        last = time.monotonic()
        while limit is None or written < limit:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            if not batches:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            last = time.monotonic()
            for records in batches.values():
                for record in records:
                    try:
                        value = decode(name, record.value or b"")
                    except CodecError as exc:
                        value = {"$undecodable": str(exc), "$raw": record.value}
                    if not _matches(value, filters):
                        continue
                    out.write(orjson.dumps(value, default=_json_default).decode() + "\n")
                    written += 1
                    if limit is not None and written >= limit:
                        break
                if limit is not None and written >= limit:
                    break
            out.flush()
    finally:
        await consumer.stop()
    return written


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    if args.topic not in catalog():
        raise InputError(f"unknown topic {args.topic!r}; catalog topics: {', '.join(catalog())}")
    if args.max is not None and args.max <= 0:
        raise InputError("--max must be positive")
    settings.require_bootstrap()
    try:
        asyncio.run(
            tail_topic(
                settings,
                args.topic,
                args.from_beginning,
                args.max,
                _filters(args.filter),
                args.idle_timeout,
                sys.stdout,
            )
        )
    except BrokenPipeError:  # `| head` closed the pipe: that is a normal way to stop
        return 0
    return 0


# --- dlq replay ------------------------------------------------------------------------


def parse_time(text: str | None, option: str) -> int | None:
    """An ISO-8601 time with a zone, as epoch milliseconds; ``option`` names it in errors."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"{option} {text!r}: use ISO-8601 with a zone, e.g. 2026-11-25T08:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise InputError(f"{option} {text!r}: add a time zone, e.g. Z for UTC")
    return int(moment.timestamp() * 1000)


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    since = parse_time(args.since, "--since")
    settings.require_bootstrap()
    if not args.dry_run:
        announce_kafka(settings)
    from services.common.dlq import replay_dlq

    summary = asyncio.run(
        replay_dlq(settings, set(args.reason), since, args.dry_run, models=set(args.model))
    )
    data = summary.__dict__ | {"dry_run": args.dry_run}
    if args.json:
        print(orjson.dumps(data).decode())
    else:
        verb = "would replay" if args.dry_run else "replayed"
        print(f"{verb} {summary.replayed} of {summary.matched} matching rejection(s) to events.raw")
        for model, n in sorted(summary.by_model.items()):
            print(f"  model {model:<14} {n}")
        for code, n in sorted(summary.by_reason.items()):
            print(f"  {code:<20} {n}")
        print(
            f"skipped: {summary.already_valid} already valid, {summary.already_replayed} already "
            f"replayed, {summary.truncated} truncated in the DLQ (original too large to keep)"
        )
    return 0


# --- forget ----------------------------------------------------------------------------


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from services.common.query_store import QueryStore

    announce_redis(settings)

    async def go() -> tuple[int, int]:
        store = QueryStore(settings)
        try:
            predictions = len(
                await store.entity_predictions(args.entity_id, limit=settings.redis_entity_cap)
            )
            removed = await store.forget_entity(args.entity_id)
        finally:
            await store.close()
        return predictions, removed

    predictions, removed = asyncio.run(go())
    data = {
        "entity_id": args.entity_id,
        "predictions_removed": predictions,
        "keys_removed": removed,
        "note": "Kafka topics keep records until their retention (see schemas/topics.yaml)",
    }
    if args.json:
        print(orjson.dumps(data).decode())
    else:
        print(
            f"removed {predictions} prediction(s) of {args.entity_id} ({removed} Redis keys) from the "
            "query store; Kafka topics keep records until their retention (docs/operations.md)"
        )
    return 0
