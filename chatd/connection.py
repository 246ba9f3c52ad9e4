"""One task per connection: frames in, protocol outputs out.

The connection task decodes each text frame with the endpoint's protocol
(sans-IO) and carries out its outputs: router commands go to the router's
channel; ``Send`` frames and router events go through ``Client.deliver``,
straight to the socket when it can take them, else into this connection's
bounded outbox, which a writer task (started only then) drains, many
frames per write. Cancel scopes enforce the auth stage (``auth-timeout``)
and every way a connection ends: ``Client.kill`` cancels the connection's
scope from anywhere, and the ``finally`` sends the close frame.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from chatd.client import Client
from chatd.events import Command, Leave, Request
from chatd.limits import TokenBucket
from chatd.protocols.base import AuthFailed, Close, Output, Protocol, Send
from chatd.router import Router
from chatd.transport import FrameWriter, text_frame

if TYPE_CHECKING:
    from chatd.config import Config

log = logging.getLogger("chatd.connection")


class Connection:
    def __init__(self, ws: WebSocketConnection, protocol: Protocol, client: Client,
                 router: Router, config: Config) -> None:
        self.ws = ws
        self.protocol = protocol
        self.client = client
        self.router = router
        self.config = config
        self.frame_writer = client.writer
        #: The protocol's close, once queued behind earlier frames.
        self.closing: Close | None = None
        self.bucket = TokenBucket(config.message_rate, config.message_burst, trio.current_time())
        #: Frames dropped by the rate limit since the last one accepted.
        self.dropped = 0
        #: When the last frame arrived, for the keepalive.
        self.last_heard = trio.current_time()
        self.pinging = False
        #: The keepalive ping under way, cancelled when the connection ends
        #: (trio-websocket never wakes a pending ping on close).
        self.ping_scope: trio.CancelScope | None = None
        self.ended = False
        #: True if a write was cut off mid-frame: no close frame may follow.
        self.stream_broken = False

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection; ``nursery`` (the connection's own, which
        the server cancels afterwards) runs the writer task when needed."""
        client = self.client
        # The writer task runs only while frames wait in the outbox: most
        # writes need none (see transport.py).
        client.spawn_writer = lambda: nursery.start_soon(self._write_loop)
        try:
            with client.scope:
                await self._read_loop()
        except Exception:
            # A bug here must end this connection alone, with 1011.
            log.exception("%s connection task failed", client.peer)
            client.kill(1011, "internal error")
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    # --- reading -------------------------------------------------------------

    async def _read_loop(self) -> None:
        protocol = self.protocol
        await self._carry_out(protocol.greeting())
        if not protocol.authenticated:
            with trio.move_on_after(self.config.auth_timeout) as auth_scope:
                while not protocol.authenticated:
                    if not await self._receive_one():
                        return
            if auth_scope.cancelled_caught:
                log.info("%s auth stage timed out", self.client.peer)
                await self._carry_out(protocol.auth_timeout())
        while await self._receive_one():
            pass

    async def _receive_one(self) -> bool:
        """Handle one frame; False once the peer has gone or closed."""
        if self.closing is not None:
            # The writer is flushing what precedes the close and then kills
            # us; a client that stopped reading gets close-timeout for it.
            await trio.sleep(self.config.close_timeout)
            self.client.kill(self.closing.code, self.closing.reason)
            await trio.lowlevel.checkpoint()
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            return False
        self.last_heard = trio.current_time()
        if isinstance(message, bytes):
            self.client.kill(1003, "binary frames are not supported")
            await trio.lowlevel.checkpoint()
        limit = self.config.max_frame_bytes
        # trio-websocket counts characters; the limit is in UTF-8 bytes.
        if len(message) * 4 > limit and len(message.encode()) > limit:
            self.client.kill(1009, f"frame exceeds {limit} bytes")
            await trio.lowlevel.checkpoint()
        if not self.bucket.take(self.last_heard):
            return await self._over_rate(message)
        self.dropped = 0
        was_authenticated = self.protocol.authenticated
        await self._carry_out(self.protocol.receive(message))
        if self.protocol.authenticated and not was_authenticated:
            log.info("%s authenticated on %s as %s", self.client.peer, self.client.path,
                     self.client.user_id or self.client.name)
        return True

    async def _over_rate(self, message: str) -> bool:
        self.dropped += 1
        if self.dropped > self.config.message_burst:
            log.warning("%s closed: message rate limit exceeded", self.client.peer)
            self.client.kill(1008, "message rate limit exceeded")
            await trio.lowlevel.checkpoint()
        if self.dropped == 1:
            log.info("%s over the message rate limit: dropping frames", self.client.peer)
        await self._carry_out(self.protocol.rate_limited(message))
        return True

    async def ping(self) -> None:
        """Ping (the server's keepalive sweep calls this for a silent
        connection); no pong within ping-timeout closes it 1011."""
        try:
            with trio.CancelScope() as self.ping_scope:
                if self.ended:
                    return
                with trio.move_on_after(self.config.ping_timeout) as scope:
                    await self.ws.ping()
            if self.ping_scope.cancelled_caught:
                return
            if scope.cancelled_caught:
                log.info("%s closed: no pong within %gs", self.client.peer,
                         self.config.ping_timeout)
                self.client.kill(1011, "keepalive ping timeout")
            else:
                self.last_heard = trio.current_time()
        except ConnectionClosed:
            pass
        finally:
            self.pinging = False

    async def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self._queue(text_frame(out.data))
            elif isinstance(out, Close):
                self.closing = out
                self._queue(out)
            elif isinstance(out, AuthFailed):
                log.info("%s authentication failed on %s: user %r: %s", self.client.peer,
                         self.client.path, out.user, out.reason)
            elif isinstance(out, Request):
                out.client = self.client
                result = await self.router.call(out)
                await self._carry_out(self.protocol.on_result(out, result))
            else:
                out.client = self.client
                await self.router.send(out)

    def _queue(self, item: bytes | Close) -> None:
        if not self.client.deliver(item) and isinstance(item, Close):
            self.client.kill(item.code, item.reason)

    # --- writing -------------------------------------------------------------

    async def _write_loop(self) -> None:
        client = self.client
        writer = self.frame_writer
        receive_nowait = client.outbox_receive.receive_nowait
        while True:
            try:
                item = receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                # Nothing left: later frames may go straight to the socket.
                client.writer_idle = True
                return
            batch: list[bytes] = []
            while True:
                if isinstance(item, Close):
                    if batch:
                        await self._write(writer, b"".join(batch))
                    client.kill(item.code, item.reason)
                    return
                batch.append(item)
                try:
                    item = receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._write(writer, batch[0] if len(batch) == 1 else b"".join(batch))

    async def _write(self, writer: FrameWriter, data: bytes) -> None:
        # Shielded, so a kill never cuts a frame in half (the close frame
        # must follow whole frames); Client.kill gives the write a deadline
        # instead. If that passes mid-write, the stream is dropped unclosed.
        client = self.client
        with trio.CancelScope(shield=True) as scope:
            client.write_scope = scope
            try:
                if client.close_code is not None:
                    scope.deadline = trio.current_time() + self.config.close_timeout
                await writer.write(data)
            except ConnectionClosed:
                client.kill(1006, "connection lost")
            finally:
                client.write_scope = None
        if scope.cancelled_caught:
            self.stream_broken = True
        await trio.lowlevel.checkpoint()

    # --- the end -------------------------------------------------------------

    async def _finish(self) -> None:
        client = self.client
        self.ended = True
        client.writer = None  # nothing more is written or queued
        if self.ping_scope is not None:
            self.ping_scope.cancel()
        if client.outbox is not None:
            client.outbox.close()
        if client.write_scope is not None:  # no close frame waits for ever
            client.write_scope.deadline = min(client.write_scope.deadline,
                                              trio.current_time() + self.config.close_timeout)
        goodbye: list[Command] = [*self.protocol.on_disconnect(), Leave()]
        try:
            for command in goodbye:
                command.client = client
                await self.router.send(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the router is gone: the server is stopping
        code = client.close_code or 1000
        if not self.stream_broken:
            with trio.move_on_after(self.config.close_timeout):
                await self.ws.aclose(code, client.close_reason or None)
        closed = self.ws.closed
        if client.close_code is None and closed is not None:
            code = closed.code
        log.info("%s disconnected from %s (%s) code %d %s", client.peer, client.path,
                 client.name or client.user_id or "-", code, client.close_reason)


def make_connection(ws: WebSocketConnection, protocol_cls: type[Protocol], ctx, room: str,
                    peer: str, path: str, router: Router, config: Config) -> tuple[Connection, Client]:
    client = Client(protocol_cls, room, peer, path, config.outbox_size, grace=config.close_timeout)
    client.writer = FrameWriter(ws)
    return Connection(ws, protocol_cls(ctx), client, router, config), client
