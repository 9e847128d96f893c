"""The service's logs: one line per record, as text or as JSON (``METALEARN_LOG_FORMAT``), access lines included.

``metalearn serve`` routes every logger (the service's and uvicorn's) through
:func:`configure`. The access line of a request (logger ``service.access``,
written by :class:`service.request_ids.RequestIds`) carries its method, path,
status, duration and request id, as fields of the JSON object or, as text::

    2026-11-28 13:20:01,123 INFO service.access: POST /v1/sessions/{session_id}/predict 200 1.2 ms id=5f0c...

In JSON a record is one object per line, for a log collector::

    {"ts": "2026-11-28T13:20:01.123Z", "level": "INFO", "logger": "service.access", "message": "POST ... 200 1.2 ms",
     "method": "POST", "path": "/v1/sessions/{session_id}/predict", "status": 200, "duration_ms": 1.2, "request_id": "5f0c..."}

with the traceback of an error's exception under ``exception``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a record may carry besides the message (logging's ``extra``), written as JSON fields.
FIELDS = ("method", "path", "status", "duration_ms", "request_id", "client")


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ts (UTC, ms), level, logger, message, the FIELDS it carries, exception."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((name, getattr(record, name)) for name in FIELDS if getattr(record, name, None) is not None)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with control characters in the message escaped: a request's path or a file's name with a
    newline in it (``GET /x%0a... INFO service.access: ...``) would otherwise write a line of its own choosing."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127] if code != 9} | {10: "\\n", 13: "\\r"}


def configure(level: str = "info", fmt: str = "text") -> None:
    """Every logger to standard error, one line per record, as ``fmt`` (text | json), from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
