"""The router's handle on one connection.

The router only ever calls ``deliver`` (non-blocking), ``kill``
(synchronous) and ``answer``: it never awaits a socket. ``deliver``
collects frame bytes; whoever is running — the router at the end of each
pass over its queue, a connection task after each frame it handles —
calls ``Flusher.flush`` once, and each connection's frames then leave in
one write. So a burst of events bound for one connection costs one
``send`` instead of one per frame, and a single event on a quiet server
still leaves at once (its pass is one command long).

A connection with more than ``outbox-size`` frames (or ``outbox-size`` x
512 bytes) that the kernel would not take is a slow consumer and is cut
off with 1008, without anyone else noticing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from chatd.protocols.base import Output, Protocol
    from chatd.transport import Transport

_ids = itertools.count(1)

#: A slow consumer is also cut off past ``outbox-size`` x this many bytes
#: waiting (256 KiB by default): frames may be up to ``max-frame-bytes``
#: each, and a count alone would let one reader that never reads hold
#: megabytes.
OUTBOX_BYTES_PER_FRAME = 512


class Flusher:
    """Connections with frames waiting to be written, in delivery order;
    ``deliveries`` counts the frames written, by protocol (for metrics)."""

    __slots__ = ("dirty", "deliveries")

    def __init__(self, deliveries: Counter[str] | None = None) -> None:
        self.dirty: list[Client] = []
        self.deliveries: Counter[str] = deliveries if deliveries is not None else Counter()

    def flush(self) -> None:
        """Write every waiting connection's frames, one write each."""
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            client.flush()


class Client:
    __slots__ = (
        "id", "protocol", "room", "name", "display_name", "peer", "path", "user_id",
        "device_id", "transport", "flusher", "pending", "outbox_size", "scope",
        "close_code", "close_reason", "sealed", "in_flight", "answers_wanted", "__weakref__",
    )

    def __init__(self, protocol: type[Protocol], room: str, peer: str, path: str,
                 outbox_size: int, transport: Transport | None, flusher: Flusher) -> None:
        self.id = next(_ids)
        self.protocol = protocol
        self.room = room
        self.peer = peer
        self.path = path
        self.name: str | None = None
        self.display_name: str | None = None
        self.user_id: str | None = None    # GradAgenda account
        self.device_id: str | None = None  # GradAgenda device
        self.transport = transport
        self.flusher = flusher
        #: Frames delivered since the last flush, or None.
        self.pending: list[bytes] | None = None
        self.outbox_size = outbox_size
        self.scope = trio.CancelScope()
        self.close_code: int | None = None
        self.close_reason = ""
        #: True once the close frame is queued: nothing more is accepted.
        self.sealed = False
        #: ``Answered`` commands of this client not answered yet, and the
        #: event its connection waits on when too many are.
        self.in_flight = 0
        self.answers_wanted: trio.Event | None = None

    def deliver(self, frame: bytes) -> bool:
        """Queue a frame for the next flush; False if the client is gone or cut off."""
        if self.sealed:
            return False
        pending = self.pending
        if pending is None:
            self.pending = [frame]
            self.flusher.dirty.append(self)
        else:
            pending.append(frame)
        return True

    def answered(self, frame: bytes | None) -> None:
        """Deliver the one answer to an ``Answered`` command of this client."""
        if frame is not None:
            self.deliver(frame)
        self.in_flight -= 1
        if self.answers_wanted is not None:
            self.answers_wanted.set()
            self.answers_wanted = None

    def flush(self) -> None:
        """Write the frames delivered since the last flush, in one write."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        self.flusher.deliveries[self.protocol.name] += len(pending)
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        transport = self.transport
        if not transport.write(data, len(pending)):
            self.kill(1006, "connection lost")
        elif (transport.waiting_frames > self.outbox_size
              or transport.waiting_bytes > self.outbox_size * OUTBOX_BYTES_PER_FRAME):
            self.kill(1008, "slow consumer")

    def answer(self, command: Any, result: Any) -> list[Output]:
        """Turn the router's result for this client's request into outputs:
        frames for the client are delivered now, in router order (so an
        auth answer precedes every event that follows it); the outputs
        returned are for the connection task. See ``Connection.answer``."""
        return []

    def kill(self, code: int, reason: str) -> None:
        """End the connection with ``code``; the first reason given wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.scope.cancel()

    def __repr__(self) -> str:
        return f"<{self.protocol.name} #{self.id} {self.peer} {self.name or ''}>"
