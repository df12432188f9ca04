"""Labelled JSON lines, as `models register/validate --data` and `models spec init` read them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from services.common.errors import UserError


def labelled_objects(
    name: str, text: str, label: str, error: type[UserError]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; ``error`` says which line is not a JSON
    object with a ``label``."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise error(f"{name}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get(label) is None:
            raise error(f"{name}:{lineno}: expected an object with a {label!r}")
        yield lineno, obj
