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

    client: Any = None  # chatd.client.Client, set by the connection task


class Request(Command, kw_only=True):
    """A command whose result the connection waits for."""

    reply: Any = None  # set by Router.call


# --- lobby commands --------------------------------------------------------


class Join(Request, kw_only=True):
    """Enter the endpoint's lobby room and start receiving its events.

    ``name`` is the sender name used on this connection's messages.
    ``register`` claims it in the room's name registry (socialvp, wcp):
    the result is False when another client holds it. ``announce`` makes
    the join (and later the leave) visible to clients that track presence.
    """

    name: str | None = None
    display_name: str | None = None
    register: bool = False
    announce: bool = False


class Publish(Command, kw_only=True):
    """A message to everyone in the sender's lobby room.

    ``sender`` overrides the joined name (wschat names each message).
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
