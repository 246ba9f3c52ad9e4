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

The transport owns the accepted socket itself (no trio stream: one
object fewer per connection, and a read is one ``read(2)``). Over TLS
(``wss``) it is the same path: ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` buffers encrypts each write synchronously, and the
ciphertext takes the plain socket's ``write(2)`` and backlog; reads
decrypt what ``read(2)`` brought. The TLS handshake runs in the first
``receive`` (inside the caller's deadline); ``close`` sends TLS
``close_notify`` (RFC 8446 section 6.1) when nothing waits before it. A
peer that closes TCP without ``close_notify`` is an end of stream, as
for HTTPS (RFC 8446 section 6.1 lets an application accept that).
"""

from __future__ import annotations

import os
import socket
import ssl
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
    """Reads and non-blocking writes on one accepted socket, plain or TLS.

    ``sock`` is a connected stream socket (made non-blocking here);
    ``tls`` a server-side ``ssl.SSLContext`` to speak TLS on it, or None.
    ``write(data, frames)`` returns False once the stream is broken.
    ``waiting_frames`` and ``waiting_bytes`` count what the kernel has not
    taken yet (the slow-consumer measure; over TLS, ciphertext bytes); an
    answer the client asked for, written with ``counted=False``, waits in
    the same order but is not counted (``chatd.outbox``: answers are
    paced, not bounded). ``drain()`` waits until everything written has
    gone to the kernel. ``close()`` ends the stream, abandoning what waits.
    """

    __slots__ = ("_sock", "_fd", "_tls", "_incoming", "_outgoing", "_backlog", "waiting_frames",
                 "waiting_bytes", "broken", "_spawn", "_writer", "_drained")

    def __init__(self, sock: socket.socket, spawn: Spawn, tls: ssl.SSLContext | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._tls: ssl.SSLObject | None = None
        self._incoming = self._outgoing = None
        if tls is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: (bytes, frames, counted) not yet written, oldest first; None when empty.
        self._backlog: deque[tuple[memoryview | bytes, int, bool]] | None = None
        self.waiting_frames = 0
        #: Bytes not yet taken by the kernel (the slow-consumer byte bound).
        self.waiting_bytes = 0
        self.broken = False
        self._spawn = spawn
        self._writer: trio.CancelScope | None = None
        self._drained: trio.Event | None = None

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._fd

    @property
    def draining(self) -> bool:
        """True while bytes wait for the kernel (counted or not)."""
        return self._backlog is not None

    # --- reading -----------------------------------------------------------------

    async def receive(self, quiet: Callable[[], float | None] | None = None) -> bytes:
        """The next bytes from the peer; b"" once it has closed or the stream broke.

        ``quiet`` is called whenever nothing has arrived, before waiting:
        it returns None (wait for bytes) or seconds after which, if still
        nothing has arrived, it is called again; it may raise to stop
        waiting (the connection parks: ``chatd.parking``)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            data = self._read()
            if data is not None:
                if not waited:  # a wait was a schedule point already: one is enough
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            timeout = quiet() if quiet is not None else None
            try:
                if timeout is None:
                    await trio.lowlevel.wait_readable(self._fd)
                else:
                    with trio.move_on_after(timeout):
                        await trio.lowlevel.wait_readable(self._fd)
                waited = True
            except trio.ClosedResourceError:
                self.broken = True
                return b""

    def _read(self) -> bytes | None:
        """What can be read now: bytes, b"" at the end, None if nothing yet."""
        if self.broken:
            return b""
        if self._tls is not None:
            return self._read_tls()
        try:
            return os.read(self._fd, RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            self.broken = True
            return b""

    def _read_tls(self) -> bytes | None:
        tls = self._tls
        while True:
            try:
                data = tls.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                # TLS wants more ciphertext: first send what it has to say
                # (the handshake's messages, session tickets, a key update).
                self._send_tls_output()
                try:
                    raw = os.read(self._fd, RECEIVE_SIZE)
                except BlockingIOError:
                    return None
                except OSError:
                    self.broken = True
                    return b""
                if raw:
                    self._incoming.write(raw)
                else:
                    self._incoming.write_eof()
                continue
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return b""
            except ssl.SSLEOFError:  # TCP closed without close_notify: the end all the same
                return b""
            except ssl.SSLError:  # a failed handshake or a corrupt record
                self._send_tls_output()  # the alert, if the kernel takes it
                self.broken = True
                return b""
            if not data:
                return b""
            return data

    def _send_tls_output(self) -> None:
        data = self._outgoing.read()
        if data:
            self._send(data, 0, False)

    # --- writing -----------------------------------------------------------------

    def write(self, data: bytes, frames: int = 1, counted: bool = True) -> bool:
        """Send ``data`` (``frames`` whole frames) without waiting; what the
        kernel does not take waits, counted in ``waiting_frames`` and
        ``waiting_bytes`` unless ``counted`` is False."""
        if self._backlog is None and self._tls is None and not self.broken:
            # The common case, inline: nothing waits, plain TCP. The same
            # steps as ``_send``'s, without its call: this runs once per
            # recipient per pass (docs/performance.md, "Third round").
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.broken = True
                return False
            if sent != len(data):
                self._wait(data, sent, frames, counted)
            return True
        if self.broken:
            return False
        tls = self._tls
        if tls is not None:
            # Encrypted now, in write order; the records then take the
            # same path as plain bytes. A memory BIO takes every record.
            try:
                tls.write(data)
            except ssl.SSLError:
                self.broken = True
                return False
            data = self._outgoing.read()
        return self._send(data, frames, counted)

    def _send(self, data: bytes, frames: int, counted: bool) -> bool:
        if self._backlog is not None:
            self._backlog.append((data, frames, counted))
            if counted:
                self.waiting_frames += frames
                self.waiting_bytes += len(data)
            return True
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.broken = True
            return False
        if sent != len(data):
            self._wait(data, sent, frames, counted)
        return True

    def _wait(self, data: bytes, sent: int, frames: int, counted: bool) -> None:
        """The kernel took ``sent`` bytes of ``data``: the rest waits for
        the writer task."""
        self._backlog = deque(((memoryview(data)[sent:] if sent else data, frames, counted),))
        if counted:
            self.waiting_frames = frames
            self.waiting_bytes = len(data) - sent
        self._spawn(self._write_backlog)

    async def _write_backlog(self) -> None:
        backlog = self._backlog
        fd = self._fd
        try:
            with trio.CancelScope() as self._writer:
                while backlog and not self.broken:  # (closed before this task ran)
                    await trio.lowlevel.wait_writable(fd)
                    data = backlog[0][0] if len(backlog) == 1 else self._join(backlog)
                    try:
                        sent = os.write(fd, data)
                    except BlockingIOError:
                        continue
                    self._consume(backlog, sent)
        except (OSError, trio.ClosedResourceError):
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

    def _close_notify(self) -> bytes:
        """TLS close_notify, the bytes to send after what was written (b""
        without TLS, before its handshake ended, after a failure, or twice)."""
        tls = self._tls
        if tls is None or self.broken or tls.version() is None:
            return b""
        try:
            tls.unwrap()  # writes close_notify; the peer's is not waited for
        except ssl.SSLError:
            pass
        return self._outgoing.read()

    def shutdown_write(self) -> None:
        """Send EOF (TLS close_notify, then TCP FIN) after what was written;
        reading goes on."""
        if self._backlog is None:
            data = self._close_notify()
            if data:
                self._send(data, 0, False)
        if self._backlog is None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        """Drop the stream now (after TLS close_notify, if everything written
        has gone and the stream is sound); a writer still waiting is cancelled."""
        if self._sock.fileno() < 0:
            return
        if self._backlog is None:
            data = self._close_notify()
            if data:
                try:
                    os.write(self._fd, data)  # a few dozen bytes: as much as the kernel takes
                except OSError:
                    pass
        self.broken = True
        if self._writer is not None:
            self._writer.cancel()
        trio.lowlevel.notify_closing(self._fd)
        self._sock.close()
