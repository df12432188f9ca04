"""How commands print: ``-o table|json|yaml`` on stdout, progress and notices on stderr.

``-o json`` is for scripts: one JSON document per invocation (indented, UTF-8), whose keys
are the command's documented data and stay stable across releases; nothing else is written
to stdout. ``-o yaml`` is the same data as YAML. ``table`` is for people: tables and lines
that may change. Progress bars are drawn on stderr, only when stderr is a terminal, so
pipes and logs never see them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output,
    typer.Option(
        "-o",
        "--output",
        help="table for people; json or yaml for scripts (stable keys, nothing else on stdout).",
        case_sensitive=False,
    ),
]


def to_json(data: Any) -> str:
    import orjson

    return orjson.dumps(
        data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=_bytes
    ).decode()


def _bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        import base64

        return {"$base64": base64.b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_yaml(data: Any) -> str:
    import orjson
    import yaml

    plain = orjson.loads(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS, default=_bytes))
    return str(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))


def emit(data: Any, output: Output, human: Callable[[], None] | Sequence[str]) -> None:
    """Print ``data`` as JSON or YAML, or the human form (lines, or a function that prints)."""
    if output is Output.json:
        sys.stdout.write(to_json(data) + "\n")
    elif output is Output.yaml:
        sys.stdout.write(to_yaml(data))
    elif callable(human):
        human()
    else:
        for line in human:
            print(line)
    sys.stdout.flush()


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    empty: str = "(none)",
    max_width: int = 60,
) -> None:
    """Rows as a table with upper-case headers; long cells are cut with an ellipsis. On a
    terminal: rich, as wide as the terminal; piped: plain columns, one row a line, no
    trailing blanks (for grep and awk)."""
    if not rows:
        print(empty)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    grid = Table(
        box=box.SIMPLE_HEAD if tty else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if tty else "",
    )
    for column in columns:
        grid.add_column(column.upper(), no_wrap=True, overflow="ellipsis", max_width=max_width)
    for row in rows:
        grid.add_row(*(_cell(row.get(c, "")) for c in columns))
    if tty:
        Console(file=sys.stdout, highlight=False).print(grid)
        return
    plain = Console(width=1000, no_color=True, highlight=False, color_system=None)
    with plain.capture() as captured:
        plain.print(grid)
    for line in captured.get().splitlines():
        print(line.rstrip())


def _cell(value: Any) -> str:
    from rich.markup import escape

    return escape("-" if value is None else str(value))


def stderr_console() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


class Bar:
    """One progress bar: ``advance(n)``; ``step(text, total)`` starts a new phase."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def step(self, description: str, total: int | None = None) -> None:
        self._progress.update(self._task, description=description, total=total, completed=0)

    def to(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Bar]:
    """A progress bar on stderr for a long operation (a spinner with the elapsed time until
    a total is known). Drawn only when stderr is a terminal; vanishes when done."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    with bar:
        yield Bar(bar, bar.add_task(description, total=total))


def notice(text: str) -> None:
    """A line for people on stderr (stdout stays the command's data)."""
    print(f"scoremesh: {text}", file=sys.stderr, flush=True)
