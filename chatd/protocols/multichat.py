"""multichat: chat bridges register with a shared secret, then forward.

As the original Go server behaves: ``register`` must be the first frame,
with a non-empty ``client-name`` and the right ``secret-key`` (compared in
constant time), else close 1008. After ``register-ack``, each
``client-message`` becomes a ``forwarding-message`` to every *other*
registered client (never echoed: bridges would loop). Names are labels,
not identities. After registration, bad JSON, unknown actions and empty
``content`` are ignored and logged.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import msgspec

from chatd.events import Command, Event, Join, Message, Publish, payload_text
from chatd.protocols.base import Close, Output, Protocol, Send, dumps, valid_name

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
            frame = _decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self.authenticated:
                return [Close(1008, "first frame must be a valid register")]
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

    def _register(self, frame: Register | ClientMessage) -> list[Output]:
        if not isinstance(frame, Register):
            return [Close(1008, "first frame must be register")]
        if not frame.client_name or not frame.secret_key:
            return [Close(1008, "client-name and secret-key must not be empty")]
        if not valid_name(frame.client_name):
            return [Close(1008, "client-name has control characters or is too long")]
        expected = (self.ctx.secret_key or "").encode()
        if not expected or not hmac.compare_digest(frame.secret_key.encode(), expected):
            return [Close(1008, "wrong secret-key")]
        self.client_name = frame.client_name
        return [Join(name=frame.client_name)]

    def on_result(self, command: Command, result: Any) -> list[Output]:
        if isinstance(command, Join):
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
