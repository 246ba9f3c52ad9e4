"""Logs a client cannot forge or flood (issue 19, items 3 and 4; chatd.logs).

- No client byte starts a log line or carries a control character into
  one: the formatters escape every argument, message and traceback
  (hypothesis, at the formatter and through a real server's every path).
- One client's log lines are bounded per connection, per address and in
  all; what is left out is counted and summarised.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from contextlib import contextmanager

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd.config import default_config
from chatd.logs import (
    MAX_ARG_CHARS, MAX_MESSAGE_CHARS, ClientLines, ClientSource, SafeJsonFormatter,
    SafeTextFormatter, address_key, client_source, configure,
)
from chatd.server import Server
from tests.conftest import GUARD, JWT_SECRET, SECRET, ServerProcess, free_port
from tests.rawws import RawClient, open_stream
from tests.rawws import text as frame_text

#: What a record's first line starts with in the text format.
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                    r"[\w.]+: ")
#: Characters no log line may carry as they are (chatd.logs._UNSAFE).
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                    "\u2066-\u2069\ud800-\udfff]")
FORGED = "x\n2026-12-07 20:00:00,000 ERROR chatd: FORGED-LINE \x1b[2J\r"

#: Any text a client could send: every code point, surrogates included.
client_text = st.text(st.characters(codec=None), max_size=300) | st.sampled_from(
    [FORGED, "\u2028forged", "a\x85b", "\u202eevil", "\ud800", "\r\n\r\n", "%s %d %(x)s"])


def check_text_log(out: str) -> list[str]:
    """Every line is a record's first line or an indented traceback line, and
    carries no unsafe character; the record lines."""
    lines = out.split("\n")
    assert lines[-1] == "", "the log ends with a line break"
    records = []
    for line in lines[:-1]:
        assert UNSAFE.search(line) is None, line
        if RECORD.match(line):
            records.append(line)
        else:
            assert line.startswith("  "), f"a line that is not a record: {line!r}"
    return records


def text_record(message, *args, exc: BaseException | None = None, extra=None) -> str:
    record = logging.LogRecord("chatd.test", logging.INFO, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    for key, value in (extra or {}).items():
        setattr(record, key, value)
    return SafeTextFormatter().format(record) + "\n"


# --- the formatters (hypothesis) ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(client_text, client_text)
def test_no_argument_or_error_text_can_start_a_line_or_carry_a_control(one, two):
    try:
        try:
            raise KeyError(two)
        except KeyError as inner:
            raise ValueError(one) from inner
    except ValueError as exc:
        error = exc
    for out in (text_record("frame %s from %r", one, two),
                text_record("user %s: %s", one, error, exc=error),
                text_record(one),  # a message built with an f-string
                text_record("%(who)s said %(what)r", {"who": one, "what": two})):
        records = check_text_log(out)
        assert len(records) == 1
        assert len(records[0]) < 100 + MAX_MESSAGE_CHARS + 20


@settings(max_examples=200, deadline=None)
@given(client_text, client_text)
def test_json_lines_escape_the_message_and_every_field(one, two):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeJsonFormatter(["asctime", "levelname", "name", "message"],
                                           json_ensure_ascii=False))
    record = logging.LogRecord("chatd.test", logging.INFO, __file__, 1, "frame %s", (one,), None)
    record.peer, record.path = two, one
    handler.handle(record)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert UNSAFE.search(text) is None
    fields = json.loads(text)
    for key in ("message", "peer", "path"):
        assert UNSAFE.search(fields[key]) is None


def test_a_forged_line_is_escaped_and_a_long_argument_cut():
    out = text_record("invalid wcp frame: %s", FORGED + "c" * 4000)
    (record,) = check_text_log(out)
    assert "\\n2026-12-07 20:00:00,000 ERROR chatd: FORGED-LINE \\x1b[2J\\r" in record
    # Escaped, the line feed, escape and carriage return take 5 characters more.
    assert record.endswith("...[%d more]" % (len(FORGED) + 5 + 4000 - MAX_ARG_CHARS))
    # Numbers keep their formats.
    assert text_record("%d lines, %.1f s", 3, 2.25).endswith(": 3 lines, 2.2 s\n")


def test_a_traceback_quoting_a_client_keeps_to_indented_lines():
    try:
        raise ValueError(FORGED)
    except ValueError as exc:
        out = text_record("connection task failed", exc=exc)
    records = check_text_log(out)
    assert len(records) == 1
    assert "  ValueError: x\\n2026-12-07 20:00:00,000 ERROR chatd: FORGED-LINE" in out


# --- the limiter (sans-IO, clock passed in) ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_connection_gets_its_burst_then_its_rate():
    clock = Clock()
    lines = ClientLines(per_connection=0.1, burst=16, clock=clock)
    source = ClientSource(None, "127.0.0.1")
    assert sum(lines.allow(source) for _ in range(1000)) == 16
    clock.now += 100  # ten more lines' worth
    assert sum(lines.allow(source) for _ in range(1000)) == 10
    # Another connection is not held back by this one.
    assert lines.allow(ClientSource(None, "127.0.0.1"))
    summary = lines.summary()
    assert summary.startswith("left out 1974 log lines caused by clients")
    assert summary.endswith(": 127.0.0.1 1974")
    assert lines.summary() is None  # reported once


def test_one_address_is_bounded_whatever_its_connections():
    clock = Clock()
    lines = ClientLines(per_connection=1, burst=16, per_address=1, address_burst=64, clock=clock)
    passed = sum(lines.allow(ClientSource("203.0.113.9")) for _ in range(1000))
    assert passed == 64
    # The next address has its own; an IPv6 client counts by its /64.
    assert lines.allow(ClientSource("203.0.113.10"))
    v6 = sum(lines.allow(ClientSource(f"2001:db8:1:2::{n:x}")) for n in range(1000))
    assert v6 == 64
    assert address_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    summary = lines.summary()
    assert "203.0.113.9 936" in summary


def test_all_clients_together_are_bounded():
    clock = Clock()
    lines = ClientLines(per_connection=1, burst=16, per_address=1, address_burst=64,
                        total=100, total_burst=1000, clock=clock)
    passed = sum(lines.allow(ClientSource(f"198.51.{n // 256}.{n % 256}")) for n in range(5000))
    assert passed == 1000
    summary = lines.summary()
    assert summary.startswith("left out 4000 log lines") and "and 3995 more" in summary


def test_lines_outside_any_client_always_pass():
    lines = ClientLines(per_connection=0, burst=0, total=0, total_burst=0)
    record = logging.LogRecord("chatd.store", logging.WARNING, __file__, 1, "store busy", (), None)
    assert lines.filter(record)
    token = client_source.set(ClientSource("192.0.2.1"))
    try:
        assert not lines.filter(record)  # the same line, logged while serving a client
    finally:
        client_source.reset(token)
    record.peer = "[2001:db8::1]:4000"  # a router line naming its client
    assert not lines.filter(record)


# --- a real server ----------------------------------------------------------------


@contextmanager
def safe_log(level=logging.INFO):
    """chatd's text formatter on the root logger (what ``configure``
    installs), with limits too high to leave anything out."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeTextFormatter())
    handler.addFilter(ClientLines(per_connection=1e9, burst=1e9, per_address=1e9,
                                  address_burst=1e9, total=1e9, total_burst=1e9))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _json(value) -> str:
    return json.dumps(value)


