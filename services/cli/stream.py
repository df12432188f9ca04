"""`scoremesh events send | labels send | tail | dlq replay | forget`: feed, inspect,
replay, forget."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from services.cli.context import check_model, complete_topic, examples, load_settings, run_async
from services.cli.output import Bar, Output, OutputOption, emit, progress
from services.cli.target import announce_kafka, announce_redis
from services.common.errors import UserError

if TYPE_CHECKING:
    from services.cli.tail import Filter
    from services.common.settings import Settings


class InputError(UserError, ValueError):
    """A file or argument is wrong; the message says where."""


SkipBadOption = Annotated[
    bool, typer.Option("--skip-bad", help="Send the good lines and report the bad ones.")
]

events_app = typer.Typer(help="Send events to events.raw.", no_args_is_help=True)
labels_app = typer.Typer(help="Send ground truth to the labels topic.", no_args_is_help=True)
dlq_app = typer.Typer(help="The dead-letter topic, events.rejected.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(events_app, name="events", epilog=examples("scoremesh events send events.jsonl"))
    app.add_typer(labels_app, name="labels", epilog=examples("scoremesh labels send labels.csv"))
    app.add_typer(
        dlq_app, name="dlq", epilog=examples("scoremesh dlq replay --reason out_of_range --dry-run")
    )
    app.command(
        "tail",
        epilog=examples(
            "scoremesh tail predictions --from-beginning --max 5 | jq .model_version",
            "scoremesh tail predictions -J --from-beginning --exit-at-end",
            "scoremesh tail events.raw --partition 0 --offset 42 --max 1 -o yaml",
            "scoremesh tail predictions --filter model=fraud --filter 'features.age>60'",
            "scoremesh tail predictions -o table --offset -10 --exit-at-end",
        ),
    )(tail)
    app.command(
        "forget", epilog=examples("scoremesh forget cust-42", "scoremesh forget cust-42 -o json")
    )(forget)


# --- events send -----------------------------------------------------------------------


class FileFormat(StrEnum):
    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"


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
    model = event.get("model")
    if model is not None and not isinstance(model, str):
        return "model must be a string (or absent: the default model)"
    return None


def _csv_event(row: dict[str, str]) -> dict[str, Any]:
    """An event from a CSV row: event_id, entity_id, model and attr.* stay text; event_time
    is epoch milliseconds or ISO-8601; every other column is a feature (``parse_cell``)."""
    from services.common.tabular import parse_cell

    event: dict[str, Any] = {
        "event_id": row["event_id"],
        "entity_id": row["entity_id"],
        "features": {},
        "attributes": {},
    }
    for column, value in row.items():
        if column in ("event_id", "entity_id"):
            continue
        if column == "event_time":
            event["event_time"] = int(value) if value.isdigit() else value
        elif column == "model":
            if value:
                event["model"] = value
        elif column.startswith("attr."):
            event["attributes"][column[5:]] = value
        else:
            event["features"][column] = parse_cell(value)
    return event


def parse_events(text: str, fmt: str, name: str = "") -> Parsed:
    """Every line checked before anything is sent; bad ones reported with line numbers.
    Read by the one input reader (services/common/tabular.py)."""
    from services.common.tabular import csv_header, detect, read_rows

    parsed = Parsed()
    if not text.strip():
        raise InputError("no events to send: the input is empty")
    kind = detect(text, name, fmt)  # type: ignore[arg-type]
    if kind == "csv":
        missing = [c for c in ("event_id", "entity_id") if c not in csv_header(text)]
        if missing:
            raise InputError(
                f"the CSV header lacks {missing}; it needs event_id, entity_id, "
                "optional event_time, model, attr.* columns and one column per feature"
            )
    for row in read_rows(text, name, kind, cell=str):
        if row.values is None:
            parsed.bad.append((row.line, row.problem or "unreadable"))
            continue
        event = _csv_event(row.values) if kind == "csv" else row.values
        problem = _check_envelope(event)
        if problem:
            parsed.bad.append((row.line, problem))
        else:
            parsed.events.append((row.line, event))
    return parsed


async def send_events(
    settings: Settings, events: list[dict[str, Any]], rate: float | None, bar: Bar
) -> tuple[int, int]:
    import asyncio

    import orjson

    from services.common.kafka import make_producer, start_with_retry

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
                bar.advance(len(futures))
                futures.clear()
    finally:
        await producer.stop()
    return sent, failed


def report_bad(bad: list[tuple[int, str]]) -> None:
    for lineno, problem in bad[:20]:
        print(f"line {lineno}: {problem}", file=sys.stderr)
    if len(bad) > 20:
        print(f"... and {len(bad) - 20} more bad lines", file=sys.stderr)


@events_app.command(
    "send",
    epilog=examples(
        "scoremesh events send events.jsonl",
        "scoremesh events send fraud-events.csv -m fraud --rate 500",
        "head -100 events.jsonl | scoremesh events send -",
    ),
)
def events_send(
    file: Annotated[
        str, typer.Argument(help="JSON lines or CSV with a header; - for standard input.")
    ],
    fmt: Annotated[
        FileFormat,
        typer.Option("--format", help="auto: by the file's suffix, else its first character."),
    ] = FileFormat.auto,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.001, help="Events per second (default: as fast as possible).", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "-m",
            "--model",
            help="Events that name no model are for this one (default: they go to the "
            "mesh's default model, SCOREMESH_MODEL_NAME).",
            show_default=False,
        ),
    ] = None,
    skip_bad: SkipBadOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Send events (JSON lines or CSV) to events.raw, keyed by entity_id; every line is
    checked first, and nothing is sent while a line is bad (unless --skip-bad)."""
    from services.common.tabular import read_file

    if model:
        check_model(model)
    text = sys.stdin.read() if file == "-" else read_file(Path(file), InputError)
    parsed = parse_events(text, fmt.value, "" if file == "-" else file)
    report_bad(parsed.bad)
    if parsed.bad and not skip_bad:
        raise InputError(
            f"{len(parsed.bad)} bad line(s), nothing sent; fix them or pass --skip-bad"
        )
    if not parsed.events:
        raise InputError("no events to send")
    events = [e for _, e in parsed.events]
    if model:
        events = [e if e.get("model") else {**e, "model": model} for e in events]
    settings = load_settings()
    announce_kafka(settings)
    with progress("sending events", total=len(events)) as bar:
        sent, failed = run_async(send_events(settings, events, rate, bar))
    summary = {"sent": sent, "failed": failed, "skipped_bad_lines": len(parsed.bad)}
    emit(summary, output, [f"sent {sent}, failed {failed}, skipped {len(parsed.bad)} bad line(s)"])
    if failed:
        raise typer.Exit(1)


