"""The router's handle on one connection.

The router only ever calls ``deliver`` (non-blocking) and ``kill``
(synchronous): it never awaits a socket. ``deliver`` puts ready frame
bytes into the connection's bounded outbox; when it is full the client is
a slow consumer and is cut off with 1008, without anyone else noticing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from chatd.transport import FrameWriter, Wrote

if TYPE_CHECKING:
    from chatd.protocols.base import Protocol

_ids = itertools.count(1)


class Client:
    __slots__ = (
        "id", "protocol", "room", "name", "display_name", "peer", "path",
        "outbox", "outbox_receive", "outbox_size", "scope", "close_code", "close_reason", "user_id",
        "device_id", "write_scope", "grace", "writer", "writer_idle",
        "spawn_writer",
        "__weakref__",
    )

    def __init__(self, protocol: type[Protocol], room: str, peer: str,
                 path: str, outbox_size: int, grace: float = 2.0) -> None:
        self.id = next(_ids)
        self.protocol = protocol
        self.room = room
        self.peer = peer
        self.path = path
        #: The bounded outbox, opened when a frame first has to wait (most
        #: connections never need one: see ``deliver``).
        self.outbox: trio.MemorySendChannel[bytes | object] | None = None
        self.outbox_receive: trio.MemoryReceiveChannel[bytes | object] | None = None
        self.outbox_size = outbox_size
        self.name: str | None = None
        self.display_name: str | None = None
        self.user_id: str | None = None    # GradAgenda account
        self.device_id: str | None = None  # GradAgenda device
        self.scope = trio.CancelScope()
        #: The scope of a write in progress (shielded); a kill gives it
        #: ``grace`` seconds to finish its frames.
        self.write_scope: trio.CancelScope | None = None
        self.grace = grace
        #: Set by the connection: writes frames synchronously when it can.
        self.writer: FrameWriter | None = None
        #: True while nothing is queued for the writer task, so a frame may
        #: go straight to the socket without overtaking queued ones.
        self.writer_idle = True
        #: How to start the connection's writer task when a frame has to be
        #: queued (it runs exactly while ``writer_idle`` is False).
        self.spawn_writer: Callable[[], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def deliver(self, frame: bytes | object) -> bool:
        """Send or queue a frame without waiting; False if the client is gone or cut off."""
        if self.writer_idle and self.writer is not None and type(frame) is bytes:
            wrote = self.writer.try_write(frame)
            if wrote is Wrote.ALL:
                return True
            if wrote is Wrote.BROKEN:
                self.kill(1006, "connection lost")
                return False
            if wrote is Wrote.PARTIAL:
                frame = b""  # wakes the writer task, which sends the rest first
        if self.outbox is None:
            if self.close_code is not None or self.writer is None:
                return False  # ended, or ending: no outbox to open any more
            self.outbox, self.outbox_receive = trio.open_memory_channel(self.outbox_size)
        try:
            self.outbox.send_nowait(frame)
        except trio.WouldBlock:
            self.kill(1008, "slow consumer")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        if self.writer_idle and self.spawn_writer is not None:
            self.writer_idle = False
            try:
                self.spawn_writer()
            except RuntimeError:  # the connection is ending
                pass
        return True

    def kill(self, code: int, reason: str) -> None:
        """End the connection with ``code``; the first reason given wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self.write_scope is not None:
            self.write_scope.deadline = min(self.write_scope.deadline,
                                            trio.current_time() + self.grace)
        self.scope.cancel()

    def __repr__(self) -> str:
        return f"<{self.protocol.name} #{self.id} {self.peer} {self.name or ''}>"
