"""Writing pre-built WebSocket frames to a trio-websocket connection.

trio-websocket frames every ``send_message`` through wsproto, once per
recipient. A server's frames are unmasked and carry no extension (chatd
negotiates none), so one event's frame is the same bytes for every
recipient of one protocol: build it once (``text_frame``) and write it
straight to each connection's stream under the connection's own send lock,
so frames never interleave with the library's pongs and close frames.

This touches trio-websocket's private ``_stream``, ``_stream_lock`` and
``_wsproto``; pyproject pins the minor version and the test suite covers
pings and closes around these writes.
"""

from __future__ import annotations

import struct

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
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


class FrameWriter:
    """Sends ready-made frame bytes on one server-side connection."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    @property
    def open(self) -> bool:
        return self._ws._wsproto.state is ConnectionState.OPEN

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
