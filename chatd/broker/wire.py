"""What crosses nodes: envelopes and their encoding (JSON, via msgspec).

One Redis message (a pub/sub payload) is one ``Batch``: the node that
sent it (``origin``, the config's ``node-id``), that process's ``boot`` (a
random id per start, so a node restarted with the same id is told apart
from its previous life) and the ``items`` queued for one channel, in the
order the node queued them. JSON so that an operator can read the
traffic with ``redis-cli subscribe``; docs/cluster.md lists every item.

``decode`` is the one decoder for anything read from Redis: it answers
``WireError`` for every payload it cannot use (not JSON, wrong shape,
nested too deep), never anything else; it is fuzzed like the protocol
decoders (tests/test_cluster_wire.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from chatd.protocols.base import MAX_JSON_DEPTH, too_deep


class Item(msgspec.Struct, tag_field="t", tag=str.lower, kw_only=True, omit_defaults=True):
    """One event for other nodes."""


# --- lobby rooms (channel chatd:room:ROOM) --------------------------------------


class Member(msgspec.Struct, array_like=True):
    """A name held on the origin node: its holder's ``client`` id there, the
    name and display name as shown, the holder's protocol, whether its
    join and leave are announced (``Join.announce``), and whether other
    ``shared`` holders of the name, shown exactly alike, may hold it too
    (``Join.shared``: multichat bridges). A node that predates ``shared``
    ignores it (msgspec reads the first five fields of a longer array)."""

    client: int
    name: str
    display_name: str | None
    protocol: str
    announce: bool
    shared: bool = False


class Said(Item, kw_only=True):
    """A lobby message published on the origin (``chatd.events.Message``)."""

    room: str
    sender: str | None
    payload: Any
    time_ns: int
    client_timestamp: float | int | None = None


class Joined(Item, kw_only=True):
    """A name claimed on the origin. ``version`` counts the origin's presence
    changes in ``room`` (1, 2, ...), so a receiver notices one it missed."""

    room: str
    member: Member
    version: int


class Left(Item, kw_only=True):
    """The origin's ``client`` gave up its name in ``room``."""

    room: str
    client: int
    version: int


class Presence(Item, kw_only=True):
    """Every name the origin holds in ``room`` now, at ``version``: the
    receiver replaces what it knew of the origin's members there."""

    room: str
    version: int
    members: list[Member]


# --- one node (channel chatd:node:NODE) --------------------------------------------


class Whisper(Item, kw_only=True):
    """A direct message (socialvp ``message``) for the origin of a ``Member``:
    its ``client`` in ``room``, holding the name ``to``."""

    room: str
    client: int
    sender: str
    to: str
    payload: Any
    time_ns: int


class SyncRequest(Item, kw_only=True):
    """Asks the receiving node(s) for a ``Presence`` of each of ``rooms``
    (all rooms they serve when empty), sent on the asker's node channel."""

    rooms: list[str] = []


# --- every node (channel chatd:cluster) ----------------------------------------------


class Heartbeat(Item, kw_only=True):
    """Sent every ``heartbeat`` seconds. ``rooms``: the origin's presence
    version per lobby room it serves. A node's own heartbeat coming back is
    its liveness probe."""

    rooms: dict[str, int] = {}


class Bye(Item, kw_only=True):
    """The origin is stopping (SIGTERM): it has released its names and
    sends nothing more; the receivers forget it at once (its names are
    announced gone) instead of waiting for its silence."""


class SessionChanged(Item, kw_only=True):
    """A GradAgenda session was created, modified or deleted on the origin
    (committed). ``members`` are the members now (before, for "deleted"),
    ``old_members`` those before a modification. ``seq`` is the session's
    last message ``seq`` when the change committed: messages after it
    are for the new members. ``version``: the store's count of the
    session's membership changes after this one (0 before any)."""

    session_id: str
    kind: str
    status: str
    members: list[str]
    old_members: list[str] = []
    seq: int = 0
    version: int = 0
    #: A group's owners and admins after the change (issue 23; chatd.roles).
    roles: dict[str, str] = {}


