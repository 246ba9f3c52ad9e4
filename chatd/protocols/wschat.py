"""wschat: a public room where every ``{usr, msg}`` goes to everyone.

As the Rust wschat server's README says: there is no sign-in, anyone
connected receives every message (so the connection joins its lobby the
moment it opens), each message is stamped with ``tim`` (RFC 3339 UTC,
nanosecond digits) and sent to all, the sender included. When the
operator configured a JWT secret, a message whose ``jwt`` does not verify
(HS256; ``exp`` not required) is dropped. The original answers nothing to
a bad frame, so neither does chatd: it is dropped and logged; so is a
``usr`` that is not a valid name (``base.valid_name``), and so are frames
over the message rate.
"""

from __future__ import annotations

import logging
import time

import msgspec

from chatd import tokens
from chatd.events import Event, Join, Message, Publish, payload_text
from chatd.protocols.base import Output, Protocol, dumps, valid_name

log = logging.getLogger("chatd.wschat")


class ChatMessage(msgspec.Struct):
    usr: str
    msg: str
    jwt: str | None = None


_decoder = msgspec.json.Decoder(ChatMessage)


def rfc3339_ns(time_ns: int) -> str:
    """``2020-08-11T22:26:58.118678679Z``: UTC with nine fractional digits."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


class WsChat(Protocol):
    name = "wschat"
    echo = True

    def greeting(self) -> list[Output]:
        # Listeners who never send still receive everything.
        return [Join()]

    def receive(self, text: str) -> list[Output]:
        try:
            message = _decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.info("dropped wschat frame: %s", exc)
            return []
        if not valid_name(message.usr):
            log.info("dropped wschat message: usr is empty, too long or has control characters")
            return []
        if self.ctx.jwt_configured and not self._verified(message.jwt):
            log.info("dropped wschat message from %r: jwt missing or invalid", message.usr)
            return []
        return [Publish(payload=message.msg, sender=message.usr)]

    def _verified(self, token: str | None) -> bool:
        if token is None or self.ctx.jwt_secret is None:
            return False
        return tokens.verify(self.ctx.jwt_secret, token, require_exp=False) is not None

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, Message):
            return dumps({"usr": event.sender or "", "msg": payload_text(event.payload),
                          "tim": rfc3339_ns(event.time_ns)})
        return None
