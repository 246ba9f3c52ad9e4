"""The internal model: commands to the router and events from it.

Connection tasks turn decoded frames into *commands* (tagged msgspec
structs) and send them to the router over one memory channel. The router
answers with *events*, which each protocol module encodes once into its
own wire format (``Protocol.encode``), and hands the bytes to every
recipient's outbox. Protocol modules build commands without knowing the
connection; the connection fills in ``client`` before sending.

Commands that need an answer before the connection reads its next frame
(a name claim, for instance) derive from ``Request``; the router returns
their result to the waiting connection, which passes it to
``Protocol.on_result``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Command(msgspec.Struct, tag=True, kw_only=True):
    """Something a connection asks of the router."""

    client: Any = None  # chatd.outbox.Client, set by the connection task


class Request(Command, kw_only=True):
    """A command whose result the connection waits for."""

    reply: Any = None  # set by Router.call


# --- lobby commands --------------------------------------------------------


class Join(Request, kw_only=True):
    """Enter the endpoint's lobby room and start receiving its events.

    ``name`` is the sender name used on this connection's messages.
    ``register`` claims it in the room's name registry (every protocol's
    sender names): the result is False when another client holds it. ``announce`` makes
    the join (and later the leave) visible to clients that track presence.

    Names are compared as ``chatd.names`` says (look-alikes collide);
    ``display_name`` is claimed with ``name``. Every protocol asks for its
    claims to be announced, since every held name can appear on messages
    (a wschat ``usr`` claimed by ``Publish`` is announced too). ``roster``
    asks for a ``UserJoined`` for each name already held in the room,
    delivered to this client alone before the result (wcp). ``shared``
    lets other clients that claim the same name with ``shared`` (shown
    exactly alike) hold it too (multichat bridges, as the original server).
    """

    name: str | None = None
    display_name: str | None = None
    register: bool = False
    announce: bool = False
    roster: bool = False
    shared: bool = False


class Publish(Command, kw_only=True):
    """A message to everyone in the sender's lobby room.

    ``sender`` overrides the joined name (wschat names each message): the
    lobby claims it for the connection first, and drops the message if
    another connection holds it.
    ``client_timestamp`` is relayed where the protocol has a time field.
    """

    payload: Any
    sender: str | None = None
    client_timestamp: float | int | None = None


class SendDirect(Request, kw_only=True):
    """A message to the client holding ``to`` in the room's registry.

    The result is False when nobody holds that name.
    """

    to: str
    payload: Any


class Leave(Command, kw_only=True):
    """Stop receiving and give up the name; sent on disconnect too."""


# --- events ----------------------------------------------------------------


class Event(msgspec.Struct, tag=True, kw_only=True):
    """Something the router tells clients; encoded once per protocol."""


class Message(Event, kw_only=True):
    room: str
    sender: str | None
    payload: Any
    time_ns: int
    client_timestamp: float | int | None = None


class Direct(Event, kw_only=True):
    sender: str
    to: str
    payload: Any
    time_ns: int


class UserJoined(Event, kw_only=True):
    name: str
    display_name: str | None = None


class UserLeft(Event, kw_only=True):
    name: str


def payload_text(payload: Any) -> str:
    """A payload as a string, for protocols whose text field is a string."""
    if isinstance(payload, str):
        return payload
    return msgspec.json.encode(payload).decode()


# --- GradAgenda sessions (chatd.sessions) ----------------------------------
#
# Answers that only the asker gets (direct session info, listing, history)
# are ``Request`` results the protocol frames itself. Changes that fan out
# (session created/modified/deleted, a message) are plain commands: the
# connection keeps reading (clients pipeline), and chatd.sessions delivers
# the answer, success or failure, after the store has committed.


class Login(Request, kw_only=True):
    """A GradAgenda connection proved (by token) that it is ``user_id``;
    answered once its device receives the user's sessions' events."""

    cdid: str
    user_id: str
    device_id: str


class Logout(Command, kw_only=True):
    """A logged-in GradAgenda connection went away."""


class DirectSessionInfo(Request, kw_only=True):
    """The direct session with ``peer``; result: ``SessionInfo`` or an error text."""

    cdid: str
    peer: str


class Answered(Command, kw_only=True):
    """A command answered later (after a store commit) with exactly one
    frame to its asker, through ``Client.answered``. The connection counts
    those in flight and reads no further while too many are (a client that
    pipelines faster than it reads is slowed, not cut off)."""


class CreateSession(Answered, kw_only=True):
    cdid: str
    members: list[str]


class ModifySession(Answered, kw_only=True):
    """``admins``: the new admin list (issue 23), None to leave it as it is."""

    cdid: str
    session_id: str
    members: list[str]
    admins: list[str] | None = None


class DeleteSession(Answered, kw_only=True):
    cdid: str
    session_id: str


class ListSessions(Request, kw_only=True):
    """The asker's group sessions; result: a list of ``SessionInfo``."""

    cdid: str


