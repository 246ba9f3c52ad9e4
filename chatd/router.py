"""The central router task: one channel of commands in, frames out.

Every command from every connection arrives on one memory channel and is
handled to completion, synchronously, before the next: router state needs
no locks, and the router never awaits a client socket. Services (the
lobby, GradAgenda sessions) own their state and register a handler per
command type.

The router works in passes: it waits for one command, then handles what
else is already queued (up to ``pass_size``), then flushes every
connection it delivered to, once (``chatd.outbox.Flusher``). Under load
several events leave in one write per connection; on a quiet server a
pass is one command and nothing waits. A pass also ends once its
broadcasts reach a quarter of the slow-consumer bound (``Flusher.full``:
``outbox-size`` / 4 frames or ``outbox-size`` x 128 bytes, 128 frames or
64 KiB by default), so a client that reads takes a pass's write
without nearing that bound, whatever the messages' size; a busy publisher's one read
(16 KiB, ~100 chat messages) fits in one pass, so a room's members get
its messages in one write each (64 made ~63 frames a write, 128 ~104:
docs/performance.md, "Third round").

A handler returns the result of a ``Request`` at once, or ``DEFERRED``
when the answer comes later (after a store commit, say); it then calls
``router.resolve(command, result)`` itself. Resolving runs the asking
protocol's ``on_result`` here, in the router task, so the frames it
answers with are queued before any later event for that client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from chatd.outbox import Flusher
from chatd.events import Command, Request

log = logging.getLogger("chatd.router")

DEFERRED = object()
#: A guard's answer that lets the command go on to its handler.
PASS = object()


class RouterError(RuntimeError):
    """The router failed while handling this connection's request."""


def _about(command: Command) -> dict:
    """A line's ``peer`` field: the client a command came from (its log
    lines count against that client's, chatd.logs)."""
    peer = getattr(command.client, "peer", None)
    return {"peer": peer} if isinstance(peer, str) else {}


class _Reply:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()


class Service:
    """A part of the router's work: the lobby, GradAgenda sessions, the
    cluster, moderation. The server calls, for every service in order:
    ``install`` (register command handlers and guards) and ``run`` (in its
    nursery, before the listener opens; cancelled last, once the router
    has drained) at start; ``ready`` for /readyz; ``aclose`` at shutdown.
    The defaults do nothing."""

    def install(self, router: Router) -> None:
        pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def ready(self) -> str | None:
        """None if the service can do its work now, else why not."""
        return None

    async def aclose(self) -> None:
        pass

    # --- several nodes (``chatd.cluster`` calls these; docs/cluster.md) -----------

    def remote_items(self) -> dict[type, Callable[[Any, Any], None]]:
        """What this service handles of what other nodes publish: item type
        (``chatd.broker.wire``) -> ``handler(remote, item)``, where
        ``remote`` is the ``chatd.broker.base.Remote`` that carried it
        (origin node, its boot, the channel's user). One service per type;
        what a service publishes it sends with ``Broker.publish``."""
        return {}

    def broker_up(self) -> None:
        """The broker delivers (first, and after every outage)."""

    def broker_down(self) -> None:
        """The broker stopped delivering (an outage)."""

    def subscribed(self, users: list[str]) -> None:
        """The channels of ``users`` deliver now."""

    def node_gone(self, node: str, boot: str) -> None:
        """``node``'s process ``boot`` died, restarted or stopped."""


class Router:
    def __init__(self, flusher: Flusher | None = None, buffer: int = 4096,
                 pass_size: int = 128) -> None:
        self._send, self._recv = trio.open_memory_channel[Command](buffer)
        #: What ``_dispatch`` calls: each handler, behind its guard if any.
        self._handlers: dict[type, Callable[[Any], Any]] = {}
        self._plain: dict[type, Callable[[Any], Any]] = {}
        self._guards: dict[type, Callable[[Any], Any]] = {}
        self.flusher = flusher if flusher is not None else Flusher()
        self.pass_size = pass_size
        #: Set once ``run`` has handled every command and returned.
        self.closed = trio.Event()

    def handle(self, command_type: type[Command], handler: Callable[[Any], Any]) -> None:
        """``handler(command)`` handles every ``command_type`` command."""
        self._plain[command_type] = handler
        self._compose(command_type)

    def guard(self, command_type: type[Command], check: Callable[[Any], Any]) -> None:
        """``check(command)`` runs before the handler of ``command_type``
        (moderation's rules): it returns ``PASS`` to let the handler run,
        else the command's result. One guard per command type."""
        self._guards[command_type] = check
        self._compose(command_type)

    def _compose(self, command_type: type) -> None:
        handler = self._plain.get(command_type)
        check = self._guards.get(command_type)
        if handler is None:
            return
        if check is None:
            self._handlers[command_type] = handler
            return

        def guarded(command: Any) -> Any:
            result = check(command)
            return handler(command) if result is PASS else result

        self._handlers[command_type] = guarded

    @property
    def queued(self) -> int:
        """Commands waiting for the router (the queue depth)."""
        return self._send.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        receive, receive_nowait = self._recv.receive, self._recv.receive_nowait
        flusher = self.flusher
        dispatch, flush = self._dispatch, flusher.flush
        try:
            async with self._recv:
                while True:
                    try:
                        command = await receive()
                    except trio.EndOfChannel:
                        break
                    dispatch(command)
                    for _ in range(self.pass_size - 1):
                        if flusher.full:  # the pass's share of the slow-consumer bound
                            break
                        try:
                            command = receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        dispatch(command)
                    flush()
        finally:
            self.flusher.flush()
            self.closed.set()

    def _dispatch(self, command: Command) -> None:
        try:
            result = self._handlers[type(command)](command)
        except Exception as exc:
            log.exception("router failed on %s from %r", type(command).__name__, command.client,
                          extra=_about(command))
            result = RouterError(f"{type(command).__name__}: {exc}")
        if result is not DEFERRED:
            self.resolve(command, result)

    @staticmethod
    def resolve(command: Command, result: Any) -> None:
        """Answer a ``Request`` (at once, or later if it was ``DEFERRED``)."""
        reply = getattr(command, "reply", None)
        if reply is None or reply.event.is_set():
            return
        if isinstance(result, RouterError):
            reply.set(result)
            return
        try:
            reply.set(command.client.answer(command, result))
        except Exception as exc:
            log.exception("answering %s failed for %r", type(command).__name__, command.client,
                          extra=_about(command))
            reply.set(RouterError(f"{type(command).__name__}: {exc}"))

    async def send(self, command: Command) -> None:
        """Queue a command; waits only while the router's queue is full."""
        await self._send.send(command)

    def post(self, command: Command) -> None:
        """Queue a command from synchronous code; raises trio.WouldBlock if full."""
        self._send.send_nowait(command)

    async def call(self, command: Request) -> Any:
        """Queue a request and wait for its answer: the outputs left for the
        connection task once ``Client.answer`` has delivered the frames."""
        reply = command.reply = _Reply()
        await trio.lowlevel.checkpoint_if_cancelled()  # as send: nothing queued if cancelled
        try:
            self._send.send_nowait(command)  # the wait for the reply is the schedule point
        except trio.WouldBlock:
            await self._send.send(command)
        await reply.event.wait()
        if isinstance(reply.value, RouterError):
            raise reply.value
        return reply.value

    def close(self) -> None:
        """No more commands: ``run`` returns once the queue is drained."""
        self._send.close()
