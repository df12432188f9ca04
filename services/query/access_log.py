"""The access log: one JSON line per request, without a ``logging.LogRecord`` per request.

When the logger's only destination is the process's JSON stream handler (what
``configure_logging`` sets up for ``scoremesh run``), a line is formatted here exactly as
``JsonFormatter`` would format the same record, queued, and every line queued during one
turn of the event loop goes out in one write and one flush at the end of that turn. A
``logger.info`` per request (record, formatter, a write and a flush each) measured about a
tenth of a sync prediction's CPU. Every request is still logged; only the write is
shared. With any other logging set-up (tests' capture handlers, extra handlers, filters)
the lines go through ``logging`` as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from services.common.logs import JsonFormatter

MAX_QUEUED = 512  # lines; past this they are written at once rather than at the turn's end


class AccessLog:
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._handler: logging.StreamHandler[Any] | None = None
        self._service = ""
        self._checked = False
        self._queued: list[str] = []
        self._flush_scheduled = False
        self._second = -1
        self._second_text = ""

    def _direct_handler(self) -> logging.StreamHandler[Any] | None:
        """The one JSON stream handler this logger's records end up in, if that is all."""
        handlers: list[logging.Handler] = []
        logger: logging.Logger | None = self.logger
        while logger is not None:
            if logger.filters:
                return None
            handlers += logger.handlers
            if not logger.propagate:
                break
            logger = logger.parent
        if len(handlers) != 1:
            return None
        handler = handlers[0]
        if (
            type(handler) is not logging.StreamHandler
            or not isinstance(handler.formatter, JsonFormatter)
            or handler.filters
            or handler.level > logging.INFO
        ):
            return None
        return handler

    def log(self, fields: dict[str, Any]) -> None:
        """Log one request (``fields`` become the line's keys after the standard ones)."""
        if not self._checked:
            # Logging is configured before the server starts serving: look once, at the
            # first request, not at import or construction.
            self._checked = True
            self._handler = self._direct_handler()
            if self._handler is not None:
                formatter = self._handler.formatter
                assert isinstance(formatter, JsonFormatter)
                self._service = formatter.service
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self._handler is None:
            self.logger.info("request", extra=fields)
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {
            "ts": f"{self._second_text}.{int((now - second) * 1000):03d}Z",
            "level": "info",
            "service": self._service,
            "logger": self.logger.name,
            "msg": "request",
            **fields,
        }
        self._queued.append(orjson.dumps(entry, default=str).decode())
        if len(self._queued) >= MAX_QUEUED:
            self.flush()
        elif not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        handler = self._handler
        if not self._queued or handler is None:
            return
        lines, self._queued = self._queued, []
        text = handler.terminator.join(lines) + handler.terminator
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": "access log write failed"}))
        finally:
            handler.release()
