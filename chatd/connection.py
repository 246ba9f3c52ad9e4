"""One task per WebSocket connection: frames in, protocol outputs out.

After the handshake (chatd.server), the connection task reads the socket,
feeds the ``websockets`` library's sans-IO parser (RFC 6455 framing, its
C-accelerated unmasking; no I/O of its own), and handles each frame in
order:

- a text message (its fragments joined, at most the endpoint's
  ``max-frame-bytes`` UTF-8 bytes in all, else close 1009; invalid UTF-8,
  even split between fragments, closes 1007) goes to the endpoint's
  protocol (sans-IO); its outputs are carried out: frames for this
  client, router commands, a close;
- a ping is answered with a pong; a pong ends a keepalive wait;
- a binary message is the protocol's to judge (``Protocol.binary``): it
  closes 1003 on every protocol but a registered multichat bridge, for
  which it is skipped, fragments and all, as the original Go server
  does (docs/protocols.md); it counts against the limit and the rate
  like a text message. A framing violation closes 1002 (the parser
  finds them: RFC 6455 sections 5.2-5.5); a single frame longer than the
  limit 1009 before its payload is read; the peer's close is echoed and
  ends the task, also in the middle of a fragmented message (section 5.4
  lets control frames interleave).

The parser reads everything buffered at once, but its frames are handled
one by one: after chatd decides to close (a violation, a limit, the
protocol), no later frame is handled, and a violation is acted on only
after the frames before it. chatd writes every frame itself: data frames
pre-built (``chatd.transport.text_frame``), pongs and close frames with
the library's serializer; the library's own automatic replies are
discarded.

Flood control throttles instead of dropping (as Ergo's "fakelag" does):
every frame — data, fragment or control — costs one token of the
``message-rate`` bucket, and a message costs one more per action it asks
for beyond the first (a GradAgenda batch of 40 actions costs 40), and
one more per 64 UTF-8 bytes of each name it made chatd check
(``chatd.names.cost``: a long name costs several messages' work). A
client in debt is simply read later: TCP pushes back on it, every frame it
sent is still handled in order, and nobody else waits.

Cancel scopes enforce the auth stage (``auth-timeout``) and every way a
connection ends: ``Client.kill`` cancels the connection's scope from
anywhere, and ``_finish`` sends the close frame after the frames already
queued, waits ``close-timeout`` for the peer's close (after a framing
violation, whose frames cannot be trusted, for the end of the stream),
and closes the socket.
"""

from __future__ import annotations

import codecs
import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Close as CloseFrame
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol as WSProtocol
from websockets.protocol import Side, State

from chatd import names
from chatd.outbox import Client, Flusher
from chatd.events import Answered, Command, Leave, Request
from chatd.logs import client_source
from chatd.parking import Parking
from chatd.protocols.base import AuthFailed, Close, Context, Output, Protocol, Send, Stream
from chatd.router import Router
from chatd.transport import Transport, text_frame

if TYPE_CHECKING:
    from chatd.config import Config
    from chatd.metrics import Metrics

log = logging.getLogger("chatd.connection")
#: The parser's own logger: its errors only. At DEBUG it would log every
#: frame with its payload (users' messages), so it never goes below INFO.
_frames_log = logging.getLogger("chatd.connection.frames")
_frames_log.setLevel(logging.INFO)

_TEXT, _CONT, _BINARY = Opcode.TEXT, Opcode.CONT, Opcode.BINARY
_PING, _PONG, _CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_NO_FRAMES: Iterator[Frame] = iter(())

#: Most ``Answered`` commands of one client waiting for their answer (a
#: pipelining GradAgenda client): beyond it, its next frame is read later.
_IN_FLIGHT = 128


class _PeerGone(Exception):
    """The peer closed the connection or the stream broke."""


class _Parked(Exception):
    """The connection parked: its task ends without ending it."""


