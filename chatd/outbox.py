"""The router's handle on one connection: its outbox of frames, flushed once a pass.

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

**A lobby room's fan-out costs nothing per recipient until the flush.**
A frame broadcast to a room's receivers of one protocol (``Receivers``)
is appended once to the room's batch; the flush joins the batch once
and writes the same bytes to each member (one ``write`` each, as
before), counting the room's deliveries once. Only members that must
not get the whole batch (the sender, left out of its own message; one
given a frame of its own since the batch began) take a copy in their
own outbox, so each client still sees its frames in delivery order.

**Answers are paced, not bounded** (the design's rule: "an answer to a
client's own request is paced to what it reads, never a reason to cut it
off"; docs/protocols.md).
An answer sized by the room or the store (a wcp roster, a GradAgenda
listing) is handed over with ``stream``: an iterator of frames that the
connection task makes and writes one chunk at a time, as the socket
drains, outside the slow-consumer count. From the moment the router
hands it over until its last frame is written, everything else for the
client (broadcast traffic) is *held* in order behind it, so the client
sees the answer as of the moment it was asked and every later event
after it; the held frames are the ones bounded (``outbox-size`` frames,
``outbox-size`` x 512 bytes): a client that does not read while its room
is busy is still cut off.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from chatd.logs import client_source

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
    """Connections with frames waiting to be written, in delivery order,
    and lobby rooms' ``Receivers`` that broadcast since the last flush;
    ``deliveries`` counts the frames written, by protocol name (for
    metrics).

    **A pass's share of the slow-consumer bound.** What a room broadcasts
    between two flushes reaches each member in one write, so it must stay
    well under the bound a member is cut off at (``outbox_size`` frames or
    ``outbox_size`` x ``OUTBOX_BYTES_PER_FRAME`` bytes waiting): ``full``
    turns true once the broadcasts since the last flush reach a quarter of
    either (128 frames or 64 KiB by default), and the router then ends its
    pass (``chatd.router``). A count of commands alone let one pass of 128
    messages of 4 KiB hand every member 512 KiB, twice the byte bound, and
    cut off members that were reading."""

    __slots__ = ("dirty", "rooms", "deliveries", "full", "pass_frames", "pass_bytes",
                 "max_pass_frames", "max_pass_bytes")

    def __init__(self, deliveries: Counter[str] | None = None, outbox_size: int = 512) -> None:
        self.dirty: list[Client] = []
        self.rooms: list[Receivers] = []
        self.deliveries: Counter[str] = deliveries if deliveries is not None else Counter()
        #: Frames and bytes broadcast since the last flush, and whether they
        #: reached the pass's share (see above).
        self.full = False
        self.pass_frames = self.pass_bytes = 0
        self.max_pass_frames = max(1, outbox_size // 4)
        self.max_pass_bytes = max(1, outbox_size * OUTBOX_BYTES_PER_FRAME // 4)

    def broadcast(self, frame: bytes) -> None:
        """Count ``frame``, broadcast to a room, against the pass's share."""
        self.pass_frames += 1
        self.pass_bytes += len(frame)
        if self.pass_frames >= self.max_pass_frames or self.pass_bytes >= self.max_pass_bytes:
            self.full = True

    def flush(self) -> None:
        """Write every waiting connection's frames, one write each (a client
        listed twice, or flushed already, has nothing left the second time)."""
        self.full = False
        self.pass_frames = self.pass_bytes = 0
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for client in dirty:
                client.flush()
        if self.rooms:
            rooms, self.rooms = self.rooms, []
            for receivers in rooms:
                receivers.flush()


