"""`scoremesh labels send FILE`: ground truth from a file to the labels topic.

JSON lines (``{"event_id": ..., "value": ..., "label_time": ...}``) or CSV with the header
``event_id,value,label_time``. ``label_time`` is epoch milliseconds or ISO-8601 with a zone;
empty or absent means now. Every line is checked first; a bad line is reported with its
number and, unless ``skip_bad``, nothing is sent at all, so a file is never half-sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scoremesh.contract.codec import MAGIC, codec, decode_any
from scoremesh.contract.featurespec import MAX_ID_LEN, event_time_ms
from scoremesh.contract.topics import TopicName
from services.common.errors import UserError
from services.common.kafka import make_producer, start_with_retry
from services.common.registry_view import RegistryView
from services.common.settings import Settings
from services.common.tabular import csv_header, detect, read_rows

LABELS_TOPIC: TopicName = "labels"
CSV_COLUMNS = ("event_id", "value", "label_time")
FileFormat = Literal["jsonl", "csv"]


class LabelFileError(UserError, ValueError):
    """The file cannot be read at all (missing, unreadable, no header)."""


class InvalidLabel(ValueError):
    """A JSON label on the labels topic that breaks the rules of ``check_label``; ``raw`` is
    the object as it came (its event_id, when it has one, keys the unmatched record)."""

    def __init__(self, message: str, raw: dict[str, Any]) -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class LabelSendSummary:
    path: str
    format: FileFormat
    read: int = 0  # data lines (blank lines and the CSV header not counted)
    valid: int = 0
    sent: int = 0
    bad: list[BadLine] = field(default_factory=list)
    skipped_bad: bool = False

    @property
    def ok(self) -> bool:
        """True when everything valid was sent and no bad line stopped the file."""
        return not self.bad or self.skipped_bad

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "read": self.read,
            "valid": self.valid,
            "sent": self.sent,
            "bad": [{"line": b.line, "message": b.message} for b in self.bad],
            "skipped_bad": self.skipped_bad,
            "ok": self.ok,
        }


def _rows(text: str, path: Path) -> tuple[FileFormat, Iterator[tuple[int, dict[str, Any] | str]]]:
    """The file's format and (line number, the row's fields or an error message) for every
    non-blank data line, read by the one input reader (services/common/tabular.py); CSV
    cells stay text (an event_id of digits is still an id)."""
    fmt = detect(text, path.name)
    if fmt == "csv":
        header = [h.strip() for h in csv_header(text)]
        missing = [c for c in CSV_COLUMNS[:2] if c not in header]
        if missing:
            raise LabelFileError(
                f"line 1: the CSV header must name {','.join(CSV_COLUMNS)} "
                f"(missing {', '.join(missing)})"
            )

    def rows() -> Iterator[tuple[int, dict[str, Any] | str]]:
        for row in read_rows(text, path.name, fmt, cell=str.strip):
            if row.values is None:
                yield row.line, row.problem or "unreadable"
            else:
                yield row.line, {str(k).strip(): v for k, v in row.values.items()}

    return fmt, rows()


def check_label(
    raw: dict[str, Any], classes: Collection[str] | None, now_ms: int | None
) -> dict[str, Any] | str:
    """A Label record from one row, or what is wrong with it. ``now_ms``: the label_time of
    a row without one (None: such a row is wrong)."""
    event_id = raw.get("event_id")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_ID_LEN:
        return f"event_id must be a non-empty string of at most {MAX_ID_LEN} characters"
    if not event_id.isprintable():
        return "event_id contains unprintable characters"
    value = raw.get("value")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # JSON 1 means the class "1"
    if not isinstance(value, str) or not value.strip():
        return "value (the true class) is missing or not a string"
    value = value.strip()
    if classes is not None and value not in classes:
        return f"value {value!r} is not one of the model's classes {sorted(classes)}"
    stamp = raw.get("label_time")
    if stamp is None or stamp == "":
        if now_ms is None:
            return "label_time is missing and the record has no timestamp to use instead"
        label_time: int | None = now_ms
    elif isinstance(stamp, str) and stamp.strip().lstrip("-").isdigit():
        label_time = event_time_ms(int(stamp))
    else:
        label_time = event_time_ms(stamp)
    if label_time is None:
        return f"label_time {stamp!r} is neither whole epoch milliseconds nor ISO-8601 with a zone"
    return {"event_id": event_id, "value": value, "label_time": label_time}


def decode_label(data: bytes, record_time_ms: int | None) -> dict[str, Any]:
    """A label from the labels topic: Avro Label (any released version), or a JSON object
    read by the rules of a label file (``check_label``: the class may be a JSON integer,
    label_time epoch ms or ISO-8601 with a zone), whose missing label_time is the Kafka
    record's timestamp, as a JSON event's missing event_time is.

    Raises CodecError (neither Avro nor a JSON object) or InvalidLabel."""
    if data[:2] == MAGIC:
        return codec("Label").decode(data)
    raw = decode_any(LABELS_TOPIC, data)
    stamp = record_time_ms if record_time_ms is not None and record_time_ms >= 0 else None
    checked = check_label(raw, None, stamp)
    if isinstance(checked, str):
        raise InvalidLabel(checked, raw)
    model = raw.get("model")
    if model is not None and not (isinstance(model, str) and 0 < len(model) <= MAX_ID_LEN):
        raise InvalidLabel("model must be a model's name (a string) or absent", raw)
    checked["model"] = model
    return checked


def read_labels(
    path: Path, classes: Collection[str] | None = None, now_ms: int | None = None
) -> tuple[FileFormat, list[tuple[int, dict[str, Any]]], list[BadLine], int]:
    """Parse and check a label file: (format, valid rows with line numbers, bad lines, rows read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"cannot read {path}: {exc}") from None
    fmt, rows = _rows(text, path)
    stamp = now_ms if now_ms is not None else int(time.time() * 1000)
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    read = 0
    for number, row in rows:
        read += 1
        checked = row if isinstance(row, str) else check_label(row, classes, stamp)
        if isinstance(checked, str):
            bad.append(BadLine(number, checked))
        else:
            good.append((number, checked))
    return fmt, good, bad, read


