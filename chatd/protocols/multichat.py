"""multichat: chat bridges register with a shared secret, then forward.

As the original Go server behaves: ``register`` must be the first frame,
with a non-empty ``client-name`` and the right ``secret-key`` (compared in
constant time), else close 1008. After ``register-ack``, each
``client-message`` becomes a ``forwarding-message`` to every *other*
registered client (never echoed: bridges would loop). After registration,
bad JSON, unknown actions, empty ``content`` and binary frames are ignored
and logged; before it, any of them closes 1008.

chatd's rule for names (``chatd.names``): the ``client-name`` must be a
valid name, and it is claimed in the room's registry like any other
sender name, so no client of another protocol can speak as it. Bridges
share one secret and, as on the original server, may register one name
several times (a bridge run twice, or reconnecting while its old
connection is still open): the lobby lets multichat clients share a
name shown exactly alike (``chatd.lobby``). A name another protocol's
client holds, or a look-alike of a held name (``bridge`` / ``Bridge``),
closes 1008 with the reason ``client-name already in use``. Every refused
register is reported (``AuthFailed``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import msgspec

from chatd import names
from chatd.events import Command, Event, Join, Message, Publish, payload_text
from chatd.protocols.base import (
    AuthFailed, Close, NotJSON, Output, Protocol, Send, WrongShape, decode, dumps,
)

log = logging.getLogger("chatd.multichat")


class Register(msgspec.Struct, tag_field="action", tag="register", rename="kebab"):
    client_name: str
    secret_key: str


class ClientMessage(msgspec.Struct, tag_field="action", tag="client-message"):
    content: str


Incoming = Register | ClientMessage
_decoder = msgspec.json.Decoder(Incoming)

REGISTER_ACK = dumps({"action": "register-ack"})


class Multichat(Protocol):
    name = "multichat"
    auth_stage = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.client_name: str | None = None

    def receive(self, text: str) -> list[Output]:
        try:
            frame = decode(_decoder, text)
        except (NotJSON, WrongShape) as exc:
            if not self.authenticated:
                return self._refuse(None, "first frame must be a valid register")
            log.info("ignored frame: %s", exc)
            return []
        if not self.authenticated:
            return self._register(frame)
        if isinstance(frame, ClientMessage):
            if not frame.content:
                log.info("ignored client-message with empty content")
                return []
            return [Publish(payload=frame.content)]
        log.info("ignored %s after registration", type(frame).__name__)
        return []

    def binary(self) -> list[Output]:
        """The original Go server ignores a binary frame from a registered
        bridge and goes on; before registration it is not a register."""
        if not self.authenticated:
            return self._refuse(None, "first frame must be a valid register")
        log.info("ignored a binary frame after registration")
        return []

    def _register(self, frame: Register | ClientMessage) -> list[Output]:
        if not isinstance(frame, Register):
            return self._refuse(None, "first frame must be register")
        claimed = frame.client_name
        if not claimed or not frame.secret_key:
            return self._refuse(claimed or None, "client-name and secret-key must not be empty")
        expected = (self.ctx.secret_key or "").encode()
        if not expected or not hmac.compare_digest(frame.secret_key.encode(), expected):
            return self._refuse(claimed, "wrong secret-key")
        try:
            name = names.parse(claimed)
        except names.InvalidName as exc:
            return self._refuse(claimed, f"client-name {exc.reason}")
        return [Join(name=name.shown, register=True, announce=True, shared=True)]

    def _refuse(self, user: str | None, reason: str) -> list[Output]:
        # The close reason is at most 123 bytes (RFC 6455 section 5.5).
        return [AuthFailed(user, reason), Close(1008, _cut(reason, 123))]

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
            if not result:
                return self._refuse(command.name, "client-name already in use")
            self.client_name = command.name
            self.authenticated = True
            return [Send(REGISTER_ACK)]
        return []

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, Message):
            return dumps({
                "action": "forwarding-message",
                "source-client-name": event.sender or "",
                "content": payload_text(event.payload),
            })
        return None


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")