class MarksMoved(Item, kw_only=True):
    """GradAgenda delivery and read marks the origin stored and flushed
    (issue 23; chatd.marks): ``marks`` are ``[user, delivered, read]``,
    ``read`` null when that user does not show read marks."""

    session_id: str
    marks: list[tuple[str, int, int | None]]


# --- one GradAgenda user (channel chatd:user:USER) ---------------------------------------


class Stored(Item, kw_only=True):
    """A committed GradAgenda message (``chatd.events.StoredMessage``) for
    the user whose channel carries it. ``message`` is the message object as
    the sender wrote it (JSON)."""

    session_id: str
    seq: int
    sender_id: str
    message: msgspec.Raw
    sender_timestamp: int
    server_timestamp: int


# --- moderation (channel chatd:cluster; chatd.moderation) ---------------------------------


class Moderated(Item, kw_only=True):
    """An operator's action, for every node to carry out: ``op`` is
    ``rule`` (a ban or mute added: ``rule`` is its stored row as a list),
    ``unrule`` (rules ``ids`` lifted) or ``disconnect`` (the connections
    ``target`` ``value`` names, closed with ``code`` and ``reason``)."""

    op: str
    rule: list[Any] = []
    ids: list[str] = []
    target: str = ""
    value: str = ""
    code: int = 1008
    reason: str = ""


AnyItem = (Said | Joined | Left | Presence | Whisper | SyncRequest | Heartbeat | Bye
           | SessionChanged | Stored | Moderated | MarksMoved)


class Batch(msgspec.Struct, kw_only=True):
    """One pub/sub payload."""

    origin: str
    boot: str
    items: list[AnyItem]


class WireError(ValueError):
    """A payload from the broker that is not a ``Batch``."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Batch)


def encode(origin: str, boot: str, items: list[Item]) -> bytes:
    """One payload carrying ``items`` (in order)."""
    return _encoder.encode(Batch(origin=origin, boot=boot, items=items))


def own_prefix(origin: str, boot: str) -> bytes:
    """How every payload ``encode`` makes for ``origin`` and ``boot``
    begins (its fields are encoded in their order), so a node can tell its
    own payloads without decoding them."""
    empty = encode(origin, boot, [])
    assert empty.endswith(b"[]}")
    return empty[:-2]


def decode(data: bytes | str) -> Batch:
    """The ``Batch`` in ``data``; raises ``WireError`` (saying why) for
    anything else, including JSON nested deeper than
    ``chatd.protocols.base.MAX_JSON_DEPTH`` levels."""
    try:
        if isinstance(data, bytes):
            data = data.decode()
        brackets = data.count("[") + data.count("{")
        if brackets <= MAX_JSON_DEPTH:
            return _decoder.decode(data)  # too few brackets to nest too deep
        try:
            batch = _decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            batch = None
        if batch is None or not _stored_within(batch, brackets):
            if too_deep(data):
                raise WireError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if batch is None:
                return _decoder.decode(data)  # raises, saying why
        return batch
    except (msgspec.MsgspecError, UnicodeError, RecursionError) as exc:
        raise WireError(str(exc)) from None


#: How deep a ``Stored`` item's message sits in a batch: the batch's
#: object, its items' array, the item's object.
_STORED_DEPTH = 3


def _stored_within(batch: Batch, brackets: int) -> bool:
    """True if ``batch``, decoded from a payload with ``brackets`` opening
    brackets, is GradAgenda messages only (the bulk of the traffic) and
    certainly nests within the limit: each message has too few brackets
    to nest deeper than the limit allows below the envelope, and the
    envelope's own (one per item, two around them) account for all the
    others, so nothing else in the payload (an unknown field) nests. Then
    ``too_deep``'s scan of the whole payload, which costs twice its decode,
    is not needed. False: let it decide (it may still pass)."""
    limit = MAX_JSON_DEPTH - _STORED_DEPTH
    counted = 2
    for item in batch.items:
        if type(item) is not Stored:
            return False
        message = bytes(item.message)
        inner = message.count(b"[") + message.count(b"{")
        if inner > limit:
            return False
        counted += 1 + inner
    return counted == brackets