class Receivers(dict):
    """A lobby room's receivers of one protocol: client id -> ``Client``
    (``add``, ``remove``), and what they are sent in one router pass.

    A frame broadcast to them (``deliver``) is appended once, to the
    room's ``batch``, not to each member's outbox; the flush joins the
    batch once and writes those same bytes to every member that takes
    frames as they come (``plain``: not sealed, no answer being
    streamed). A plain member that must not get the whole batch — the
    sender excluded from its own message, a member given a frame of its
    own since the batch began (an answer, a direct message, a ping), one
    that joined since — is *diverged*: it gets its own copy of the batch
    so far in its outbox, and later frames one by one, in order, until
    the flush. Members behind a streamed answer get each frame held
    (``Client.deliver``); sealed ones get nothing.

    ``protocol`` is the protocol's name (the deliveries count)."""

    __slots__ = ("protocol", "plain", "holding", "batch", "diverged", "flusher", "marked")

    def __init__(self, protocol: str) -> None:
        super().__init__()
        self.protocol = protocol
        #: Members taking frames as they come (the batch is theirs).
        self.plain: dict[Client, None] = {}
        #: Members behind a streamed answer.
        self.holding: dict[Client, None] = {}
        #: Frames broadcast since the last flush, in order.
        self.batch: list[bytes] = []
        #: Plain members with their own copy of the batch (see above).
        self.diverged: dict[Client, None] = {}
        self.flusher: Flusher | None = None
        #: True while listed in the flusher's ``rooms``.
        self.marked = False

    def add(self, client: Client) -> None:
        self[client.id] = client
        client.receivers = self
        self.flusher = client.flusher
        self.place(client)

    def remove(self, client: Client) -> bool:
        """Forget ``client``; False if it was not here. What it was sent
        before is still written by the next flush."""
        if self.pop(client.id, None) is None:
            return False
        self._unplain(client)
        self.holding.pop(client, None)
        if client.receivers is self:
            client.receivers = None
        return True

    def place(self, client: Client) -> None:
        """Put ``client`` where its state says (called when it changes:
        joined, an answer streamed or done, sealed)."""
        if client.sealed:
            self._unplain(client)
            self.holding.pop(client, None)
        elif client.streams is not None:
            self._unplain(client)
            self.holding[client] = None
        else:
            self.holding.pop(client, None)
            if client not in self.plain:
                self.plain[client] = None
                if self.batch:  # the batch so far was sent before it came
                    self.diverged[client] = None

    def _unplain(self, client: Client) -> None:
        """``client`` stops taking the batch: what was broadcast so far goes
        to its own outbox, for the next flush."""
        if client not in self.plain:
            return
        del self.plain[client]
        if client in self.diverged:
            del self.diverged[client]  # its outbox has its frames already
        elif self.batch:
            client.queue(self.batch)
        if client.pending:
            client.flusher.dirty.append(client)

    def diverge(self, client: Client) -> None:
        """``client`` (plain) is about to get a frame of its own, or to be
        left out of one: from now on its outbox holds its frames, the
        batch so far first."""
        if client in self.plain and client not in self.diverged:
            self.diverged[client] = None
            if self.batch:
                client.queue(self.batch)

    def deliver(self, frame: bytes, exclude: Client | None = None) -> None:
        """Every member but ``exclude`` gets ``frame`` (bytes of whole frames)."""
        if self.flusher is not None:
            self.flusher.broadcast(frame)
        if self.plain:
            diverged = self.diverged
            if exclude is not None and exclude not in diverged:
                self.diverge(exclude)
            self.batch.append(frame)
            if diverged:
                for client in diverged:
                    if client is not exclude:
                        client.queue((frame,))
            if not self.marked:
                self.marked = True
                self.flusher.rooms.append(self)
        if self.holding:
            for client in list(self.holding):
                if client is not exclude:
                    client.deliver(frame)

    def flush(self) -> None:
        """Write the batch to each plain member, one write each, joined once;
        the diverged ones write their own outboxes."""
        self.marked = False
        batch, diverged = self.batch, self.diverged
        if batch:
            self.batch = []
            count = len(batch)
            data = batch[0] if count == 1 else b"".join(batch)
            written = 0
            for client in self.plain:
                if client in diverged:
                    continue
                if client.pending is not None:  # its own frames from before the batch
                    client.flush()
                transport = client.transport
                written += 1
                if not transport.write(data, count):
                    client.kill(1006, "connection lost")
                elif transport.waiting_frames and (  # (0 unless the kernel left some)
                        transport.waiting_frames > client.outbox_size
                        or transport.waiting_bytes > client.outbox_size * OUTBOX_BYTES_PER_FRAME):
                    client.kill(1008, "slow consumer")
            self.flusher.deliveries[self.protocol] += written * count
        if diverged:
            self.diverged = {}
            for client in diverged:
                client.flush()


