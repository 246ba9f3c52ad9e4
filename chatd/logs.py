"""Logging set-up: ``log-format`` ``text`` (one readable line) or ``json``.

JSON lines are for log shippers: one object per line with ``time``
(ISO 8601, UTC), ``level``, ``logger``, ``message`` and, where the line
is about a connection, ``peer`` (the client address, after
``trusted-proxies``), ``path`` and ``code`` (the close code). Written by
python-json-logger. Connection log calls pass those fields with
``extra={...}``; the text format already names them in the message.
"""

from __future__ import annotations

import logging
import sys
import time

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields of every JSON line, in order; ``extra`` fields follow.
_JSON_FIELDS = ("asctime", "levelname", "name", "message")


class _UTCJsonFormatter(JsonFormatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
            f".{int(record.msecs):03d}Z"


class _OutOfFiles(logging.Filter):
    """trio's accept loop logs every failed accept (EMFILE: out of file
    descriptors) at ERROR with a traceback, ten times a second: one plain
    WARNING every ``every`` seconds says the same."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.last = float("-inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            self.dropped += 1
            return False
        self.last = now
        original = record.getMessage()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        record.msg = "%s (out of file descriptors? raise the open-file limit above max-connections"
        record.msg += "; %d such lines left out since the last)" if self.dropped else ")"
        record.args = (original, self.dropped) if self.dropped else (original,)
        self.dropped = 0
        return True


def configure(level: str = "info", log_format: str = "text", stream=None) -> None:
    """Send chatd's logs to ``stream`` (stderr) at ``level`` in ``log_format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(_UTCJsonFormatter(
            list(_JSON_FIELDS), rename_fields={"asctime": "time", "levelname": "level",
                                               "name": "logger"},
            json_ensure_ascii=False))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    accept_log = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _OutOfFiles) for f in accept_log.filters):
        accept_log.addFilter(_OutOfFiles())