async def _attack(text: str) -> None:
    config = default_config()
    config.secret_key, config.jwt_secret = SECRET, JWT_SECRET
    config.host, config.store = "127.0.0.1:0", ":memory:"
    config.require_origin = False
    config.allowed_origins = ["https://chat.example"]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).run)
        port = server.port
        with trio.fail_after(GUARD):
            wcp = await RawClient.connect(port, "/wcp")
            await wcp.send_text(_json({"type": text, "data": "x"}))
            await wcp.next_message()
            await wcp.send_text(_json({"type": "user_joined", "user_id": text or "-"}))
            await wcp.next_message()
            raw = text.encode("utf-8", "surrogatepass")
            await wcp.send_bytes(frame_text(raw))  # invalid UTF-8 too: closed 1007
            await wcp.next_message()
            social = await RawClient.connect(port, "/socialvp")
            await social.next_message()  # init
            await social.send_text(_json({"command": "identify", "name": "fuzz"}))
            await social.next_message()
            await social.send_text(_json({"command": text}))
            await social.send_text(_json({"command": "message", "to": text or "-",
                                          "message": text}))
            await social.next_message()
            wschat = await RawClient.connect(port, "/wschat")
            await wschat.send_text(_json({"usr": text, "msg": text}))
            await wschat.send_bytes(frame_text(raw))
            multichat = await RawClient.connect(port, "/multichat")
            await multichat.send_text(_json({"action": "register", "client-name": text,
                                             "secret-key": "wrong"}))
            await multichat.until_close()
            for request in (b"GET /" + raw + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                            b"GET /wcp HTTP/1.1\r\nHost: " + raw + b"\r\n\r\n",
                            b"GET /wcp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: "
                            + text.encode("latin-1", "replace") + b"\r\nUser-Agent: "
                            + raw + b"\r\n\r\n",
                            raw + b"\r\n\r\n"):
                stream = await open_stream(port)
                await stream.send_all(request)
                while await stream.receive_some(4096):
                    pass
                await stream.aclose()
            for client in (wcp, social, wschat, multichat):
                await client.aclose()
        server.shutdown()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_text)
