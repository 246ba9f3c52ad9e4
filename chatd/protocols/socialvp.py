"""socialvp: the SocialVP WSChat protocol — identify by name, then chat.

As the original tornado server behaves (docs/protocols.md): on connect the client
gets ``init``; it must ``identify`` with a name unique in its lobby (the
registry is shared with wcp), and only identified clients send or receive.
Every answer is an ``outcome`` carrying the document's codes and texts;
``broadcast`` and ``message`` answer nothing on success. Departures of
named lobby clients arrive as ``quit``. Bad input never closes the
connection; the only close is the auth stage running out (1008), since a
client that never identifies could never receive anything.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from chatd.events import Command, Direct, Event, Join, Message, Publish, SendDirect, UserLeft
from chatd.protocols.base import MAX_NAME_CHARS, Output, Protocol, Send, dumps, valid_name

log = logging.getLogger("chatd.socialvp")


class Identify(msgspec.Struct, tag_field="command", tag="identify"):
    name: str | UnsetType = UNSET


class Broadcast(msgspec.Struct, tag_field="command", tag="broadcast"):
    message: Any = UNSET


class DirectMessage(msgspec.Struct, tag_field="command", tag="message"):
    to: str | UnsetType = UNSET
    message: Any = UNSET


Incoming = Identify | Broadcast | DirectMessage
_decoder = msgspec.json.Decoder(Incoming)
_any_decoder = msgspec.json.Decoder()
_COMMANDS = {"identify", "broadcast", "message"}

INIT = dumps({"type": "init", "message": "Please identify to receive messages."})


def outcome(success: bool, code: int, message: str) -> Send:
    return Send(dumps({"type": "outcome", "success": success, "code": code, "message": message}))


IDENTIFY_FIRST = outcome(False, 10, "Please identify yourself")
IDENTIFIED = outcome(True, 300, "Identified successfully!")
NAME_TAKEN = outcome(False, 305, "Client with that name already exists!")
NOBODY = outcome(False, 404, "No client with that name is currently connected!")
BAD_NAME = outcome(False, 400, f"Names are 1 to {MAX_NAME_CHARS} characters, "
                               "without control characters!")
# Not in the document: a frame over the connection's message rate.
TOO_FAST = outcome(False, 429, "Too many requests, slow down!")
BAD_JSON = outcome(False, 400, "Malformed JSON request!")
NOT_OBJECT = outcome(False, 400, "Request must be a JSON object!")


def missing(field: str) -> Send:
    return outcome(False, 400, f"Missing '{field}' field!")


def not_a_name(field: str) -> Send:
    return outcome(False, 400, f"Field '{field}' must be a non-empty string!")


class SocialVP(Protocol):
    name = "socialvp"
    # Unidentified sockets receive nothing, so they may not linger either.
    auth_stage = True

    def greeting(self) -> list[Output]:
        return [Send(INIT)]

    def receive(self, text: str) -> list[Output]:
        try:
            request = _decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._explain(text)
        if isinstance(request, Identify):
            if request.name is UNSET:
                return [missing("name")]
            if not request.name:
                return [not_a_name("name")]
            if not valid_name(request.name):
                return [BAD_NAME]
            return [Join(name=request.name, register=True, announce=True)]
        if not self.authenticated:
            return [IDENTIFY_FIRST]
        if request.message is UNSET:
            return [missing("message")]
        if isinstance(request, Broadcast):
            return [Publish(payload=request.message)]
        if request.to is UNSET:
            return [missing("to")]
        return [SendDirect(to=request.to, payload=request.message)]

    def _explain(self, text: str) -> list[Output]:
        """The answer to a frame the typed decoder refused, as the original gives it."""
        try:
            frame = _any_decoder.decode(text)
        except msgspec.DecodeError:
            log.info("malformed JSON from a socialvp client")
            return [BAD_JSON]
        if not isinstance(frame, dict):
            return [NOT_OBJECT]
        if "command" not in frame:
            return [missing("command")]
        command = frame["command"]
        if not isinstance(command, str) or command not in _COMMANDS:
            if not self.authenticated:
                return [IDENTIFY_FIRST]
            log.info("ignored unknown socialvp command %r", command)
            return []
        if command != "identify" and not self.authenticated:
            return [IDENTIFY_FIRST]
        # A known command whose name field is not a string (message is any JSON).
        return [not_a_name("name" if command == "identify" else "to")]

    def rate_limited(self, text: str) -> list[Output]:
        return [TOO_FAST]

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
            if not result:
                return [NAME_TAKEN]
            self.authenticated = True
            return [IDENTIFIED]
        if isinstance(command, SendDirect) and not result:
            return [NOBODY]
        return []

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, Message):
            return dumps({"type": "broadcast", "from": event.sender or "",
                          "message": event.payload})
        if isinstance(event, Direct):
            return dumps({"type": "message", "from": event.sender, "message": event.payload})
        if isinstance(event, UserLeft):
            return dumps({"type": "quit", "who": event.name})
        return None
