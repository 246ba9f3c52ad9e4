"""One connection's bytes: reads, and writes that never make the writer wait.

A server's WebSocket frames are unmasked and chatd negotiates no
extension, so one event's frame is the same bytes for every recipient of
one protocol: ``text_frame`` builds it once (RFC 6455 section 5.2).

Writes never block their caller, as an asyncio transport's do: ``write``
hands the kernel what it takes at once and keeps the rest in a backlog
that a writer task (started only then, in the server's nursery) sends as
the socket drains. Every byte for a connection goes through ``write`` in
order — data frames, pongs, pings and the close frame alike — so frames
never interleave and nothing follows a close frame.

Over TLS every write goes to the writer task (an ``SSLStream`` cannot
write synchronously).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Callable

import trio

_OPCODE_TEXT_FIN = 0x81
#: Bytes asked of the kernel per read.
RECEIVE_SIZE = 16 * 1024
#: Most bytes joined into one write by the writer task.
_WRITE_CHUNK = 256 * 1024


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


Spawn = Callable[..., None]


class Transport:
    """Reads and non-blocking writes on one stream.

    ``write(data, frames)`` returns False once the stream is broken.
    ``waiting_frames`` and ``waiting_bytes`` count what the kernel has not
    taken yet (the slow-consumer measure); an answer the client asked for,
    written with ``counted=False``, waits in the same order but is not
    counted (``chatd.outbox``: answers are paced, not bounded).
    ``drain()`` waits until everything written has gone to the kernel.
    ``close()`` ends the stream, abandoning what waits.
    """

    __slots__ = ("_stream", "_fd", "_backlog", "waiting_frames", "waiting_bytes", "broken", "_spawn",
                 "_writer", "_drained")

    def __init__(self, stream: trio.abc.Stream, spawn: Spawn) -> None:
        self._stream = stream
        # Plain TCP: write synchronously when the kernel can take the bytes.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        #: (bytes, frames, counted) not yet written, oldest first; None when empty.
        self._backlog: deque[tuple[memoryview | bytes, int, bool]] | None = None
        self.waiting_frames = 0
        #: Bytes not yet taken by the kernel (the slow-consumer byte bound).
        self.waiting_bytes = 0
        self.broken = False
        self._spawn = spawn
        self._writer: trio.CancelScope | None = None
        self._drained: trio.Event | None = None

    # --- reading -----------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next bytes from the peer; b"" once it has closed or the stream broke."""
        fd = self._fd
        if fd < 0:
            try:
                return await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True
                return b""
        # Plain TCP: the read trio's socket does, without its two coroutine
        # frames suspended in every idle connection.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                data = None  # wait outside the handler: it would keep the exception alive
            except OSError:
                self.broken = True
                return b""
            if data is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                self.broken = True
                return b""

    # --- writing -----------------------------------------------------------------

    def write(self, data: bytes, frames: int = 1, counted: bool = True) -> bool:
        """Send ``data`` (``frames`` whole frames) without waiting; what the
        kernel does not take waits, counted in ``waiting_frames`` and
        ``waiting_bytes`` unless ``counted`` is False."""
        if self.broken:
            return False
        if self._backlog is not None:
            self._backlog.append((data, frames, counted))
            if counted:
                self.waiting_frames += frames
                self.waiting_bytes += len(data)
            return True
        sent = 0
        if self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                pass
            except OSError:
                self.broken = True
                return False
            if sent == len(data):
                return True
        self._backlog = deque(((memoryview(data)[sent:] if sent else data, frames, counted),))
        if counted:
            self.waiting_frames = frames
            self.waiting_bytes = len(data) - sent
        self._spawn(self._write_backlog)
        return True

    async def _write_backlog(self) -> None:
        backlog = self._backlog
        try:
            with trio.CancelScope() as self._writer:
                while backlog:
                    if self._fd >= 0:
                        await trio.lowlevel.wait_writable(self._fd)
                        data = backlog[0][0] if len(backlog) == 1 else self._join(backlog)
                        try:
                            sent = os.write(self._fd, data)
                        except BlockingIOError:
                            continue
                    else:
                        data = self._join(backlog)
                        await self._stream.send_all(data)
                        sent = len(data)
                    self._consume(backlog, sent)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
        finally:
            self._writer = None
            self._backlog = None
            self.waiting_frames = 0
            self.waiting_bytes = 0
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    @staticmethod
    def _join(backlog: deque) -> bytes:
        parts, size = [], 0
        for data, _, _ in backlog:
            parts.append(data)
            size += len(data)
            if size >= _WRITE_CHUNK:
                break
        return b"".join(parts)

    def _consume(self, backlog: deque, sent: int) -> None:
        while sent:
            data, frames, counted = backlog[0]
            if sent >= len(data):
                backlog.popleft()
                sent -= len(data)
                if counted:
                    self.waiting_bytes -= len(data)
                    self.waiting_frames -= frames
            else:
                backlog[0] = (memoryview(data)[sent:], frames, counted)
                if counted:
                    self.waiting_bytes -= sent
                return

    async def drain(self) -> None:
        """Wait until the backlog has gone to the kernel (or the stream broke)."""
        if self._backlog is None:
            await trio.lowlevel.checkpoint()
            return
        if self._drained is None:
            self._drained = trio.Event()
        await self._drained.wait()

    def shutdown_write(self) -> None:
        """Send EOF (TCP FIN) after what was written; reading goes on."""
        stream = getattr(self._stream, "transport_stream", self._stream)
        sock = getattr(stream, "socket", None)
        if sock is not None and self._backlog is None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        """Drop the stream now; a writer still waiting is cancelled."""
        self.broken = True
        if self._writer is not None:
            self._writer.cancel()
        stream = self._stream
        socket_stream = getattr(stream, "transport_stream", stream)
        sock = getattr(socket_stream, "socket", None)
        if sock is not None:
            sock.close()