@example("alice")  # a valid name on every protocol
@example("")
@example("user_joined")
@example("identify")
@example("message")
def test_no_client_input_forges_a_line_through_a_real_server(text):
    with safe_log() as out:
        trio.run(_attack, text)
    records = check_text_log(out.getvalue())
    assert all(RECORD.match(r).group(1) in ("INFO", "WARNING") for r in records), records
    assert not any(r.startswith("  Traceback") for r in out.getvalue().split("\n"))


def test_the_reported_forged_frame_is_one_escaped_line(tmp_path):
    with safe_log() as out:
        trio.run(_attack, FORGED)
    records = check_text_log(out.getvalue())
    assert not any("FORGED" in r and r.startswith("2026-12-07 20:00:00") for r in records)
    assert any("invalid wcp frame" in r and "\\n2026-12-07 20:00:00,000 ERROR chatd: FORGED-LINE"
               in r for r in records)


# --- log bytes per client, in a real process ----------------------------------------


def _serve(tmp_path, **extra) -> ServerProcess:
    port = free_port()
    config = {"host": f"127.0.0.1:{port}", "secret-key": SECRET, "jwt-secret": JWT_SECRET,
              "store": ":memory:", "web-client": None,
              "endpoints": [{"path": "/socialvp", "protocol": "socialvp"}], **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ServerProcess(["serve", "--config", "config.json"], tmp_path).start()


async def outcome(client: RawClient) -> dict:
    """The next ``outcome``, skipping ``quit``s (other flooders leaving)."""
    while (answer := json.loads(await client.next_message()))["type"] != "outcome":
        assert answer["type"] == "quit", answer
    return answer


async def _flood(port: int, connections: int, frames: int) -> None:
    """Each connection identifies, sends ``frames`` unknown 4,000-byte
    commands, then a message to nobody whose answer proves all were handled."""
    async def one(n: int) -> None:
        client = await RawClient.connect(port, "/socialvp")
        await client.next_message()
        await client.send_text(_json({"command": "identify", "name": f"flood{n}"}))
        assert (await outcome(client))["success"]
        for _ in range(frames):
            await client.send_text(_json({"command": "c" * 4000}))
        await client.send_text(_json({"command": "message", "to": "nobody", "message": "m"}))
        assert (await outcome(client))["code"] == 404  # no such user
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(one, n)


def _flood_lines(server: ServerProcess, offset: int) -> list[str]:
    text = server.log.read_text()[offset:]
    return [line for line in text.splitlines() if "unknown socialvp command" in line]


def test_one_connection_cannot_fill_the_disk_with_bad_frames(tmp_path):
    server = _serve(tmp_path)
    try:
        offset = len(server.output())
        started = time.monotonic()
        trio.run(_flood, server.port, 1, 400)
        elapsed = time.monotonic() - started
        lines = _flood_lines(server, offset)
        # 400 bad frames: the connection's burst, and its rate meanwhile.
        assert 1 <= len(lines) <= 16 + 0.1 * elapsed + 1, len(lines)
        assert all(len(line) < 400 for line in lines)
        assert "...[" in lines[0]  # the command, cut
    finally:
        server.stop()


def test_one_address_cannot_either_however_many_connections(tmp_path):
    server = _serve(tmp_path, **{"limits-exempt": []})
    try:
        offset = len(server.output())
        started = time.monotonic()
        trio.run(_flood, server.port, 12, 30)  # 360 bad frames from 127.0.0.1
        elapsed = time.monotonic() - started
        text = server.log.read_text()[offset:]
        # Every line this address caused, "connected" and the rest included.
        assert len(text.splitlines()) <= 64 + 1.0 * elapsed + 1, len(text.splitlines())
        assert 1 <= len(_flood_lines(server, offset))
    finally:
        server.stop()


def test_configure_installs_both_guards():
    out = io.StringIO()
    configure("info", "text", stream=out)
    try:
        token = client_source.set(ClientSource("192.0.2.7"))
        try:
            for _ in range(100):
                logging.getLogger("chatd.wcp").info("invalid wcp frame: %s", FORGED)
        finally:
            client_source.reset(token)
    finally:
        logging.getLogger().handlers.clear()
    records = check_text_log(out.getvalue())
    assert len(records) == 16


async def test_what_is_left_out_is_summarised_once_a_minute(nursery, autojump_clock, caplog):
    from chatd.logs import SUMMARY_INTERVAL, client_lines, report_suppressed
    caplog.set_level(logging.INFO, "chatd.logs")
    client_lines.summary()  # start from nothing left out
    source = ClientSource("192.0.2.99")
    passed = sum(client_lines.allow(source) for _ in range(100))
    nursery.start_soon(report_suppressed)
    await trio.sleep(SUMMARY_INTERVAL * 1.5)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "chatd.logs"]
    assert line.startswith(f"left out {100 - passed} log lines caused by clients")
    assert line.endswith(f": 192.0.2.99 {100 - passed}")
    await trio.sleep(SUMMARY_INTERVAL * 2)  # nothing more left out: nothing more said
    assert len([r for r in caplog.records if r.name == "chatd.logs"]) == 1


