"""Fuzzing the frame reader (chatd/connection.py) against a real server.

Hypothesis draws a sequence of frames, polite and not (whole and
fragmented messages with pings between the fragments, pongs, binary
frames, bad UTF-8, oversized messages, reserved opcodes, unmasked frames,
orphan continuations, long pings, close frames with valid and invalid
codes), cuts the bytes into pieces at random places and writes them one
by one, so frames and headers straddle reads. A small model says what must
happen, in order, up to the first frame that ends the connection:

- every complete message reaches a listener whole, and nothing after the
  fatal frame is relayed;
- every ping is answered with a pong carrying its payload, in order;
- a binary message (the client is a registered multichat bridge) is
  skipped, fragments and all, as the original Go server does;
- the connection ends with the documented close code (1002 framing,
  1007 UTF-8, 1009 size) or the peer's close echoed;
- the server logs no error and still serves.

With random bytes (``garbage``) among the frames, what follows is not
predictable: then only the close code's kind, the order of the pongs and
the last two rules are checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import CloseConnection, Pong

from chatd.config import default_config
from chatd.server import Server
from tests.abuse import no_rate_limits
from tests.conftest import GUARD, SECRET
from tests.rawws import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, RawClient, frame
from tests.test_stateful_fuzz import ErrorLog

LIMIT = 512
#: Close codes a client may send (RFC 6455 section 7.4), and some it may not.
SENDABLE = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999]
UNSENDABLE = [0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535]


def register(name: str) -> bytes:
    return json.dumps({"action": "register", "client-name": name,
                       "secret-key": SECRET}).encode()


def chat(content: str) -> bytes:
    return json.dumps({"action": "client-message", "content": content},
                      ensure_ascii=False).encode()


contents = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60)
payloads = st.binary(max_size=125)


@st.composite
def message(draw) -> tuple:
    """A chat message, whole or in fragments cut anywhere (mid-character
    too), with pings between some of them."""
    content = draw(contents)
    data = chat(content)
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    out = b""
    pings = []
    for i, piece in enumerate(pieces):
        out += frame(TEXT if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1)
        if i < len(pieces) - 1 and draw(st.booleans()):
            ping = draw(payloads)
            out += frame(PING, ping)
            pings.append(ping)
    return ("message", out, content, pings)


elements = st.one_of(
    message(),
    payloads.map(lambda p: ("ping", frame(PING, p), p)),
    payloads.map(lambda p: ("pong", frame(PONG, p))),
    # A registered bridge's binary message is skipped, fragments and all, as
    # the original Go server does; over the limit it still closes 1009.
    st.lists(st.binary(max_size=20), min_size=1, max_size=3).map(lambda ps: ("binary", b"".join(
        frame(BINARY if i == 0 else CONTINUATION, p, fin=i == len(ps) - 1)
        for i, p in enumerate(ps)))),
    st.integers(LIMIT + 1, LIMIT + 40).map(lambda n: ("fatal", frame(BINARY, b"\0" * n), 1009)),
    st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"ok\xc3"]).map(
        lambda p: ("fatal", frame(TEXT, p), 1007)),
    st.integers(LIMIT + 1, LIMIT + 40).map(lambda n: ("fatal", frame(TEXT, b"x" * n), 1009)),
    st.sampled_from([0x3, 0x7, 0xB, 0xF]).map(lambda op: ("fatal", frame(op, b"?"), 1002)),
    st.just(("fatal", bytes((0x81, 2)) + b"{}", 1002)),               # unmasked
    st.just(("fatal", frame(CONTINUATION, b"{}"), 1002)),             # orphan continuation
    st.just(("fatal", frame(PING, b"p" * 126), 1002)),                # long ping
    st.just(("fatal", frame(PING, b"p", fin=False), 1002)),           # fragmented ping
    st.tuples(st.sampled_from(SENDABLE), st.text(max_size=20)).map(
        lambda c: ("close", frame(CLOSE, struct.pack("!H", c[0]) + c[1].encode()), c)),
    st.just(("close", frame(CLOSE, b""), (1005, ""))),
    st.sampled_from(UNSENDABLE).map(
        lambda c: ("fatal", frame(CLOSE, struct.pack("!H", c)), 1002)),
    st.binary(min_size=1, max_size=30).map(lambda b: ("garbage", b)),
)


def expectations(sequence: list[tuple]) -> tuple[list[str], list[bytes], tuple | None, bool]:
    """(contents relayed, pong payloads, (close code, reason) or None,
    whether the model is exact) for ``sequence``."""
    relayed: list[str] = []
    pongs: list[bytes] = []
    for element in sequence:
        kind = element[0]
        if kind == "garbage":
            return relayed, pongs, None, False
        if kind == "message":
            pongs += element[3]
            relayed.append(element[2])
        elif kind == "ping":
            pongs.append(element[2])
        elif kind == "fatal":
            return relayed, pongs, (element[2], None), True
        elif kind == "close":
            return relayed, pongs, element[2], True
    return relayed, pongs, None, True


def ending(sequence: list[tuple]) -> int:
    """Where the frame that ends the connection ends in the bytes sent (the
    end of them all if none does, or garbage makes it unknown)."""
    offset = 0
    for element in sequence:
        offset += len(element[1])
        if element[0] in ("fatal", "close"):
            return offset
    return offset


async def run_frames(sequence: list[tuple], cuts: list[int]) -> None:
    config = default_config()
    config.secret_key = SECRET
    config.host, config.store = "127.0.0.1:0", ":memory:"
    config.max_frame_bytes = LIMIT
    config.ping_interval = 0
    for key, value in no_rate_limits().items():
        setattr(config, key, value)
    errors = ErrorLog()
    logger = logging.getLogger("chatd")
    logger.addHandler(errors)
    relayed, pongs, close, exact = expectations(sequence)
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Server(config).run)
            with trio.fail_after(GUARD):
                listener = await RawClient.connect(server.port, "/multichat")
                await listener.send_text(register("listener").decode())
                await listener.next_message()  # register-ack
                raw = await RawClient.connect(server.port, "/multichat")
                await raw.send_text(register("fuzzer").decode())
                await raw.next_message()
                data = b"".join(element[1] for element in sequence)
                # Cut anywhere up to the end of the frame that ends the
                # connection; what follows it goes in the same write, so the
                # server has read everything when it closes (bytes arriving
                # after that would be answered with a reset).
                end = ending(sequence)
                points = sorted({cut % (end + 1) for cut in cuts} - {0, end})
                for a, b in zip([0, *points], [*points, len(data)]):
                    try:
                        await raw.send_bytes(data[a:b])
                    except trio.BrokenResourceError:
                        assert not exact, "the server hung up before the frame that ends it"
                        break
                if close is None:
                    # No frame ends it: end it politely, after a marker
                    # message proving everything before was handled.
                    with contextlib.suppress(trio.BrokenResourceError):
                        await raw.send_bytes(frame(TEXT, chat("marker"))
                                             + frame(CLOSE, b"\x03\xe8"))
                    if exact:
                        relayed.append("marker")
                    else:  # garbage may have announced a frame longer than the rest
                        with contextlib.suppress(trio.BrokenResourceError):
                            await raw.stream.send_eof()
                got_pongs, closed = [], None
                while (event := await raw.next_event()) is not None:
                    if isinstance(event, Pong):
                        got_pongs.append(bytes(event.payload))
                    elif isinstance(event, CloseConnection):
                        closed = event
                        break
                    else:
                        raise AssertionError(f"unexpected {event!r}")
                if exact:
                    assert closed is not None, "the server ended the stream without a close"
                    assert got_pongs == pongs
                    code, reason = close or (1000, "")
                    assert closed.code == code
                    if reason is not None:
                        assert closed.reason == reason
                elif closed is not None:
                    assert closed.code in (1002, 1003, 1005, 1007, 1009, *SENDABLE)
                # What was relayed, then (nothing after the fatal frame) a
                # newcomer's message.
                other = await RawClient.connect(server.port, "/multichat")
                await other.send_text(register("other").decode())
                await other.next_message()
                await other.send_text(chat("after").decode())
                heard = []
                while True:
                    text = await listener.next_message()
                    content = json.loads(text)["content"]
                    if content == "after":
                        break
                    heard.append(content)
                if exact:
                    assert heard == relayed
                for client in (listener, raw, other):
                    await client.aclose()
            server.shutdown()
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(elements, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_any_frames_in_any_pieces_follow_the_model(sequence, cuts):
    trio.run(run_frames, sequence, cuts)