class SendMessage(Answered, kw_only=True):
    """``message`` is the validated message object as JSON (``msgspec.Raw``)."""

    cdid: str
    session_id: str
    message: Any
    sender_timestamp: int


class ReadHistory(Request, kw_only=True):
    """Stored messages; result: a list of ``StoredMessage`` or an error text."""

    cdid: str
    session_id: str
    before: int | None = None
    after: int | None = None
    limit: int = 100


class Status(Event, kw_only=True):
    """The outcome of one GradAgenda action, for its asker."""

    cdid: Any
    ok: bool
    message: str | None = None


class Refused(Event, kw_only=True):
    """An operator's rule refused what the client did (``chatd.moderation``,
    docs/api.md), in each protocol's own error form: ``message`` where the
    protocol has an error text (wcp ``error``; GradAgenda a failed
    ``status-response`` echoing ``cdid``), ``sentence`` for socialvp's
    ``outcome`` 403 (its original server's style, "Banned: spam!").
    multichat and wschat have no error form: nothing is sent."""

    message: str
    sentence: str
    cdid: Any = None


class SessionInfo(Event, kw_only=True):
    """``kind`` is "direct" or "mutable"; ``status`` "created", "modified",
    "deleted" or "unchanged". ``cdid`` is set on the asker's copy only."""

    session_id: str
    kind: str
    status: str
    members: list[str]
    cdid: Any = None
    #: A group's owners and admins (issue 23; chatd.roles); None for direct sessions.
    owners: list[str] | None = None
    admins: list[str] | None = None


class StoredMessage(Event, kw_only=True):
    """A committed message: ``seq`` counts from 1 per session; times in ms."""

    session_id: str
    seq: int
    sender_id: str
    message: Any  # msgspec.Raw: the message object as stored
    sender_timestamp: int
    server_timestamp: int
    cdid: Any = None


# --- GradAgenda delivery and read marks (issue 23; chatd.marks) -------------------


class MarkMessages(Answered, kw_only=True):
    """The asker's device got (``delivered``) / the person read (``read``)
    the session's messages up to these seqs; None: not reported."""

    cdid: str
    session_id: str
    delivered: int | None = None
    read: int | None = None


class ReadMarksSetting(Answered, kw_only=True):
    """Whether the asker's read marks are shown to others."""

    cdid: str
    enabled: bool


class ListMarks(Request, kw_only=True):
    """The session's marks; result: a list of ``MarksInfo`` or an error text."""

    cdid: str
    session_id: str


class FlushMarks(Command, kw_only=True):
    """Time to tell members' devices the marks that moved."""


class Mark(msgspec.Struct, array_like=True):
    user: str
    delivered: int
    read: int | None


class MarksInfo(Event, kw_only=True):
    """Marks of some members of a session (``read`` None: not shown)."""

    session_id: str
    marks: list[Mark]
    cdid: Any = None