# --- labels send ---------------------------------------------------------------------


@labels_app.command(
    "send",
    epilog=examples(
        "scoremesh labels send labels.csv",
        "scoremesh labels send fraud-labels.jsonl -m fraud --skip-bad",
    ),
)
def labels_send(
    file: Annotated[
        Path,
        typer.Argument(help="JSON lines or CSV with the header event_id,value,label_time."),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "-m",
            "--model",
            help="The model these labels are for; their values are checked against its "
            "classes (default: the default model, SCOREMESH_MODEL_NAME).",
            show_default=False,
        ),
    ] = None,
    skip_bad: SkipBadOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Send ground truth to the labels topic, keyed by event_id; every line is checked
    first, and nothing is sent while a line is bad (unless --skip-bad)."""
    from services.label_join.labels import send_labels

    settings = load_settings()
    if model:
        check_model(model)
    announce_kafka(settings)
    with progress("sending labels") as bar:
        summary = run_async(
            send_labels(settings, file, skip_bad=skip_bad, model=model, on_sent=bar.to)
        )
    for bad in summary.bad[:20]:
        print(f"line {bad.line}: {bad.message}", file=sys.stderr)
    emit(
        summary.as_dict(),
        output,
        [
            f"read {summary.read}, valid {summary.valid}, sent {summary.sent}, bad {len(summary.bad)}"
        ],
    )
    if not summary.ok:
        raise InputError(
            f"{len(summary.bad)} bad line(s), nothing sent; fix them or pass --skip-bad"
        )


# --- tail ------------------------------------------------------------------------------


def tail(
    topic: Annotated[
        str,
        typer.Argument(help="A catalog topic, e.g. predictions.", autocompletion=complete_topic),
    ],
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at each partition's first record.")
    ] = False,
    offset: Annotated[
        int | None,
        typer.Option(
            help="Start at this offset in each partition read; negative: that many records "
            "before the end (kcat's -o).",
            show_default=False,
        ),
    ] = None,
    partition: Annotated[
        list[int] | None,
        typer.Option(
            "-p",
            "--partition",
            min=0,
            help="Read only this partition (repeatable; default: every partition).",
            show_default=False,
        ),
    ] = None,
    exit_at_end: Annotated[
        bool,
        typer.Option(
            "-e",
            "--exit-at-end",
            help="Stop at the end of every partition as it was at start (kcat's -e).",
        ),
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option("--max", "-c", min=1, help="Stop after N records.", show_default=False),
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Only records where FIELD OP VALUE holds; FIELD may be nested "
            "(features.age) and OP is = != > >= < <= or ~ (contains). Repeatable: all must "
            "hold.",
            metavar="FIELD OP VALUE",
            show_default=False,
        ),
    ] = None,
    envelope: Annotated[
        bool,
        typer.Option(
            "-J",
            "--envelope",
            help="Each record with its topic, partition, offset, timestamp, key and headers "
            "(kcat's -J); the value is under 'value'.",
        ),
    ] = False,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Stop after this many seconds without a record.", show_default=False
        ),
    ] = None,
    output: Annotated[
        Output,
        typer.Option(
            "-o",
            "--output",
            help="json: one JSON line per record (for jq); yaml: a document per record; "
            "table: a row per record with its partition, offset, time and key.",
            case_sensitive=False,
        ),
    ] = Output.json,
) -> None:
    """Decode a catalog topic: one line per record, as it arrives (stop with Ctrl-C)."""
    from scoremesh.contract.catalog import catalog
    from services.cli.tail import TailOptions, parse_filter, tail_topic

    if topic not in catalog():
        raise InputError(f"unknown topic {topic!r}; catalog topics: {', '.join(catalog())}")
    if from_beginning and offset is not None:
        raise InputError("--from-beginning and --offset both say where to start: give one")
    parsed: list[Filter] = [parse_filter(text) for text in filters or []]
    settings = load_settings()
    settings.require_bootstrap()
    options = TailOptions(
        from_beginning=from_beginning,
        offset=offset,
        partitions=sorted(set(partition or [])),
        exit_at_end=exit_at_end,
        limit=limit,
        filters=parsed,
        envelope=envelope,
        idle_timeout=idle_timeout,
        output=output.value,
    )
    run_async(tail_topic(settings, topic, options, sys.stdout))


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


@dlq_app.command(
    "replay",
    epilog=examples(
        "scoremesh dlq replay --reason out_of_range --dry-run",
        "scoremesh dlq replay --reason out_of_range --since 2026-11-25T00:00:00Z",
        "scoremesh dlq replay -m fraud --reason model_unavailable",
    ),
)
def dlq_replay(
    reason: Annotated[
        list[str] | None,
        typer.Option(
            help="Only rejections with this reason code (repeatable).", show_default=False
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "-m",
            "--model",
            help="Only events for this model (repeatable), e.g. after fixing its champion.",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only rejections at or after this ISO-8601 time.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be replayed; send nothing.")
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Re-send rejected events to events.raw after a fix (each at most once; events that
    have since passed validation are skipped)."""
    from services.common.dlq import replay_dlq

    for name in model or []:
        check_model(name)
    since_ms = parse_time(since, "--since")
    settings = load_settings()
    settings.require_bootstrap()
    if not dry_run:
        announce_kafka(settings)
    with progress("reading the dead-letter topic") as bar:
        summary = run_async(
            replay_dlq(
                settings,
                set(reason or []),
                since_ms,
                dry_run,
                models=set(model or []),
                on_sent=bar.to,
            )
        )
    data = summary.__dict__ | {"dry_run": dry_run}

    def human() -> None:
        verb = "would replay" if dry_run else "replayed"
        print(f"{verb} {summary.replayed} of {summary.matched} matching rejection(s) to events.raw")
        for name, n in sorted(summary.by_model.items()):
            print(f"  model {name:<14} {n}")
        for code, n in sorted(summary.by_reason.items()):
            print(f"  {code:<20} {n}")
        print(
            f"skipped: {summary.already_valid} already valid, {summary.already_replayed} already "
            f"replayed, {summary.truncated} truncated in the DLQ (original too large to keep)"
        )

    emit(data, output, human)


# --- forget ----------------------------------------------------------------------------


def forget(
    entity_id: Annotated[str, typer.Argument(help="The entity whose data is removed.")],
    output: OutputOption = Output.table,
) -> None:
    """Remove an entity's predictions from the query store (personal-data requests)."""
    from services.common.query_store import QueryStore

    settings = load_settings()
    announce_redis(settings)

    async def go() -> tuple[int, int]:
        store = QueryStore(settings)
        try:
            predictions = len(
                await store.entity_predictions(entity_id, limit=settings.redis_entity_cap)
            )
            removed = await store.forget_entity(entity_id)
        finally:
            await store.close()
        return predictions, removed

    predictions, removed = run_async(go())
    data = {
        "entity_id": entity_id,
        "predictions_removed": predictions,
        "keys_removed": removed,
        "note": "Kafka topics keep records until their retention (see schemas/topics.yaml)",
    }
    emit(
        data,
        output,
        [
            f"removed {predictions} prediction(s) of {entity_id} ({removed} Redis keys) from the "
            "query store; Kafka topics keep records until their retention (docs/operations.md)"
        ],
    )
