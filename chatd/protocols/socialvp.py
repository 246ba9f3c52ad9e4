"""socialvp: the SocialVP WSChat protocol — identify by name, then chat.

As the original tornado server behaves (docs/protocols.md): on connect the client
gets ``init``; it must ``identify`` with a name unique in its lobby (the
registry is shared with wcp), and only identified clients send or receive.
Every answer is an ``outcome`` carrying the document's codes and texts;
``broadcast`` and ``message`` answer nothing on success. Departures of
named lobby clients arrive as ``quit``. Bad input never closes the
connection; the only close is the auth stage running out (1008), since a
client that never identifies could never receive anything.

Names follow ``chatd.names``: an invalid name gets 400 with the reason, a
name that is taken or looks like a taken one (``Alice``, ``аlice`` with a
Cyrillic a) gets 305. A refused identify before the first success is
reported (``AuthFailed``). Every frame is read through ``base.decode``:
anything that is not JSON chatd reads (too deep, numbers out of range)
gets the ``Malformed JSON request!`` outcome.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from chatd import names
from chatd.events import (
    Command, Direct, Event, Join, Message, Publish, Refused, SendDirect, UserLeft,
)
from chatd.protocols.base import (
    AuthFailed, NotJSON, Output, Protocol, Send, WrongShape, decode, dumps,
)

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
_COMMANDS = {"identify", "broadcast", "message"}

INIT = dumps({"type": "init", "message": "Please identify to receive messages."})


def outcome(success: bool, code: int, message: str) -> Send:
    return Send(dumps({"type": "outcome", "success": success, "code": code, "message": message}))


IDENTIFY_FIRST = outcome(False, 10, "Please identify yourself")
IDENTIFIED = outcome(True, 300, "Identified successfully!")
NAME_TAKEN = outcome(False, 305, "Client with that name already exists!")
NOBODY = outcome(False, 404, "No client with that name is currently connected!")
BAD_JSON = outcome(False, 400, "Malformed JSON request!")
NOT_OBJECT = outcome(False, 400, "Request must be a JSON object!")


def missing(field: str) -> Send:
    return outcome(False, 400, f"Missing '{field}' field!")


def not_a_name(field: str) -> Send:
    return outcome(False, 400, f"Field '{field}' must be a non-empty string!")


def bad_name(reason: str) -> Send:
    """400 for a name ``chatd.names`` refuses, saying why."""
    return outcome(False, 400, f"Invalid name: it {reason}!")


class SocialVP(Protocol):
    name = "socialvp"
    # Unidentified sockets receive nothing, so they may not linger either.
    auth_stage = True

    def greeting(self) -> list[Output]:
        return [Send(INIT)]

    def receive(self, text: str) -> list[Output]:
        try:
            request = decode(_decoder, text)
        except NotJSON as exc:
            log.info("malformed JSON from a socialvp client: %s", exc)
            return [BAD_JSON]
        except WrongShape as exc:
            return self._explain(exc.value)
        if isinstance(request, Identify):
            return self._identify(request)
        if not self.authenticated:
            return [IDENTIFY_FIRST]
        if request.message is UNSET:
            return [missing("message")]
        if isinstance(request, Broadcast):
            return [Publish(payload=request.message)]
        if request.to is UNSET:
            return [missing("to")]
        if not request.to:
            return [not_a_name("to")]
        try:
            names.parse(request.to)  # checked here, so it is charged to this client
        except names.InvalidName:
            pass  # answered as nobody by that name, by the lobby
        return [SendDirect(to=request.to, payload=request.message)]

    def _identify(self, request: Identify) -> list[Output]:
        if request.name is UNSET:
            return self._refused(None, missing("name"), "missing 'name'")
        if not request.name:
            return self._refused("", not_a_name("name"), "empty name")
        try:
            name = names.parse(request.name)
        except names.InvalidName as exc:
            return self._refused(request.name, bad_name(exc.reason), f"name {exc.reason}")
        return [Join(name=name.shown, register=True, announce=True)]

    def _refused(self, user: str | None, answer: Send, reason: str) -> list[Output]:
        """``answer`` to a refused identify, reported while not yet identified."""
        if self.authenticated:
            return [answer]
        return [AuthFailed(user, reason), answer]

    def _explain(self, frame: Any) -> list[Output]:
        """The answer to JSON the typed decoder refused, as the original gives it."""
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
        if command == "identify":
            return self._refused(None, not_a_name("name"), "'name' is not a string")
        return [not_a_name("to")]

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
            if not result:
                return self._refused(command.name, NAME_TAKEN, "name already in use")
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
        if isinstance(event, Refused):
            return outcome(False, 403, event.sentence).data
        return None
