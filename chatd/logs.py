"""Logging set-up: ``log-format`` ``text`` (one readable line) or ``json``.

JSON lines are for log shippers: one object per line with ``time``
(ISO 8601, UTC), ``level``, ``logger``, ``message`` and, where the line
is about a connection, ``peer`` (the client address, after
``trusted-proxies``), ``path`` and ``code`` (the close code). Written by
python-json-logger. Connection log calls pass those fields with
``extra={...}``; the text format already names them in the message.

Two guards sit where every line passes, the handler ``configure``
installs (docs/security.md, "Logs"):

- **No forged lines** (CWE-117). Both formatters escape what a client
  could have written: every control character (C0, DEL, C1), line and
  paragraph separator, bidi control and lone surrogate becomes ``\\n``,
  ``\\x1b``, ``\\u2028``... in the message (format arguments included,
  whatever they are: names, paths, library error texts), in JSON's extra
  fields and in tracebacks. Each argument is cut to ``MAX_ARG_CHARS``
  characters and the message to ``MAX_MESSAGE_CHARS``. In the text
  format a record is one line; a traceback's lines follow, each indented
  by two spaces, so no line a client's bytes begin is a record.
- **Bounded volume per client** (``ClientLines``). A line logged while
  serving a client (its connection task sets ``client_source``; a line
  with a ``peer`` extra names one too) costs a token from that
  connection's bucket, its address's bucket and one bucket for all
  clients; a line with no token left is left out, counted, and reported
  by ``report_suppressed`` once a minute in one summary line.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import ipaddress
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping

import trio
from pythonjsonlogger.json import JsonFormatter

from chatd.proxy import in_networks

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields of every JSON line, in order; ``extra`` fields follow.
_JSON_FIELDS = ("asctime", "levelname", "name", "message")

#: Longest text one format argument (a name, a path, an error text)
#: contributes to a line, in characters, after escaping.
MAX_ARG_CHARS = 200
#: Longest message, in characters, after escaping (the prefix aside).
MAX_MESSAGE_CHARS = 1000
#: Longest line of a traceback, in characters.
MAX_TRACE_LINE_CHARS = 1000

#: What a log line may not carry as it is: C0 and C1 controls and DEL
#: (Unicode category Cc: line feed, carriage return, escape...), the line
#: and paragraph separators (Zl, Zp), the bidi controls (which reorder
#: what a terminal shows: UTS #9's explicit formatting characters) and
#: lone surrogates (which no UTF-8 stream can write).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every character ``_UNSAFE`` names written as an escape
    (``\\n``, ``\\x1b``, ``\\u2028``): one line, no terminal control."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_char, text)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more]"


def safe(text: str, limit: int = MAX_ARG_CHARS) -> str:
    """``text`` escaped (``escape``) and cut (``clip``): fit for a log line."""
    return clip(escape(text), limit)


class _Clipped:
    """A format argument as a log line may show it: ``%s`` and ``%r``
    give the escaped, cut text of the value's ``str`` and ``repr``."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return safe(str(self.value))

    def __repr__(self) -> str:
        return safe(repr(self.value))


def _guard(value: object) -> object:
    # Numbers keep %d and %.1f working and can carry nothing.
    return value if isinstance(value, (int, float)) else _Clipped(value)


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with every argument escaped and cut, then the
    whole escaped and cut (``MAX_MESSAGE_CHARS``)."""
    msg, args = record.msg, record.args
    text = None
    if args:
        if isinstance(args, Mapping):
            guarded: object = {key: _guard(value) for key, value in args.items()}
        else:
            guarded = tuple(_guard(value) for value in args)
        try:
            text = str(msg) % guarded
        except (TypeError, ValueError, KeyError):
            text = None  # an argument a guard cannot stand in for: format as logging does
    if text is None:
        try:
            text = record.getMessage()
        except Exception:  # logging's own error report would quote the arguments
            text = f"{msg!s} (arguments that do not fit the format)"
    return clip(escape(text), MAX_MESSAGE_CHARS)


def _safe_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message is ``safe_message``'s (the record
    itself is left as it is for any other handler)."""
    clean = copy.copy(record)
    clean.msg, clean.args = safe_message(record), None
    return clean


