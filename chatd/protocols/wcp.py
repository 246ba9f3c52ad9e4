"""wcp: the draft "WebSocket Chat Protocol" — user_joined, message, user_left.

The first frame must be ``user_joined`` (the auth stage): its ``user_id``
is claimed in the lobby's name registry (shared with socialvp) and bound
to the connection, so later frames cannot speak for anyone else: relayed
``message``s carry the bound ``user_id`` whatever the client wrote.
``user_left`` (own id only) is relayed and the server then closes with
1000; a client that just disconnects is announced the same way, by the
lobby. Invalid input is answered with an ``error`` and the connection is
kept.

Names follow ``chatd.names``: ``user_id`` and ``display_name`` must be
valid names, are shown in their normalised form, and both are held in
the room's registry, so a name that is taken or looks like a taken one
(``Alice``, ``аlice`` with a Cyrillic a) gets ``user_id already in use``.
A refused ``user_joined`` before the first success is reported
(``AuthFailed``). An accepted join is followed by one ``user_joined`` for
every named client already in the room (chatd's extension: a roster).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from chatd import names
from chatd.events import (
    Command, Direct, Event, Join, Leave, Message, Publish, Refused, UserJoined, UserLeft, payload_text,
)
from chatd.protocols.base import (
    AuthFailed, Close, NotJSON, Output, Protocol, SafeFloat, SafeInt, Send, WrongShape, decode,
    dumps,
)

log = logging.getLogger("chatd.wcp")


class ChatMessage(msgspec.Struct, tag_field="type", tag="message"):
    data: str
    timestamp: SafeInt | SafeFloat | None = None  # relayed as sent


class UserJoinedFrame(msgspec.Struct, tag_field="type", tag="user_joined"):
    user_id: str
    display_name: str


class UserLeftFrame(msgspec.Struct, tag_field="type", tag="user_left"):
    user_id: str


Incoming = ChatMessage | UserJoinedFrame | UserLeftFrame
_decoder = msgspec.json.Decoder(Incoming)


def error(message: str) -> Send:
    return Send(dumps({"type": "error", "message": message}))


INVALID = error("Invalid message format")
JOIN_FIRST = error("send user_joined first")
ID_TAKEN = error("user_id already in use")
EMPTY_ID = error("user_id must not be empty")
NOT_YOURS = error("user_left must carry your own user_id")


class Wcp(Protocol):
    name = "wcp"
    auth_stage = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        #: The user_id as shown to everyone (normalised), once joined.
        self.user_id: str | None = None

    def receive(self, text: str) -> list[Output]:
        try:
            frame = decode(_decoder, text)
        except (NotJSON, WrongShape) as exc:
            log.info("invalid wcp frame: %s", exc)
            return [INVALID]
        if isinstance(frame, UserJoinedFrame):
            if self.user_id is not None:
                return [error(f"already joined as {self.user_id}")]
            return self._join(frame)
        if self.user_id is None:
            return [JOIN_FIRST]
        if isinstance(frame, ChatMessage):
            return [Publish(payload=frame.data, client_timestamp=frame.timestamp)]
        if not self._own(frame.user_id):
            return [NOT_YOURS]
        return [Leave(), Close(1000, "user left")]

    def _join(self, frame: UserJoinedFrame) -> list[Output]:
        if not frame.user_id:
            return [AuthFailed("", "empty user_id"), EMPTY_ID]
        try:
            user_id = names.parse(frame.user_id)
        except names.InvalidName as exc:
            return self._refuse(frame.user_id, f"user_id {exc.reason}")
        try:
            display_name = names.parse(frame.display_name)
        except names.InvalidName as exc:
            return self._refuse(frame.user_id, f"display_name {exc.reason}")
        return [Join(name=user_id.shown, display_name=display_name.shown,
                     register=True, announce=True, roster=True)]

    @staticmethod
    def _refuse(user: str, reason: str) -> list[Output]:
        return [AuthFailed(user, reason), error(reason)]

    def _own(self, user_id: str) -> bool:
        """True if ``user_id`` names this client: the id it joined with, as
        sent or as shown (``ａｌｉｃｅ`` joined as ``alice``)."""
        if user_id == self.user_id:
            return True
        try:
            return names.parse(user_id).shown == self.user_id
        except names.InvalidName:
            return False

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
            if not result:
                return [AuthFailed(command.name, "user_id already in use"), ID_TAKEN]
            self.user_id = command.name
            self.authenticated = True
        return []

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, Message):
            timestamp = event.client_timestamp
            if timestamp is None:
                timestamp = event.time_ns // 1_000_000_000
            return dumps({"type": "message", "user_id": event.sender or "",
                          "data": payload_text(event.payload), "timestamp": timestamp})
        if isinstance(event, Direct):
            return dumps({"type": "message", "user_id": event.sender,
                          "data": payload_text(event.payload),
                          "timestamp": event.time_ns // 1_000_000_000, "to": event.to})
        if isinstance(event, UserJoined):
            return dumps({"type": "user_joined", "user_id": event.name,
                          "display_name": event.display_name or event.name})
        if isinstance(event, UserLeft):
            return dumps({"type": "user_left", "user_id": event.name})
        if isinstance(event, Refused):
            return error(event.message).data
        return None