class Client:
    __slots__ = (
        "id", "protocol", "room", "name", "display_name", "peer", "path", "user_id",
        "device_id", "transport", "flusher", "pending", "outbox_size", "scope",
        "close_code", "close_reason", "_sealed", "in_flight", "answers_wanted", "streams",
        "held", "held_bytes", "log_source", "receivers", "__weakref__",
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
        #: Who the lines logged on this client's behalf are charged to
        #: (chatd.logs.charged_to): its connection task's, made there.
        self.log_source = client_source.get()
        self.transport = transport
        self.flusher = flusher
        #: Frames delivered since the last flush, or None.
        self.pending: list[bytes] | None = None
        #: The lobby room's ``Receivers`` this client is one of, or None.
        self.receivers: Receivers | None = None
        self.outbox_size = outbox_size
        self.scope = trio.CancelScope()
        self.close_code: int | None = None
        self.close_reason = ""
        self._sealed = False
        #: ``Answered`` commands of this client not answered yet, and the
        #: event its connection waits on when too many are.
        self.in_flight = 0
        self.answers_wanted: trio.Event | None = None
        #: Answers (iterators of frame payloads) not written yet, oldest
        #: first, or None; while there are some, other frames are ``held``.
        self.streams: deque[Iterator[bytes]] | None = None
        #: Frames delivered behind a streamed answer, and their bytes.
        self.held: list[bytes] | None = None
        self.held_bytes = 0

    @property
    def sealed(self) -> bool:
        """True once the close frame is queued: nothing more is accepted."""
        return self._sealed

    @sealed.setter
    def sealed(self, value: bool) -> None:
        self._sealed = value
        if self.receivers is not None:
            self.receivers.place(self)

    def deliver(self, frame: bytes) -> bool:
        """Queue a frame for the next flush; False if the client is gone or cut off.

        Behind an answer still being streamed, the frame is held instead;
        past the slow-consumer bound, the client is cut off (1008)."""
        if self._sealed:
            return False
        if self.streams is not None:
            return self._hold(frame)
        return self.deliver_now(frame)

    def _hold(self, frame: bytes) -> bool:
        held = self.held
        if held is None:
            held = self.held = []
        held.append(frame)
        self.held_bytes += len(frame)
        if (len(held) > self.outbox_size
                or self.held_bytes > self.outbox_size * OUTBOX_BYTES_PER_FRAME):
            self.kill(1008, "slow consumer")
            return False
        return True

    def deliver_now(self, frame: bytes) -> bool:
        """Queue a frame for the next flush even behind a streamed answer
        (control frames: a keepalive ping may go between any two frames)."""
        if self._sealed:
            return False
        receivers = self.receivers
        if receivers is not None and receivers.batch:
            receivers.diverge(self)  # after what its room was sent so far
        pending = self.pending
        if pending is None:
            self.pending = [frame]
            self.flusher.dirty.append(self)
        else:
            pending.append(frame)
        return True

    def queue(self, frames: Iterable[bytes]) -> None:
        """Append ``frames`` to the outbox (``Receivers``: a diverged
        member's copy of its room's frames; its room's flush writes it)."""
        pending = self.pending
        if pending is None:
            self.pending = list(frames)
        else:
            pending.extend(frames)

    def stream(self, frames: Iterable[bytes]) -> None:
        """Hand over an answer to this client's own request: ``frames``
        (UTF-8 JSON payloads, made lazily) are written by the connection
        task as the client reads, never counted as a slow consumer's
        backlog; what is delivered from now on waits behind them. Called
        in the router task, at the moment the answer is decided."""
        if self._sealed:
            return
        if self.streams is None:
            self.streams = deque()
            if self.receivers is not None:
                self.receivers.place(self)  # broadcasts are held from now on
        self.streams.append(iter(frames))

    def release_held(self) -> None:
        """The answers are written (or abandoned): the frames held behind
        them go out now, in order, and count as a backlog again."""
        self.streams = None
        held, self.held, self.held_bytes = self.held, None, 0
        for frame in held or ():
            self.deliver_now(frame)
        if self.receivers is not None:
            self.receivers.place(self)

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
        count = len(pending)
        self.flusher.deliveries[self.protocol.name] += count
        data = pending[0] if count == 1 else b"".join(pending)
        transport = self.transport
        if not transport.write(data, count):
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