def _safe_trace(text: str, indent: str, error: BaseException | None = None) -> str:
    """A traceback's lines, each escaped, cut and indented; the texts of
    ``error`` and of the exceptions chained to it (and their notes) are
    escaped whole first, so that a line break in one does not start a line."""
    for part in _error_texts(error):
        if _UNSAFE.search(part) is not None:
            text = text.replace(part, escape(part))
    return "\n".join(indent + clip(escape(line), MAX_TRACE_LINE_CHARS)
                     for line in text.split("\n"))


def _error_texts(error: BaseException | None) -> list[str]:
    texts: list[str] = []
    seen: set[int] = set()
    pending = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        try:
            texts.append(str(exc))
        except Exception:
            pass
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):
            texts.extend(note for note in notes if isinstance(note, str))
        pending += [exc.__cause__, exc.__context__]
        if isinstance(exc, BaseExceptionGroup):
            pending += exc.exceptions
    return sorted(texts, key=len, reverse=True)  # a longer text may hold a shorter one


class SafeTextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with the message escaped and cut: one line per record;
    a traceback's lines follow, escaped and indented by two spaces."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(_safe_record(record))

    def formatException(self, ei) -> str:
        return _safe_trace(super().formatException(ei), "  ", ei[1])

    def formatStack(self, stack_info: str) -> str:
        return _safe_trace(stack_info, "  ")


class SafeJsonFormatter(JsonFormatter):
    """One JSON object per line; the message escaped and cut as in the text
    format, every other text field (``peer``, ``path``, a traceback) escaped
    and cut too (a traceback keeps its line breaks, which JSON escapes)."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
            f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(_safe_record(record))

    def formatException(self, ei) -> str:
        return _safe_trace(super().formatException(ei), "", ei[1])

    def formatStack(self, stack_info: str) -> str:
        return _safe_trace(stack_info, "")

    def process_log_record(self, log_data: dict) -> dict:
        for key, value in log_data.items():
            if isinstance(value, str) and key not in ("message", "exc_info", "stack_info"):
                log_data[key] = safe(value)
        return log_data


# --- log volume per client ----------------------------------------------------


class _Bucket:
    """``rate`` lines a second, at most ``burst`` saved up."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def refill(self, rate: float, burst: float, now: float) -> float:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class ClientSource:
    """Who a line logged while serving one connection is charged to:
    ``address`` (the client's IP once known; None while unknown or for an
    address exempt from per-address limits) and the connection's own
    bucket. ``shown`` is what the summary names it by."""

    __slots__ = ("address", "shown", "bucket")

    def __init__(self, address: str | None, shown: str | None = None) -> None:
        self.address = address
        self.shown = shown or address or "-"
        self.bucket: _Bucket | None = None


#: The client the running task serves (set by the server for each
#: connection's task; trio gives every task its own context).
client_source: contextvars.ContextVar[ClientSource | None] = contextvars.ContextVar(
    "chatd_client_source", default=None)


@contextlib.contextmanager
def charged_to(source: ClientSource | None) -> Iterator[None]:
    """Lines logged inside are charged to ``source``: a connection's, kept
    as ``Client.log_source``, for the lines another task (the router) logs
    on that client's behalf. A ``peer`` extra alone charges the address
    only, and none for an exempt one."""
    if source is None:
        yield
        return
    token = client_source.set(source)
    try:
        yield
    finally:
        client_source.reset(token)