async def _speak_as(port: int, name: str, frames: int) -> None:
    """A wschat client sends ``frames`` messages as ``name`` (each dropped
    and logged), then one as itself, whose echo proves all were handled."""
    from tests.lobby_peers import signed

    holder = await RawClient.connect(port, "/wschat")
    await holder.send_text(_json(signed("holder", "here")))
    await holder.next_message()  # its echo: "holder" is held
    client = await RawClient.connect(port, "/wschat")
    for _ in range(frames):
        await client.send_text(_json(signed(name, "x" * 1000)))
    await client.send_text(_json(signed("speaker", "done")))
    while json.loads(await client.next_message())["usr"] != "speaker":
        pass
    await client.aclose()
    await holder.aclose()


@pytest.mark.parametrize("name, says", [("chatd", "notice sender"),
                                        ("Holder", "held by another connection")])
def test_one_connection_speaking_as_a_name_it_cannot_have_is_bounded(tmp_path, name, says):
    """The router logs a refused wschat ``usr`` on the client's behalf: the
    line named no client, so no bucket bounded it (issue 22's reserved
    notice sender made one such line per message, at the message rate)."""
    server = _serve(tmp_path, endpoints=[{"path": "/wschat", "protocol": "wschat"}])
    try:
        offset = len(server.output())
        started = time.monotonic()
        trio.run(_speak_as, server.port, name, 400)
        elapsed = time.monotonic() - started
        lines = [line for line in server.log.read_text()[offset:].splitlines() if says in line]
        assert 1 <= len(lines) <= 16 + 0.1 * elapsed + 1, len(lines)
    finally:
        server.stop()
