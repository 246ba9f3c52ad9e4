"""Writing pre-built WebSocket frames to a trio-websocket connection.

Two levers make fan-out cheap (see docs/performance.md):

trio-websocket frames every ``send_message`` through wsproto, once per
recipient. A server's frames are unmasked and carry no extension (chatd
negotiates none), so one event's frame is the same bytes for every
recipient of one protocol: build it once (``text_frame``) and write it
straight to each connection's stream under the connection's own send lock,
so frames never interleave with the library's pongs and close frames.

``DirectStream`` then lets most of those writes happen synchronously, as
an asyncio transport does: when nothing is queued for the connection and
the kernel's socket buffer has room, the frame is written right away with
no task switch; only what the kernel cannot take now waits for the
connection's writer task, and every later write (the writer's, or the
library's pongs and close frames) sends that remainder first.

This touches trio-websocket's private ``_stream``, ``_stream_lock`` and
``_wsproto``; pyproject pins the minor version and the test suite covers
pings and closes around these writes.
"""

from __future__ import annotations

import enum
import os
import struct

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.events import CloseConnection
from wsproto.connection import ConnectionState

_OPCODE_TEXT_FIN = 0x81


async def _pong_unless_closing(self: WebSocketConnection, event) -> None:
    # trio-websocket 0.12 answers every ping, even after its close frame went
    # out; wsproto then raises LocalProtocolError, which escapes the reader
    # task and takes the server down (trio-websocket issue #184). A ping
    # that arrives while closing needs no answer.
    if self._wsproto.state is ConnectionState.OPEN:
        await self._send(event.response())


WebSocketConnection._handle_ping_event = _pong_unless_closing

_library_close_handler = WebSocketConnection._handle_close_connection_event


async def _close_with_the_violation_code(self: WebSocketConnection, event) -> None:
    # wsproto reports a violation it finds in the client's frames (bad
    # UTF-8: 1007, bad framing: 1002) as a CloseConnection event while the
    # connection is still OPEN, as if the peer had closed. trio-websocket
    # then drops the TCP connection without a close frame, and the client
    # sees 1006 instead of the code that tells it what it did wrong.
    if self._wsproto.state is ConnectionState.OPEN:
        self._close_reason = CloseReason(event.code, event.reason or None)
        try:
            await self._send(CloseConnection(code=event.code, reason=event.reason))
        except ConnectionClosed:
            pass
    await _library_close_handler(self, event)


WebSocketConnection._handle_close_connection_event = _close_with_the_violation_code


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (UTF-8)."""
    n = len(payload)
    if n < 126:
        header = bytes((_OPCODE_TEXT_FIN, n))
    elif n < 0x10000:
        header = struct.pack("!BBH", _OPCODE_TEXT_FIN, 126, n)
    else:
        header = struct.pack("!BBQ", _OPCODE_TEXT_FIN, 127, n)
    return header + payload


class _HandshakeDone:
    """Stands in for wsproto's finished H11Handshake (see below)."""

    __slots__ = ()

    def events(self) -> tuple[()]:
        return ()


_HANDSHAKE_DONE = _HandshakeDone()


def release_handshake_state(ws: WebSocketConnection) -> None:
    """Drop the HTTP handshake's parser once the connection is open.

    wsproto keeps its H11Handshake (and the h11 connection inside it) for
    the connection's whole life, though after the upgrade it only ever
    yields no events: about 4 KB per idle connection.
    """
    wsproto = ws._wsproto
    if wsproto.connection is not None and not getattr(wsproto.handshake, "_events", True):
        wsproto.handshake = _HANDSHAKE_DONE


class Wrote(enum.Enum):
    ALL = 1      # the kernel took the whole frame
    PARTIAL = 2  # the rest is pending: the writer task must flush it
    QUEUE = 3    # nothing written: queue the frame for the writer task
    BROKEN = 4   # the socket is dead


class DirectStream(trio.abc.Stream):
    """A SocketStream that can also write synchronously (``try_write``)."""

    __slots__ = ("transport_stream", "socket", "_fd", "_pending", "_sending")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.transport_stream = stream
        self.socket = stream.socket
        self._fd = stream.socket.fileno()
        self._pending = b""     # the unwritten rest of a synchronous write
        self._sending = False   # an async send_all is under way

    def try_write(self, data: bytes) -> Wrote:
        if self._sending or self._pending:
            return Wrote.QUEUE
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            return Wrote.QUEUE
        except OSError:
            return Wrote.BROKEN
        if n == len(data):
            return Wrote.ALL
        self._pending = data[n:]
        return Wrote.PARTIAL

    async def send_all(self, data: bytes) -> None:
        self._sending = True
        try:
            if self._pending:
                data, self._pending = self._pending + data, b""
            if data:
                await self.transport_stream.send_all(data)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    @property
    def receive_some(self):  # type: ignore[override]
        # The socket's own method: no wrapper coroutine stays suspended in
        # every idle connection's reader.
        return self.transport_stream.receive_some

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class FrameWriter:
    """Sends ready-made frame bytes on one server-side connection."""

    __slots__ = ("_ws", "_wsproto", "_direct")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._wsproto = ws._wsproto
        stream = ws._stream
        self._direct = stream if isinstance(stream, DirectStream) else None

    def try_write(self, data: bytes) -> Wrote:
        """Write without waiting, if nothing else is being written."""
        if self._direct is None or self._wsproto.state is not ConnectionState.OPEN:
            return Wrote.QUEUE
        return self._direct.try_write(data)

    async def write(self, data: bytes) -> None:
        """Write frames; raises ConnectionClosed once the socket is gone."""
        ws = self._ws
        async with ws._stream_lock:
            # Checked under the lock: a close frame may have gone out while
            # this task waited, and nothing may follow a close frame.
            if ws._wsproto.state is not ConnectionState.OPEN:
                raise ConnectionClosed(ws.closed)
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(ws.closed) from None
            except trio.Cancelled:
                # Cut off, perhaps mid-frame (a client that stopped reading
                # ran out of time): nothing may follow these bytes, not even
                # a close frame, so the stream is closed now.
                await trio.aclose_forcefully(ws._stream)
                raise
