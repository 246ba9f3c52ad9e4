"""Frames a polite client never sends: oversized, fragmented past the limit,
UTF-8 broken across fragments, lying length headers.

The limit is ``max-frame-bytes`` in UTF-8 bytes for a whole message,
however it is fragmented (close 1009); bad UTF-8 closes 1007 even when the
break falls between fragments. Fragmenting alone is never an error.
"""

from __future__ import annotations

import json
import struct

import pytest

from tests.abuse import no_tracebacks, still_serving  # noqa: F401 (fixture)
from tests.rawws import BINARY, CLOSE, CONTINUATION, PING, TEXT, RawClient, frame, text
from tests.test_faults import chat_message, raw_multichat

LIMIT = 256
PATHS = ["/multichat", "/socialvp", "/wschat", "/wcp", "/gradagenda"]

def sized_message(size: int, char: str = "x") -> bytes:
    """A multichat client-message of exactly ``size`` UTF-8 bytes, mostly ``char``."""
    room = size - len(chat_message("").encode())
    count, rest = divmod(room, len(char.encode()))
    message = chat_message(char * count + "x" * rest).encode()
    assert len(message) == size
    return message


def fragments(data: bytes, size: int) -> bytes:
    """``data`` as a text message cut into frames of ``size`` bytes."""
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    out = [frame(TEXT if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1)
           for i, piece in enumerate(pieces)]
    return b"".join(out)


async def close_code(raw: RawClient) -> int | None:
    close = await raw.until_close()
    return None if close is None else close.code


# --- size ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_one_frame_over_the_limit_closes_1009_on_every_endpoint(chat, path):
    server = await chat.start(max_frame_bytes=LIMIT)
    raw = await RawClient.connect(server.port, path)
    await raw.send_bytes(text("x" * (LIMIT + 1)))
    assert await close_code(raw) == 1009
    await still_serving(chat)


async def test_a_length_header_announcing_a_terabyte_is_refused_without_waiting(chat):
    server = await chat.start(max_frame_bytes=LIMIT)
    raw = await raw_multichat(server.port, "liar")
    # A header for 2**40 bytes, then just enough payload to pass the limit:
    # the server must not wait for (or buffer) the rest.
    mask = b"\x00\x00\x00\x00"
    await raw.send_bytes(struct.pack("!BBQ", 0x81, 0x80 | 127, 2**40) + mask + b"x" * (LIMIT + 1))
    assert await close_code(raw) == 1009
    await still_serving(chat)


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte"])
async def test_fragments_adding_up_past_the_limit_close_1009(chat, char):
    server = await chat.start(max_frame_bytes=LIMIT)
    raw = await raw_multichat(server.port, "piecemeal")
    # Every fragment is small; the message is one byte over. With two-byte
    # characters it is under the limit in characters, over it in bytes.
    message = sized_message(LIMIT + (1 if char == "x" else 2), char)
    await raw.send_bytes(fragments(message, 32))
    assert await close_code(raw) == 1009
    await still_serving(chat)


async def test_unfinished_fragments_past_the_limit_close_1009_before_the_end(chat):
    server = await chat.start(max_frame_bytes=LIMIT)
    raw = await raw_multichat(server.port, "endless")
    await raw.send_bytes(text(b"x" * 64, fin=False)
                         + b"".join(frame(CONTINUATION, b"x" * 64, fin=False) for _ in range(4)))
    assert await close_code(raw) == 1009
    await still_serving(chat)


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte"])
async def test_fragments_adding_up_to_exactly_the_limit_are_delivered(chat, char):
    server = await chat.start(max_frame_bytes=LIMIT)
    sender = await raw_multichat(server.port, "sender")
    receiver = await chat.multichat("receiver")
    message = sized_message(LIMIT, char)
    await sender.send_bytes(fragments(message, 32))
    assert (await receiver.recv())["content"] == json.loads(message)["content"]


@pytest.mark.parametrize("path", [p for p in PATHS if p != "/multichat"])
async def test_a_fragmented_binary_message_closes_1003(chat, path):
    server = await chat.start()
    raw = await RawClient.connect(server.port, path)
    await raw.send_bytes(frame(BINARY, b"\x00\x01", fin=False) + frame(CONTINUATION, b"\x02"))
    assert await close_code(raw) == 1003
    await still_serving(chat)


async def test_a_registered_bridge_s_fragmented_binary_message_is_skipped_whole(chat):
    # As the original Go server: ignored, and the text message after it,
    # whose fragments follow the binary ones, is delivered whole.
    server = await chat.start()
    sender = await raw_multichat(server.port, "sender")
    receiver = await chat.multichat("receiver")
    await sender.send_bytes(frame(BINARY, b'{"action": ', fin=False)
                            + frame(PING, b"between") + frame(CONTINUATION, b"\xff\x00")
                            + fragments(chat_message("after the binary").encode(), 7))
    assert (await receiver.recv())["content"] == "after the binary"


