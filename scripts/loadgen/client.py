"""One raw WebSocket client connection: open, authenticate, send, count what arrives.

The receive side is the load generator's hot path. A worker's
``Receiver`` (``receiver.py``) hands each connection the bytes it read;
:meth:`WsClient.feed` walks the frames in them (RFC 6455 section 5.2)
without decoding chat messages: a chat frame is counted from its header,
and its send time is read by a byte search for the ``~lt`` marker
(``dialects.MARK``) to fill the latency histogram. Only other frames
(auth answers, errors, GradAgenda session info) may be parsed as JSON.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any, Callable

import trio

from .dialects import MARK, LoadError
from .wire import CLOSE, PING, PONG, client_frame, close_payload, handshake_request

if TYPE_CHECKING:
    from .worker import Worker

RECEIVE_SIZE = 65536
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


class WsClient:
    """One raw WebSocket connection: a reader task that counts chat frames
    (no JSON), and just enough of the protocol to authenticate and publish."""

    def __init__(self, worker: Worker, name: str, room: int) -> None:
        self.worker = worker
        self.stats = worker.stats
        self.dialect = worker.dialect
        self.name = name
        self.room = room
        self.token = worker.token_for(name) if self.dialect.tokens else None
        self.stream: trio.SocketStream | None = None
        self.fd = -1
        self.send_lock = trio.Lock()
        self.buffer = b""
        self.closing = False      # we started the close: what follows is no error
        self.got_close: int | None = None   # the code of the server's close frame
        self.close_info = "connection lost"
        self.done = trio.Event()
        # A pending request: a predicate over the next control frames.
        self.waiter: Callable[[Any], bool] | None = None
        self.reply: Any = None
        self.replied = trio.Event()
        # Window accounting: frames tagged by this probe's publisher.
        self.ack_tag: bytes | None = None
        self.acked = 0
        self.ack_event: trio.Event | None = None
        self.sent = 0  # as a publisher
        # GradAgenda: the group this member is in.
        self.session = b""
        self.session_known = trio.Event()

    # --- opening ------------------------------------------------------------

    async def open(self, path: str) -> None:
        """TCP connect (from the worker's next source address) and the
        opening handshake; raise LoadError if either fails."""
        plan = self.worker.plan
        sock = trio.socket.socket(plan.family, socket.SOCK_STREAM)
        try:
            source = self.worker.next_source()
            if source:
                # Let connect() pick the port, so ports are unique per 4-tuple.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((source, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await sock.connect((plan.address, plan.port))
            except OSError as exc:
                raise LoadError(f"connect: {type(exc).__name__}") from None
        except BaseException:
            sock.close()
            raise
        self.stream = trio.SocketStream(sock)
        request, accept = handshake_request(plan.host_header, path)
        await self.stream.send_all(request)
        response = b""
        while b"\r\n\r\n" not in response:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise LoadError("handshake: connection closed")
            response += data
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        status, *headers = head.split(b"\r\n")
        status_text = status.decode(errors="replace")
        if not status_text.startswith("HTTP/1.1 101"):
            raise LoadError(f"handshake: HTTP {status_text.partition(' ')[2] or status_text}")
        answer = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in headers)}
        if answer.get(b"sec-websocket-accept") != accept:
            raise LoadError("handshake: wrong Sec-WebSocket-Accept")
        self.stats.open += 1

    # --- sending ------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write ready-made frames; raise LoadError if the connection is gone."""
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LoadError(f"send: {self.close_info}") from exc

    async def send_json(self, obj: Any) -> None:
        await self.send_raw(client_frame(json.dumps(obj, separators=(",", ":")).encode()))

    async def request(self, obj: Any, answered: Callable[[Any], bool], what: str = "auth") -> Any:
        """Send ``obj`` and wait for the first control frame ``answered`` accepts."""
        self.waiter, self.reply, self.replied = answered, None, trio.Event()
        await self.send_json(obj)
        await self.replied.wait()
        if self.reply is None:
            raise LoadError(f"{what}: {self.close_info}")
        return self.reply

    # --- receiving ----------------------------------------------------------

    def feed(self, data: bytes, now_ns: int) -> None:
        """Bytes the worker's reader got for this connection."""
        buf = self.buffer + data if self.buffer else data
        pongs: list[bytes] = []
        self.buffer = buf[self._scan(buf, now_ns, pongs):]
        if pongs:
            frames = b"".join(client_frame(p, PONG) for p in pongs)
            self.worker.nursery.start_soon(self._send_quietly, frames)
        if self.got_close is not None:
            if not self.closing:  # echo the server's close frame (RFC 6455 section 5.5.1)
                code = 1000 if self.got_close == 1005 else self.got_close
                self.worker.nursery.start_soon(self._send_quietly,
                                               client_frame(close_payload(code), CLOSE))
            self.ended()

    def lost(self, reason: str) -> None:
        """The socket reached EOF or failed without a close frame."""
        if not self.closing:
            self._record_close(1006, reason)
        self.ended()

    def ended(self) -> None:
        """No more frames will come: wake whoever waits on this connection."""
        if self.done.is_set():
            return
        self.worker.receiver.remove(self)
        self.stats.open -= 1
        self.done.set()
        self.replied.set()  # a pending request fails
        if self.ack_event is not None:
            self.ack_event.set()

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await self.send_raw(data)
            except LoadError:
                pass

    def _scan(self, buf: bytes, now_ns: int, pongs: list[bytes]) -> int:
        """Handle each complete frame in ``buf``; return the bytes used.

        The hot path: chat frames are counted and timed without decoding,
        and histogram.bucket() is inlined (a call per delivery costs).
        """
        stats = self.stats
        hist = stats.latency
        worst = stats.latency_max
        ack_tag = self.ack_tag
        find = buf.find
        end_of_data = len(buf)
        pos = delivered = 0
        while end_of_data - pos >= 2:
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if end_of_data - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if end_of_data - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > end_of_data:
                break
            opcode = buf[pos] & 0x0F
            pos = end
            if opcode <= 1:
                i = find(MARK, start, end)
                if i < 0:
                    self._control(buf[start:end])
                    continue
                delivered += 1
                us = (now_ns - int(buf[i + 3:i + 22])) // 1000
                if us < 128:
                    b = us if us > 0 else 0
                else:
                    e = us.bit_length() - 7
                    b = (e << 6) + (us >> e)
                hist[b] = hist.get(b, 0) + 1
                if us > worst:
                    worst = us
                if ack_tag is not None and buf.startswith(ack_tag, i + 23):
                    self.acked += 1
                    if self.ack_event is not None:
                        self.ack_event.set()
            elif opcode == CLOSE:
                payload = buf[start:end]
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.closing:
                    self._record_close(code, payload[2:].decode(errors="replace"))
                self.got_close = code
                break
            elif opcode == PING:
                pongs.append(buf[start:end])
        stats.latency_max = worst
        if now_ns < stats.deadline_ns:
            stats.deliveries += delivered
        else:
            stats.late += delivered
        return pos

    def _control(self, payload: bytes) -> None:
        """A frame that is not a chat message: parse it only if it may matter."""
        if self.waiter is None and not any(m in payload for m in self.dialect.markers):
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        self.dialect.observe(self, obj)
        if self.waiter is not None and self.waiter(obj):
            self.waiter, self.reply = None, obj
            self.replied.set()
            return
        problem = self.dialect.problem(obj)
        if problem:
            self.worker.error(problem)

    def _record_close(self, code: int, reason: str) -> None:
        self.close_info = f"closed {code} {reason}".strip()
        self.stats.close_codes[code] += 1
        self.stats.close_reasons.setdefault(code, reason)

    # --- closing ------------------------------------------------------------

    async def close(self) -> None:
        """Close handshake, then the socket (the server closes TCP first)."""
        self.closing = True
        if not self.done.is_set():
            try:
                await self.send_raw(client_frame(close_payload(1000), CLOSE))
            except LoadError:
                pass
            with trio.move_on_after(2):
                await self.done.wait()
        await self.abort()

    async def abort(self) -> None:
        """Drop the connection without a close handshake."""
        self.closing = True
        if self.stream is not None:
            if self in self.worker.receiver:  # opened: stop reading it
                self.ended()
            await trio.aclose_forcefully(self.stream)
