"""wcp: the draft "WebSocket Chat Protocol" — user_joined, message, user_left.

The first frame must be ``user_joined`` (the auth stage): its ``user_id``
is claimed in the lobby's name registry (shared with socialvp) and bound
to the connection, so later frames cannot speak for anyone else: relayed
``message``s carry the bound ``user_id`` whatever the client wrote.
``user_left`` (own id only) is relayed and the server then closes with
1000; a client that just disconnects is announced the same way, by the
lobby. Invalid input is answered with an ``error`` and the connection is
kept.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from chatd.events import Command, Direct, Event, Join, Leave, Message, Publish, UserJoined, UserLeft, payload_text
from chatd.protocols.base import MAX_NAME_CHARS, Close, Output, Protocol, Send, dumps, valid_name

log = logging.getLogger("chatd.wcp")


class ChatMessage(msgspec.Struct, tag_field="type", tag="message"):
    data: str
    timestamp: int | float | None = None


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
BAD_NAME = error(f"user_id and display_name are 1 to {MAX_NAME_CHARS} characters, "
                 "without control characters")
TOO_FAST = error("rate limit exceeded: message dropped")


class Wcp(Protocol):
    name = "wcp"
    auth_stage = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.user_id: str | None = None

    def receive(self, text: str) -> list[Output]:
        try:
            frame = _decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.info("invalid wcp frame: %s", exc)
            return [INVALID]
        if isinstance(frame, UserJoinedFrame):
            if self.user_id is not None:
                return [error(f"already joined as {self.user_id}")]
            if not frame.user_id:
                return [EMPTY_ID]
            if not (valid_name(frame.user_id) and valid_name(frame.display_name)):
                return [BAD_NAME]
            return [Join(name=frame.user_id, display_name=frame.display_name,
                         register=True, announce=True)]
        if self.user_id is None:
            return [JOIN_FIRST]
        if isinstance(frame, ChatMessage):
            return [Publish(payload=frame.data, client_timestamp=frame.timestamp)]
        if frame.user_id != self.user_id:
            return [NOT_YOURS]
        return [Leave(), Close(1000, "user left")]

    def rate_limited(self, text: str) -> list[Output]:
        return [TOO_FAST]

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
            if not result:
                return [ID_TAKEN]
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
        return None