async def model_classes(settings: Settings, model: str | None = None) -> frozenset[str] | None:
    """Every class any registered version of the model (default: the default model) knows;
    None when no version is."""
    view = RegistryView(settings)
    await view.start()
    try:
        classes = {
            c
            for v in view.state.of_model(model or settings.model_name)
            for c in v.feature_spec.classes
        }
    finally:
        await view.stop()
    return frozenset(classes) if classes else None


async def send_labels(
    settings: Settings,
    path: Path,
    *,
    skip_bad: bool = False,
    classes: Collection[str] | None = None,
    check_registry: bool = True,
    model: str | None = None,
    on_sent: Callable[[int, int], None] | None = None,
) -> LabelSendSummary:
    """Check every line, then send the labels keyed by event_id (co-partitioned with
    predictions). ``classes``: the allowed classes; by default (``check_registry``) those of
    the model's registered versions, or any class when none is registered yet. ``model``:
    the labels are for this model (default: the default model). ``on_sent(sent, total)``
    follows the sending."""
    if classes is None and check_registry:
        classes = await model_classes(settings, model)
    fmt, good, bad, read = read_labels(path, classes)
    summary = LabelSendSummary(str(path), fmt, read=read, valid=len(good), bad=bad)
    summary.skipped_bad = bool(bad) and skip_bad
    if (bad and not skip_bad) or not good:
        return summary
    label_codec = codec("Label")
    producer = make_producer(settings)
    await start_with_retry(producer.start, "labels-producer", settings)
    topic = settings.topic(LABELS_TOPIC)
    try:
        futures: list[asyncio.Future[Any]] = []
        for _number, label in good:
            if model:
                label = {**label, "model": model}
            futures.append(
                await producer.send(
                    topic, label_codec.encode(label), key=label["event_id"].encode()
                )
            )
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                summary.sent += len(futures)
                futures.clear()
                if on_sent is not None:
                    on_sent(summary.sent, len(good))
        await asyncio.gather(*futures)
        summary.sent += len(futures)
        if on_sent is not None:
            on_sent(summary.sent, len(good))
    finally:
        await producer.stop()
    return summary
