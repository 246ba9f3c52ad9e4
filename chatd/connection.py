"""One task per WebSocket connection: frames in, protocol outputs out.

After the handshake (chatd.server), the connection task reads the socket,
feeds wsproto (RFC 6455 framing, UTF-8 checks), and handles each event:

- a text message (its fragments joined, at most ``max-frame-bytes`` UTF-8
  bytes in all, else close 1009) goes to the endpoint's protocol
  (sans-IO); its outputs are carried out: frames for this client, router
  commands, a close;
- a ping is answered with a pong; a pong ends a keepalive wait;
- a binary message closes 1003; a framing violation 1002, bad UTF-8 1007
  (wsproto finds them); the peer's close is answered and ends the task.

Flood control throttles instead of dropping (as Ergo's "fakelag" does):
every frame — data, fragment or control — costs one token of the
``message-rate`` bucket, and a message costs one more per action it asks
for beyond the first (a GradAgenda batch of 40 actions costs 40). A
client in debt is simply read later: TCP pushes back on it, every frame it
sent is still handled in order, and nobody else waits.

Cancel scopes enforce the auth stage (``auth-timeout``) and every way a
connection ends: ``Client.kill`` cancels the connection's scope from
anywhere, and ``_finish`` sends the close frame after the frames already
queued, waits ``close-timeout`` for the peer's close, and closes the
socket. After that decision no buffered frame of the client is handled.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from chatd.client import Client, Flusher
from chatd.events import Answered, Command, Leave, Request
from chatd.protocols.base import AuthFailed, Close, Context, Output, Protocol, Send, Stream
from chatd.router import Router
from chatd.transport import Transport, text_frame

if TYPE_CHECKING:
    from chatd.config import Config
    from chatd.metrics import Metrics

log = logging.getLogger("chatd.connection")

#: Frames of a ``Stream`` answer written before waiting for the socket to drain.
_STREAM_STEP = 32
#: Most ``Answered`` commands of one client waiting for their answer (a
#: pipelining GradAgenda client): beyond it, its next frame is read later.
_IN_FLIGHT = 128


class _PeerGone(Exception):
    """The peer closed the connection or the stream broke."""


class Connection(Client):
    __slots__ = ("ws", "proto", "router", "config", "metrics", "tokens", "stamp", "last_heard",
                 "ping_sent", "peer_close", "throttled")

    def __init__(self, transport: Transport, trailing: bytes, protocol_cls: type[Protocol],
                 ctx: Context, room: str, peer: str, path: str, router: Router, config: Config,
                 flusher: Flusher, metrics: Metrics) -> None:
        super().__init__(protocol_cls, room, peer, path, config.outbox_size, transport, flusher)
        self.ws = WSConnection(ConnectionType.SERVER, None, trailing)
        self.proto = protocol_cls(ctx)
        self.router = router
        self.config = config
        self.metrics = metrics
        now = trio.current_time()
        #: The message-rate bucket: tokens left (negative: in debt) at ``stamp``.
        self.tokens = float(config.message_burst)
        self.stamp = now
        #: When bytes last arrived, and when an unanswered keepalive ping went out.
        self.last_heard = now
        self.ping_sent: float | None = None
        #: The peer's close frame, once received.
        self.peer_close: CloseConnection | None = None
        self.throttled = False

    # --- the task ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends; never raises."""
        try:
            with self.scope:
                await self._serve()
        except _PeerGone:
            pass
        except Exception:
            # A bug here must end this connection alone, with 1011.
            log.exception("%s connection task failed", self.peer)
            self.kill(1011, "internal error")
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _serve(self) -> None:
        await self._carry_out(self.proto.greeting())
        self.flush()
        if not self.proto.authenticated:
            await self._auth_stage()
        while True:
            await self._handle(await self._next_message())

    async def _auth_stage(self) -> None:
        proto = self.proto
        with trio.move_on_after(self.config.auth_timeout) as auth_scope:
            while not proto.authenticated:
                await self._handle(await self._next_message())
        if auth_scope.cancelled_caught:
            log.info("%s auth stage timed out", self.peer)
            await self._carry_out(proto.auth_timeout())

    async def _handle(self, text: str) -> None:
        proto = self.proto
        was_authenticated = proto.authenticated
        outputs = proto.receive(text)
        if len(outputs) > 1:  # one token per action asked for, beyond the frame's own
            self.tokens -= len(outputs) - 1
        await self._carry_out(outputs)
        self.flush()
        # Answers to this client wait for its socket, or for the store: read
        # its next request only once it has taken them (TCP pushes back on a
        # client that asks faster than it reads; it is not cut off).
        if self.transport.waiting_frames:
            await self.transport.drain()
        window = max(1, min(_IN_FLIGHT, self.outbox_size // 2))
        while self.in_flight >= window:
            self.answers_wanted = trio.Event()
            await self.answers_wanted.wait()
        if proto.authenticated and not was_authenticated:
            log.info("%s authenticated on %s as %s", self.peer, self.path,
                     self.user_id or self.name, extra={"peer": self.peer, "path": self.path})

    # --- reading -------------------------------------------------------------

    async def _next_message(self) -> str:
        """The next complete text message; raises _PeerGone when there is none."""
        ws = self.ws
        limit = self.config.max_frame_bytes
        parts: list[str] = []
        size = 0
        while True:
            for event in ws.events():
                kind = type(event)
                if kind is TextMessage:
                    if event.frame_finished:
                        await self._pay()
                    data = event.data
                    if data:
                        # wsproto counts characters; the limit is in UTF-8 bytes.
                        size += len(data) if data.isascii() else len(data.encode())
                        if size > limit:
                            self.kill(1009, f"message exceeds {limit} bytes")
                            await trio.lowlevel.checkpoint()
                    if event.message_finished:
                        self.metrics.received[self.protocol.name] += 1
                        if not parts:
                            return data
                        parts.append(data)
                        return "".join(parts)
                    if data:
                        parts.append(data)
                elif kind is Ping:
                    await self._pay()
                    self.deliver(ws.send(event.response()))
                    self.flush()
                elif kind is Pong:
                    self.ping_sent = None
                elif kind is CloseConnection:
                    if ws.state is ConnectionState.OPEN:
                        # wsproto found a violation (1002 framing, 1007 UTF-8).
                        self.kill(event.code, event.reason or "protocol error")
                        await trio.lowlevel.checkpoint()
                    self.peer_close = event
                    raise _PeerGone
                elif kind is BytesMessage:
                    self.kill(1003, "binary frames are not supported")
                    await trio.lowlevel.checkpoint()
            data = await self.transport.receive()
            if not data:
                ws.receive_data(None)
                raise _PeerGone
            self.last_heard = trio.current_time()
            ws.receive_data(data)

    async def _pay(self) -> None:
        """Take a frame's token; in debt, wait (unread) until it is paid."""
        now = trio.current_time()
        rate = self.config.message_rate
        tokens = min(self.config.message_burst, self.tokens + (now - self.stamp) * rate) - 1
        self.stamp = now
        self.tokens = tokens
        if tokens < 0:
            if not self.throttled:
                self.throttled = True
                log.info("%s over the message rate: reading it more slowly", self.peer,
                         extra={"peer": self.peer, "path": self.path})
            await trio.sleep(-tokens / rate)

    # --- outputs ---------------------------------------------------------------

    async def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            kind = type(out)
            if kind is Send:
                self.deliver(text_frame(out.data))
            elif kind is Close:
                self.kill(out.code, out.reason)
                await trio.lowlevel.checkpoint()
            elif kind is Stream:
                await self._stream(out.frames)
            elif kind is AuthFailed:
                log.info("%s authentication failed on %s: user %r: %s", self.peer, self.path,
                         out.user, out.reason, extra={"peer": self.peer, "path": self.path})
            elif isinstance(out, Request):
                out.client = self
                await self._carry_out(await self.router.call(out))
            else:
                out.client = self
                if isinstance(out, Answered):
                    self.in_flight += 1
                try:
                    # No yield per command: the frames of one read reach the
                    # router together, so one router pass (and one write per
                    # recipient) carries them all.
                    self.router.post(out)
                except trio.WouldBlock:
                    await self.router.send(out)

    async def _stream(self, frames: Any) -> None:
        """Write an answer frame by frame as the socket drains: a few frames
        at a time, then wait until the kernel has taken them."""
        step = max(1, min(_STREAM_STEP, self.outbox_size // 4))
        for count, data in enumerate(frames, 1):
            if not self.deliver(text_frame(data)):
                return
            if count % step == 0:
                self.flush()
                if self.transport.waiting_frames:
                    await self.transport.drain()
        self.flush()

    def answer(self, command: Command, result: Any) -> list[Output]:
        """Run the protocol's ``on_result`` in the router task: leading
        frames are delivered at once, the rest returned to this task."""
        outputs = self.proto.on_result(command, result)
        for index, out in enumerate(outputs):
            if type(out) is not Send:
                return outputs[index:]
            self.deliver(text_frame(out.data))
        return []

    # --- keepalive -------------------------------------------------------------

    def ping(self, now: float) -> None:
        """Send a keepalive ping (the server's sweep calls this)."""
        if self.ws.state is ConnectionState.OPEN and not self.sealed:
            self.ping_sent = now
            self.deliver(self.ws.send(Ping(b"chatd")))

    # --- the end ---------------------------------------------------------------

    async def _finish(self) -> None:
        goodbye: list[Command] = [*self.proto.on_disconnect(), Leave()]
        try:
            for command in goodbye:
                command.client = self
                await self.router.send(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the router is gone: the server is stopping
        ws, transport = self.ws, self.transport
        code = self.close_code
        if self.peer_close is not None and code is None:
            code = self.peer_close.code
        if code is None:
            code = 1006
        frame = b""
        if not transport.broken:
            if ws.state is ConnectionState.REMOTE_CLOSING:
                frame = ws.send(self.peer_close.response())  # echo the peer's close
            elif ws.state is ConnectionState.OPEN:
                frame = ws.send(CloseConnection(code, self.close_reason or None))
        if frame:
            self.deliver(frame)
        self.sealed = True
        self.flush()
        if frame:
            with trio.move_on_after(self.config.close_timeout):
                await transport.drain()
                if ws.state is ConnectionState.LOCAL_CLOSING and not transport.broken:
                    await self._await_peer_close()
        transport.close()
        self.metrics.closed(code)
        log.info("%s disconnected from %s (%s) code %d %s", self.peer, self.path,
                 self.name or self.user_id or "-", code, self.close_reason,
                 extra={"peer": self.peer, "path": self.path, "code": code})

    async def _await_peer_close(self) -> None:
        """Read (and ignore) until the peer's close frame: no frame that
        arrives after chatd decided to close is handled."""
        ws = self.ws
        while True:
            for event in ws.events():
                if type(event) is CloseConnection:
                    return
            data = await self.transport.receive()
            if not data:
                return
            ws.receive_data(data)
