"""One reader for the files users hand to scoremesh: events, labels and labelled data.

JSON lines (one object per line) or CSV with a header, told apart by the file's suffix
(``.csv``; ``.jsonl``/``.json``/``.ndjson``) or, without one, by the first non-blank
character (``{`` means JSON lines). CSV cells are typed by one rule (``parse_cell``):
empty is null, true/false are booleans, whole numbers are ints, other numbers floats,
anything else stays text. Every row keeps its line number, and a row that cannot be read
says why, so callers can report every bad line at once instead of stopping at the first.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

Format = Literal["auto", "jsonl", "csv"]
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of input: its values, or the reason it could not be read."""

    line: int
    values: dict[str, Any] | None
    problem: str | None = None


def parse_cell(text: str) -> Any:
    """A CSV cell's value: None, bool, int, float or the text itself."""
    if text == "":
        return None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def detect(text: str, name: str = "", fmt: Format = "auto") -> Literal["jsonl", "csv"]:
    if fmt != "auto":
        return fmt
    suffix = Path(name).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "csv"


def read_rows(
    text: str, name: str = "input", fmt: Format = "auto", cell: Callable[[str], Any] = parse_cell
) -> Iterator[Row]:
    """Each non-blank line as a Row (CSV: each record after the header, its cells typed by
    ``cell``: ``parse_cell``, or e.g. ``str`` to keep the text for the caller to type)."""
    if detect(text, name, fmt) == "jsonl":
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield Row(line, None, f"not valid JSON ({exc})")
                continue
            if isinstance(value, dict):
                yield Row(line, value)
            else:
                yield Row(line, None, f"a JSON {type(value).__name__}, not an object")
        return
    reader = csv.DictReader(io.StringIO(text))
    for record in reader:
        width = len(reader.fieldnames or ())
        if None in record:
            extra = len(record[None])  # type: ignore[index]
            yield Row(
                reader.line_num,
                None,
                f"{extra} more fields than the header: {width + extra} columns, the header "
                f"has {width}",
            )
            continue
        if None in record.values():
            found = sum(v is not None for v in record.values())
            yield Row(
                reader.line_num,
                None,
                f"{width - found} fewer fields than the header: {found} columns, the header "
                f"has {width}",
            )
            continue
        yield Row(reader.line_num, {k: cell(v or "") for k, v in record.items()})


def label_text(value: Any) -> str:
    """A label as the class name it stands for (true -> "1", as a spec's classes are)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def csv_header(text: str) -> list[str]:
    """The column names of a CSV text (empty for JSON lines)."""
    return list(csv.DictReader(io.StringIO(text)).fieldnames or [])


def read_file(path: Path, error: type[Exception]) -> str:
    """A file's text; ``error`` says plainly why it cannot be read."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