class Connection(Client):
    __slots__ = ("ws", "frames", "unparsed", "proto", "router", "config", "metrics", "tokens", "stamp",
                 "last_heard", "ping_sent", "peer_close", "ended", "throttled", "limit", "counted",
                 "on_end", "parking", "source")

    def __init__(self, transport: Transport, trailing: bytes, protocol_cls: type[Protocol],
                 ctx: Context, room: str, peer: str, path: str, router: Router, config: Config,
                 flusher: Flusher, metrics: Metrics, counted: str | None = None,
                 on_end: Callable[[Connection], None] | None = None,
                 parking: Parking | None = None) -> None:
        super().__init__(protocol_cls, room, peer, path, config.outbox_size, transport, flusher)
        # One frame may be as long as a whole message; the parser refuses a
        # longer one from its header. A message's total is counted here.
        #: The endpoint's ``max-frame-bytes`` (``Config.frame_limit``).
        self.limit = ctx.max_frame_bytes
        #: The frame parser; None until bytes arrive, and while parked.
        self.ws: WSProtocol | None = None
        #: The address the server's ledger counted this connection against
        #: (``chatd.limits``), and what is called with the connection when
        #: its task ends (the server's books; one callable for all).
        self.counted = counted
        self.on_end = on_end
        #: Where the connection waits without a task while its socket is
        #: silent (``chatd.parking``); None: it always keeps its task.
        self.parking = parking
        #: Whom the lines logged for this connection are charged to
        #: (``chatd.logs``), set again in each new task after parking.
        self.source = client_source.get()
        #: Frames parsed and not handled yet, in order.
        self.frames: Iterator[Frame] = _NO_FRAMES
        #: Bytes read but not yet given to the parser (see ``_feed``).
        self.unparsed = b""
        if trailing:
            self._feed(trailing)
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
        #: The peer's close (code and reason), once received.
        self.peer_close: CloseFrame | None = None
        #: True once the peer ended the stream without a close frame.
        self.ended = False
        self.throttled = False

    # --- the task ------------------------------------------------------------

    async def run(self, resumed: bool = False) -> None:
        """Serve the connection until it ends, or until it parks (then
        ``wake`` gives it a new task, which runs this with ``resumed``);
        never raises."""
        parked = False
        if resumed:
            client_source.set(self.source)
        scope = self.scope
        try:
            with scope:
                await self._serve(resumed)
            if scope.cancelled_caught and self.close_code is None:
                # Cancelled, not killed: the auth stage's deadline passed.
                log.info("%s auth stage timed out", self.peer)
                await self._carry_out(self.proto.auth_timeout())
        except _Parked:
            parked = True
        except _PeerGone:
            pass
        except Exception:
            # A bug here must end this connection alone, with 1011.
            log.exception("%s connection task failed", self.peer)
            self.kill(1011, "internal error")
        finally:
            if not parked:
                try:
                    await self._finish()
                finally:
                    if self.on_end is not None:
                        self.on_end(self)

    async def _serve(self, resumed: bool) -> None:
        if not resumed:
            await self._carry_out(self.proto.greeting())
            self.flush()
            if not self.proto.authenticated:
                await self._auth_stage()
                # An answer to the auth frame (a wcp roster) is written outside
                # the auth stage's deadline: it takes as long as the client reads.
                await self._write_streams()
        while True:
            await self._handle(await self._next_message())

    async def _auth_stage(self) -> None:
        """Handle messages until the protocol says the client authenticated,
        within ``auth-timeout``: the deadline is the connection scope's own
        (one cancel scope fewer per connection); ``run`` tells it from a
        kill, which sets a close code."""
        proto = self.proto
        scope = self.scope
        scope.deadline = trio.current_time() + self.config.auth_timeout
        while not proto.authenticated:
            await self._handle(await self._next_message(), answers=False)
        scope.deadline = math.inf

    async def _handle(self, text: str, answers: bool = True) -> None:
        """Handle one message; then (``answers``) write the answers it got
        as the client reads them, before the next message is read."""
        proto = self.proto
        was_authenticated = proto.authenticated
        checked = names.meter.tokens
        outputs = proto.receive(text)
        # One token per action asked for beyond the frame's own, and what
        # its name checks cost (chatd.names.cost: long names are dear).
        extra = max(len(outputs) - 1, 0) + names.meter.tokens - checked
        if extra > 0:
            self.tokens -= extra
        done = self._carry_out_now(outputs)
        if done < len(outputs):
            await self._carry_out(outputs[done:])
        self.flush()
        if answers:
            await self._write_streams()
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
        limit = self.limit
        parts: list[str] = []
        decoder = None  # for a fragmented message: UTF-8 checked fragment by fragment
        size = 0
        skipping = False  # in a binary message the protocol skips
        while True:
            for frame in self.frames:
                kind = frame.opcode
                if kind is _TEXT or (kind is _CONT and not skipping):
                    if self._spend():
                        await self._repay()
                    data = frame.data
                    size += len(data)
                    if size > limit:
                        self.kill(1009, f"message exceeds {limit} bytes")
                        await trio.lowlevel.checkpoint()
                    try:
                        if frame.fin and decoder is None:
                            text = data.decode()
                        else:
                            decoder = decoder or _utf8_decoder()
                            piece = decoder.decode(data, frame.fin)
                            if piece:  # an empty fragment keeps nothing
                                parts.append(piece)
                    except UnicodeDecodeError as exc:
                        self.kill(1007, f"invalid UTF-8: {exc.reason}")
                        await trio.lowlevel.checkpoint()
                    if frame.fin:
                        self.metrics.received[self.protocol.name] += 1
                        return text if decoder is None else "".join(parts)
                elif kind is _PING:
                    if self._spend():
                        await self._repay()
                    self.deliver(Frame(_PONG, frame.data).serialize(mask=False))
                    self.flush()
                elif kind is _PONG:
                    self.ping_sent = None
                elif kind is _CLOSE:
                    self.peer_close = self.ws.close_rcvd
                    raise _PeerGone
                else:  # _BINARY, or a CONT of a binary message being skipped
                    if self._spend():
                        await self._repay()
                    size += len(frame.data)
                    if size > limit:
                        self.kill(1009, f"message exceeds {limit} bytes")
                        await trio.lowlevel.checkpoint()
                    if kind is _BINARY:
                        await self._carry_out(self.proto.binary())
                        self.flush()
                    skipping = not frame.fin
                    if frame.fin:
                        size = 0
            if self.ws is not None and self.ws.parser_exc is not None:
                await self._parser_failed()
            if self.unparsed:
                self._feed(b"")
                continue
            data = await self.transport.receive(self._quiet)
            if not data:
                self.ended = True
                raise _PeerGone
            self.last_heard = trio.current_time()
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data``, a slice at a time; the frames wait in ``frames``.

        The parser turns everything it is given into frame objects at once:
        16 KB of empty fragments would be ~2,700 of them (~400 KB) held while
        the client is throttled. A slice of ``_PARSE_SLICE`` bytes bounds
        that to a few dozen KB per connection; the rest waits as bytes."""
        data = self.unparsed + data if self.unparsed else data
        ws = self.ws
        if ws is None:
            ws = self.ws = WSProtocol(Side.SERVER, state=State.OPEN,
                                      max_size=(None, self.limit), logger=_frames_log)
        ws.receive_data(data[:_PARSE_SLICE])
        self.unparsed = data[_PARSE_SLICE:]
        self.frames = iter(ws.events_received())
        ws.data_to_send()  # the library's automatic replies: chatd writes its own

    def _parser_idle(self) -> bool:
        """Whether the parser holds nothing (no partial frame, no fragmented
        message, no close, no failure): then a parked connection lets go of
        it (~1 KiB) and the next read makes a new one (~8 µs)."""
        ws = self.ws
        if ws is None:
            return not self.unparsed
        if self.unparsed or ws.parser_exc is not None or ws.close_rcvd is not None:
            return False
        # What the parser holds is read from two attributes websockets
        # (16-17) does not document: the bytes of a partial frame and the
        # size of a fragmented message under way. Without them (another
        # version) the parser is kept: more memory, the same behaviour.
        buffered = getattr(getattr(ws, "reader", None), "buffer", None)
        return buffered is not None and not buffered and getattr(ws, "current_size", 0) is None

    def _quiet(self) -> float | None:
        """Nothing to read now. An authenticated connection with nothing
        half-read, nothing to finish and no answer under way that has heard
        nothing for ``PARK_AFTER`` seconds parks (``chatd.parking``): its
        task ends here (``_Parked``) and ``wake`` starts a new one when
        bytes arrive or it is killed. Until then (or if it may not park),
        the seconds left to wait with its task (None: wait for bytes)."""
        parking = self.parking
        if (parking is None or not self.proto.authenticated or self.close_code is not None
                or self.peer_close is not None or self.sealed or self.streams is not None
                or self.in_flight):
            return None
        wait = PARK_AFTER - (trio.current_time() - self.last_heard)
        if wait > 0:
            return wait  # an active connection keeps its task: parking costs a wake-up
        if not self._parser_idle():
            return None
        self.ws = None
        self.frames = _NO_FRAMES
        parking.park(self.transport.fileno(), self)
        raise _Parked

    def wake(self) -> None:
        """Parked no more (its socket is readable, or it was killed): a new
        task carries on reading, or ends it."""
        self.scope = trio.CancelScope()
        if self.close_code is not None:
            self.scope.cancel()
        self.parking.spawn(self.run, True)

    def kill(self, code: int, reason: str) -> None:
        super().kill(code, reason)
        parking = self.parking
        if parking is not None and parking.unpark(self.transport.fileno()):
            self.wake()

    async def _parser_failed(self) -> None:
        """Act on what stopped the parser, once the frames before it are handled."""
        ws = self.ws
        exc = ws.parser_exc
        if ws.close_rcvd is not None:
            # The peer closed in the middle of a fragmented message: RFC 6455
            # section 5.4 allows it, the library calls it a violation.
            self.peer_close = ws.close_rcvd
            raise _PeerGone
        if isinstance(exc, PayloadTooBig):
            self.kill(1009, f"message exceeds {self.limit} bytes")
        elif isinstance(exc, ProtocolError):
            self.kill(1002, str(exc) or "protocol error")
        elif isinstance(exc, UnicodeDecodeError):  # a close frame's reason
            self.kill(1007, f"invalid UTF-8: {exc.reason}")
        else:
            self.kill(1011, "internal error")
        await trio.lowlevel.checkpoint()

    def _spend(self) -> bool:
        """Take a frame's token; True if that left the bucket in debt.

        Frames read together arrived together: the bucket refills up to
        the time of their read (``last_heard``), or of the last payment."""
        config = self.config
        elapsed = self.last_heard - self.stamp
        if elapsed > 0:
            self.stamp = self.last_heard
            self.tokens = min(config.message_burst, self.tokens + elapsed * config.message_rate)
        self.tokens -= 1
        return self.tokens < 0

    async def _repay(self) -> None:
        """In debt: wait (unread) until the debt is paid."""
        if not self.throttled:
            self.throttled = True
            log.info("%s over the message rate: reading it more slowly", self.peer,
                     extra={"peer": self.peer, "path": self.path})
        await trio.sleep(-self.tokens / self.config.message_rate)
        self.stamp, self.tokens = trio.current_time(), 0.0

    # --- outputs ---------------------------------------------------------------

    def _carry_out_now(self, outputs: list[Output]) -> int:
        """Carry out, in order, the outputs that need no waiting (frames for
        this client, what is only logged, commands the router's queue takes
        at once); the index of the first one that must wait for something."""
        for index, out in enumerate(outputs):
            kind = type(out)
            if kind is Send:
                self.deliver(text_frame(out.data))
            elif kind is AuthFailed:
                self._log_auth_failed(out)
            elif kind is Close or kind is Stream or isinstance(out, Request):
                return index
            else:
                out.client = self
                try:
                    # No yield per command: the frames of one read reach the
                    # router together, so one router pass (and one write per
                    # recipient) carries them all.
                    self.router.post(out)
                except trio.WouldBlock:
                    return index
                if isinstance(out, Answered):
                    self.in_flight += 1
        return len(outputs)

    def _log_auth_failed(self, out: AuthFailed) -> None:
        log.info("%s authentication failed on %s: user %r: %s", self.peer, self.path,
                 out.user, out.reason, extra={"peer": self.peer, "path": self.path})

    async def _carry_out(self, outputs: list[Output]) -> None:
        done = 0
        while True:
            done += self._carry_out_now(outputs[done:])
            if done == len(outputs):
                return
            await self._carry_out_waiting(outputs[done])
            done += 1

    async def _carry_out_waiting(self, out: Output) -> None:
        """An output ``_carry_out_now`` stopped at."""
        kind = type(out)
        if kind is Close:
            self.kill(out.code, out.reason)
            await trio.lowlevel.checkpoint()
        elif kind is Stream:
            self.stream(out.frames)
        elif isinstance(out, Request):
            out.client = self
            await self._carry_out(await self.router.call(out))
        else:  # a command the router's queue could not take at once
            out.client = self
            if isinstance(out, Answered):
                self.in_flight += 1
            await self.router.send(out)

    async def _write_streams(self) -> None:
        """Write the answers handed over with ``stream``, a chunk of whole
        frames (``_ANSWER_CHUNK`` bytes) at a time, each made only once the
        chunk before it has gone to the kernel: an answer never waits in
        chatd's memory, and, being asked for, is not counted as a slow
        consumer's backlog however long it is. Then the frames held behind
        it go out (``Client.release_held``)."""
        streams = self.streams
        if streams is None:
            return
        self.flush()  # what was delivered before the answer goes first
        while streams:
            chunk: list[bytes] = []
            size = 0
            for data in streams[0]:
                frame = text_frame(data)
                chunk.append(frame)
                size += len(frame)
                if size >= _ANSWER_CHUNK:
                    await self._write_answer(b"".join(chunk), len(chunk))
                    chunk, size = [], 0
            streams.popleft()
            if chunk:
                await self._write_answer(b"".join(chunk), len(chunk))
        self.release_held()
        self.flush()

    async def _write_answer(self, data: bytes, frames: int) -> None:
        self.flusher.deliveries[self.protocol.name] += frames
        if not self.transport.write(data, frames, counted=False):
            self.kill(1006, "connection lost")
        # Drained: the client reads, so it is alive (for the keepalive sweep).
        await self.transport.drain()
        self.last_heard = trio.current_time()

    def answer(self, command: Command, result: Any) -> list[Output]:
        """Run the protocol's ``on_result`` in the router task: leading
        frames are delivered at once, a streamed answer handed over (so
        later events wait behind it), the rest returned to this task."""
        outputs = self.proto.on_result(command, result)
        for index, out in enumerate(outputs):
            kind = type(out)
            if kind is Send:
                self.deliver(text_frame(out.data))
            elif kind is Stream:
                self.stream(out.frames)  # from now on, other frames wait behind it
            else:
                return outputs[index:]
        return []

    # --- keepalive -------------------------------------------------------------

    def ping(self, now: float) -> None:
        """Send a keepalive ping (the server's sweep calls this)."""
        if self.peer_close is None and self.close_code is None and not self.sealed:
            self.ping_sent = now
            self.deliver_now(_KEEPALIVE_PING)

    # --- the end ---------------------------------------------------------------

    async def _finish(self) -> None:
        """Say goodbye to the router, send the close frame (or the echo of
        the peer's), wait for what must be waited for, close the socket and
        log the end. It runs after a kill or a cancellation, so each wait
        is shielded (and bounded: ``close-timeout``); the common end, an
        echo the kernel takes at once, waits for nothing."""
        goodbye: list[Command] = [*self.proto.on_disconnect(), Leave()]
        try:
            for command in goodbye:
                command.client = self
                try:
                    self.router.post(command)  # no wait unless the queue is full
                except trio.WouldBlock:
                    with trio.CancelScope(shield=True):
                        await self.router.send(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the router is gone: the server is stopping
        transport, peer_close = self.transport, self.peer_close
        if self.close_code is None and self.in_flight and not transport.broken:
            # The peer closed (or half-closed) with requests in flight: the
            # answers to what chatd accepted go out before the close echo
            # (RFC 6455 section 5.5.1 lets the server finish sending first).
            with self._closing_scope():
                while self.in_flight:
                    self.answers_wanted = trio.Event()
                    await self.answers_wanted.wait()
        code = self.close_code
        if peer_close is not None and code is None:
            code = peer_close.code
        if code is None:
            code = 1006
        frame = b""
        if not (transport.broken or self.ended):
            if peer_close is not None:
                frame = close_frame(peer_close.code, peer_close.reason)  # echo the peer's close
            else:
                frame = close_frame(code, self.close_reason)
        if self.streams is not None:
            self.release_held()  # an answer cut short: what waited behind it goes first
        if frame:
            self.deliver(frame)
        self.sealed = True
        self.flush()
        if frame and (transport.draining or peer_close is None):
            # Something to wait for: the close frame to leave, or the
            # peer's close. (An echo the kernel took at once needs nothing.)
            with self._closing_scope():
                await transport.drain()
                if peer_close is None and not transport.broken:
                    await self._await_peer_close()
        transport.close()
        self.metrics.closed(code)
        log.info("%s disconnected from %s (%s) code %d %s", self.peer, self.path,
                 self.name or self.user_id or "-", code, self.close_reason,
                 extra={"peer": self.peer, "path": self.path, "code": code})

    def _closing_scope(self) -> trio.CancelScope:
        """A wait of ``_finish``'s: shielded, ``close-timeout`` seconds at most."""
        return trio.CancelScope(deadline=trio.current_time() + self.config.close_timeout,
                                shield=True)

    async def _await_peer_close(self) -> None:
        """Read (and ignore) until the peer's close frame: no frame that
        arrives after chatd decided to close is handled."""
        while True:
            for frame in self.frames:
                if frame.opcode is _CLOSE:
                    return
            # After a framing violation the parser discards what comes:
            # then this waits for the end of the stream (or close-timeout).
            if self.unparsed:
                self._feed(b"")
                continue
            data = await self.transport.receive()
            if not data:
                return
            self._feed(data)


#: Seconds an authenticated connection hears nothing before it parks
#: (``Connection._quiet``): a connection that talks keeps its task.
PARK_AFTER = 1.0

#: Bytes of a streamed answer written at a time (``Connection._write_streams``).
_ANSWER_CHUNK = 64 * 1024

#: Most bytes given to the frame parser at a time (see ``Connection._feed``).
_PARSE_SLICE = 4096

_KEEPALIVE_PING = Frame(_PING, b"chatd").serialize(mask=False)


@functools.lru_cache(maxsize=256)
def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame (RFC 6455 section 5.5.1): ``code`` and ``reason`` cut
    to the 123 bytes a control frame has room for; no payload at all for a
    code that may not be sent (1005: the peer's close had none). Cached
    (~4 µs to build): most closes and echoes are a few (code, reason)s."""
    if code in (1005, 1006, 1015):
        return Frame(_CLOSE, b"").serialize(mask=False)
    reason = reason.encode()[:123].decode(errors="ignore")
    return Frame(_CLOSE, CloseFrame(code, reason).serialize()).serialize(mask=False)