async def test_a_bridge_s_binary_message_over_the_limit_closes_1009(chat):
    server = await chat.start(max_frame_bytes=LIMIT)
    sender = await raw_multichat(server.port, "sender")
    await sender.send_bytes(frame(BINARY, b"\0" * 200, fin=False)
                            + frame(CONTINUATION, b"\0" * (LIMIT - 199)))
    assert await close_code(sender) == 1009
    await still_serving(chat)


# --- UTF-8 ----------------------------------------------------------------------------

CAFE = chat_message("café").encode()  # "é" is b"\xc3\xa9"
SPLIT = CAFE.index(b"\xa9")


@pytest.mark.parametrize("fragmented", [
    text(CAFE[:SPLIT], fin=False) + frame(CONTINUATION, b"(" + CAFE[SPLIT + 1:]),
    text(CAFE[:SPLIT]),
    text(CAFE.replace(b"\xc3\xa9", b"\xed\xa0\x80")),  # a UTF-16 surrogate
], ids=["bad-continuation-in-next-fragment", "ends-mid-codepoint", "surrogate"])
async def test_broken_utf8_closes_1007_even_when_the_break_is_between_fragments(chat, fragmented):
    server = await chat.start()
    raw = await raw_multichat(server.port, "mangler")
    await raw.send_bytes(fragmented)
    code = await close_code(raw)
    await still_serving(chat)
    assert code == 1007


async def test_characters_split_across_fragments_are_delivered_whole(chat):
    server = await chat.start()
    sender = await raw_multichat(server.port, "sender")
    receiver = await chat.multichat("receiver")
    await sender.send_bytes(text(CAFE[:SPLIT], fin=False) + frame(CONTINUATION, CAFE[SPLIT:]))
    assert (await receiver.recv())["content"] == "café"
    # A four-byte character, one byte per fragment.
    emoji = chat_message("🙂").encode()
    start = emoji.index("🙂".encode())
    pieces = [emoji[:start + 1], *(emoji[i:i + 1] for i in range(start + 1, start + 4)),
              emoji[start + 4:]]
    await sender.send_bytes(b"".join(
        frame(TEXT if i == 0 else CONTINUATION, p, fin=i == len(pieces) - 1)
        for i, p in enumerate(pieces)))
    assert (await receiver.recv())["content"] == "🙂"


# --- framing ----------------------------------------------------------------------------


def unmasked(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


@pytest.mark.parametrize("violation", [
    unmasked(TEXT, chat_message("hi").encode()),
    bytes((0x80 | 0x40 | TEXT,)) + frame(TEXT, b"{}")[1:],  # RSV1 without an extension
    frame(0x3, b"?"),                                          # a reserved opcode
    frame(PING, b"p" * 126),                                   # control frame over 125 bytes
    frame(PING, b"p", fin=False),                              # fragmented control frame
    frame(CONTINUATION, b"{}"),                                # continuation of nothing
    text(b"{", fin=False) + text(b"}"),                        # new message mid-message
    frame(CLOSE, struct.pack("!H", 999)),                      # a close code no one may send
], ids=["unmasked", "rsv1", "reserved-opcode", "long-ping", "fragmented-ping",
        "orphan-continuation", "interleaved-messages", "close-code-999"])
async def test_a_framing_violation_closes_1002(chat, violation):
    server = await chat.start()
    raw = await raw_multichat(server.port, "rulebreaker")
    await raw.send_bytes(violation)
    code = await close_code(raw)
    await still_serving(chat)
    assert code == 1002


# --- closing ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, echoed", [
    (struct.pack("!H", 1000) + "bye".encode(), (1000, "bye")),
    (struct.pack("!H", 4321) + "adiós".encode(), (4321, "adiós")),
    (b"", (1005, "")),
], ids=["1000", "private-code", "no-code"])
async def test_a_close_in_the_middle_of_a_fragmented_message_is_echoed(chat, payload, echoed):
    # RFC 6455 section 5.4: control frames may come between fragments; the
    # close ends the connection, the half message is dropped, not relayed.
    server = await chat.start()
    sender = await raw_multichat(server.port, "leaver")
    receiver = await chat.multichat("receiver")
    await sender.send_bytes(text(chat_message("half")[:12].encode(), fin=False)
                            + frame(CLOSE, payload))
    close = await sender.until_close()
    assert (close.code, close.reason) == echoed
    await still_serving(chat)
    assert (await receiver.recv())["content"].startswith("still here")


async def test_a_close_reason_that_is_not_utf8_closes_1007(chat):
    server = await chat.start()
    raw = await raw_multichat(server.port, "garbler")
    await raw.send_bytes(frame(CLOSE, struct.pack("!H", 1000) + b"\xff"))
    assert await close_code(raw) == 1007
    await still_serving(chat)
