"""The access log's direct writer produces the JsonFormatter's lines, one write per loop turn."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from services.common.logs import JsonFormatter
from services.query.access_log import AccessLog

FIELDS = {
    "request_id": "r-1",
    "method": "POST",
    "path": "/v1/predict",
    "route": "/v1/predict",
    "status": 200,
    "duration_ms": 1.25,
    "client": "127.0.0.1",
}


class CountingStream(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def json_logger() -> tuple[logging.Logger, CountingStream]:
    """A logger whose only destination is a JSON stream handler, as ``configure_logging``.

    Outside the logging tree, so pytest's capture handlers do not join in."""
    stream = CountingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("query"))
    logger = logging.Logger("services.query.access", logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    return logger, stream


async def test_lines_match_the_json_formatter_and_share_one_write(
    json_logger: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = json_logger
    access = AccessLog(logger)
    for i in range(3):
        access.log({**FIELDS, "request_id": f"r-{i}"})
    assert stream.getvalue() == ""  # queued until the end of this turn of the loop
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r-0", "r-1", "r-2"]
    assert stream.writes == 1

    logger.info("request", extra=FIELDS)  # the same record through logging
    reference = json.loads(stream.getvalue().splitlines()[-1])
    assert list(reference) == list(lines[1])  # same keys, same order
    for key in ("ts", "request_id"):
        reference.pop(key), lines[1].pop(key)
    assert reference == lines[1]


def test_other_logging_setups_get_log_records(
    json_logger: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = json_logger
    records: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(extra)  # two destinations: the direct writer stands aside
    AccessLog(logger).log(FIELDS)
    assert [r.request_id for r in records] == ["r-1"]  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["request_id"] == "r-1"


def test_nothing_is_written_when_the_level_is_above_info(
    json_logger: tuple[logging.Logger, CountingStream],
) -> None:
    logger, stream = json_logger
    logger.setLevel(logging.WARNING)
    AccessLog(logger).log(FIELDS)
    assert stream.getvalue() == ""
