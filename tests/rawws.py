"""A bare WebSocket client on wsproto, for what a polite client never does."""

from __future__ import annotations

import os
import socket
import struct

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Event, Request, TextMessage,
)

from tests.conftest import GUARD

# Frame opcodes (RFC 6455, 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One masked client frame built by hand, so it may break every rule
    wsproto would enforce: fragments, bad UTF-8, control frames anywhere."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 0x10000:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    return header + mask + masked


def text(data: str | bytes, *, fin: bool = True) -> bytes:
    return frame(TEXT, data.encode() if isinstance(data, str) else data, fin=fin)


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason.encode())


#: Every raw stream a test opened and has not closed; ``close_leftovers``
#: (run after each test by conftest) closes them, so no socket is left to
#: the garbage collector (a ResourceWarning, which fails the suite).
_open_streams: set[trio.SocketStream] = set()


async def open_stream(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A plain TCP connection to 127.0.0.1:``port``, closed after the test
    if the test does not close it."""
    sock = trio.socket.socket()
    try:
        if rcvbuf is not None:
            # Set before connecting so the TCP window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    _open_streams.add(stream)
    return stream


def close_leftovers() -> None:
    """Close every stream from ``open_stream`` still open. Runs after the
    test's trio loop has ended, so it closes the descriptors directly."""
    while _open_streams:
        fd = _open_streams.pop().socket.detach()
        if fd >= 0:
            os.close(fd)


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        _open_streams.add(stream)

    @classmethod
    async def connect(cls, port: int, path: str, *, rcvbuf: int | None = None) -> "RawClient":
        client = cls(await open_stream(port, rcvbuf=rcvbuf))
        await client.send(Request(host="127.0.0.1", target=path))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_text(self, data: str) -> None:
        """A whole text message, bypassing wsproto (safe beside a reader task)."""
        await self.stream.send_all(text(data))

    async def next_event(self) -> Event | None:
        """The next event, or None at end of stream."""
        with trio.fail_after(GUARD):
            while not self.pending:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def next_message(self) -> str | bytes | Event | None:
        """The next whole data message (its pieces joined), control event,
        or None at end of stream."""
        parts: list = []
        while True:
            event = await self.next_event()
            if not isinstance(event, (TextMessage, BytesMessage)):
                return event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def until_close(self) -> CloseConnection | None:
        """Skip frames until the server's close frame (None: stream just ended)."""
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return event

    async def aclose(self) -> None:
        _open_streams.discard(self.stream)
        await self.stream.aclose()

    async def reset(self) -> None:
        """Vanish with a TCP RST instead of a FIN (SO_LINGER 0)."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose()