@functools.lru_cache(maxsize=4096)
def address_key(ip: str) -> str:
    """The per-address key of ``ip``: itself for IPv4, its /64 for IPv6
    (one IPv6 host is commonly given a whole /64). Cached: a storm logs
    several lines per connection from few addresses, and parsing one
    costs a few µs."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _peer_ip(peer: str) -> str:
    """The IP of a ``peer`` text (``1.2.3.4:5``, ``[::1]:5``)."""
    if peer.startswith("["):
        return peer[1:].partition("]")[0]
    return peer.rpartition(":")[0] if peer.count(":") == 1 else peer


class ClientLines(logging.Filter):
    """Bounds the log lines any one client can cause (a logging filter on
    chatd's handler).

    A line is a client's when it is logged in a task serving that client
    (``client_source``) or carries a ``peer`` extra. It passes if the
    connection's bucket (``per_connection`` lines a second, ``burst``
    saved), the address's (``per_address``, ``address_burst``; IPv6 by
    /64; none for exempt addresses) and the all-clients bucket (``total``,
    ``total_burst``) each have a token left; else it is left out and
    counted per address for ``summary``. Other lines always pass.
    """

    def __init__(self, *, per_connection: float = 0.1, burst: float = 16,
                 per_address: float = 1.0, address_burst: float = 64,
                 total: float = 100.0, total_burst: float = 1000,
                 max_addresses: int = 10_000, clock=time.monotonic) -> None:
        super().__init__()
        self.per_connection, self.burst = per_connection, burst
        self.per_address, self.address_burst = per_address, address_burst
        self.total, self.total_burst = total, total_burst
        self.max_addresses = max_addresses
        self.clock = clock
        #: Networks whose addresses have no per-address bucket (the
        #: server sets its ``limits-exempt`` here).
        self.exempt: tuple = ()
        self.addresses: dict[str, _Bucket] = {}
        self.everyone = _Bucket(total_burst, clock())
        #: Lines left out since the last summary, per shown address.
        self.suppressed: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        source = client_source.get()
        if source is None:
            peer = record.__dict__.get("peer")
            if not isinstance(peer, str):
                return True
            ip = _peer_ip(peer)
            source = ClientSource(None if in_networks(ip, self.exempt) else ip, ip)
        return self.allow(source)

    def allow(self, source: ClientSource) -> bool:
        """Take a token for one line of ``source``'s; False (and counted)
        when one of its buckets is empty."""
        now = self.clock()
        connection = source.bucket
        if connection is None:
            connection = source.bucket = _Bucket(self.burst, now)
        address = None
        if source.address is not None:
            key = address_key(source.address)
            address = self.addresses.get(key)
            if address is None:
                if len(self.addresses) >= self.max_addresses:
                    self._forget_full(now)
                address = self.addresses[key] = _Bucket(self.address_burst, now)
        if connection.refill(self.per_connection, self.burst, now) < 1 \
                or (address is not None
                    and address.refill(self.per_address, self.address_burst, now) < 1) \
                or self.everyone.refill(self.total, self.total_burst, now) < 1:
            if len(self.suppressed) < self.max_addresses or source.shown in self.suppressed:
                self.suppressed[source.shown] += 1
            else:
                self.suppressed["others"] += 1
            return False
        connection.tokens -= 1
        if address is not None:
            address.tokens -= 1
        self.everyone.tokens -= 1
        return True

    def _forget_full(self, now: float) -> None:
        # A full bucket remembers nothing a fresh one would not.
        for key in [k for k, b in self.addresses.items()
                    if b.refill(self.per_address, self.address_burst, now) >= self.address_burst]:
            del self.addresses[key]
        if len(self.addresses) >= self.max_addresses:
            self.addresses.clear()  # all busy: forgetting is the bounded choice

    def summary(self) -> str | None:
        """One line for the lines left out since the last call, or None."""
        if not self.suppressed:
            return None
        counts, self.suppressed = self.suppressed, Counter()
        top = ", ".join(f"{who} {n}" for who, n in counts.most_common(5))
        more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
        return (f"left out {sum(counts.values())} log lines caused by clients (over the "
                f"per-client log limits, docs/security.md): {top}{more}")


#: The filter ``configure`` installs (one per process: logging is).
client_lines = ClientLines()
#: Seconds between two summaries of the lines left out.
SUMMARY_INTERVAL = 60.0
_summary_log = logging.getLogger("chatd.logs")


async def report_suppressed(interval: float = SUMMARY_INTERVAL) -> None:
    """Log ``client_lines.summary()`` every ``interval`` seconds it has one
    (a task in the server's nursery)."""
    while True:
        await trio.sleep(interval)
        line = client_lines.summary()
        if line is not None:
            _summary_log.warning("%s", line)


# --- set-up --------------------------------------------------------------------


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
    """Send chatd's logs to ``stream`` (stderr) at ``level`` in ``log_format``,
    escaped and bounded per client (see the module's docstring)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(SafeJsonFormatter(
            list(_JSON_FIELDS), rename_fields={"asctime": "time", "levelname": "level",
                                               "name": "logger"},
            json_ensure_ascii=False))
    else:
        handler.setFormatter(SafeTextFormatter())
    handler.addFilter(client_lines)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither format shows a record's thread or process: skip collecting
    # them (the logging HOWTO's "Optimization" section), ~1/4 of a line's
    # cost. A connect storm logs three lines per connection at info, most
    # of them made only to be left out by ``client_lines``.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    accept_log = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _OutOfFiles) for f in accept_log.filters):
        accept_log.addFilter(_OutOfFiles())
