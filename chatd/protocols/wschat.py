"""wschat: a public room where every ``{usr, msg}`` goes to everyone.

As the Rust wschat server's README says: there is no sign-in, anyone
connected receives every message (so the connection joins its lobby the
moment it opens), each message is stamped with ``tim`` (RFC 3339 UTC,
nanosecond digits) and sent to all, the sender included. When the
operator configured a JWT secret, a message whose ``jwt`` does not verify
(HS256; ``exp`` not required; ``chatd.tokens``) is dropped and reported as
a failed authentication (``AuthFailed``). The original answers nothing to
a bad frame, so neither does chatd: it is dropped and logged; so is a
``usr`` that is not a valid name (``chatd.names``), and so are frames
over the message rate.

``usr`` is published in its normalised form, and the lobby claims it for
this connection (one name at a time; a new ``usr`` renames): a message
whose ``usr`` another connection holds, or looks like, is dropped there.
The sender sees it by the missing echo.
"""

from __future__ import annotations

import logging
import time

import msgspec

from chatd import names, tokens
from chatd.events import Event, Join, Message, Publish, payload_text
from chatd.protocols.base import (
    AuthFailed, NotJSON, Output, Protocol, WrongShape, decode, dumps,
)

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
            message = decode(_decoder, text)
        except (NotJSON, WrongShape) as exc:
            log.info("dropped wschat frame: %s", exc)
            return []
        try:
            usr = names.parse(message.usr)
        except names.InvalidName as exc:
            log.info("dropped wschat message: usr %s", exc.reason)
            return []
        if self.ctx.jwt_configured:
            refusal = self._refusal(message.jwt)
            if refusal is not None:
                # Logged by the connection, with the peer.
                return [AuthFailed(message.usr, f"jwt {refusal}: message dropped")]
        return [Publish(payload=message.msg, sender=usr.shown)]

    def _refusal(self, token: str | None) -> str | None:
        """Why the message's token does not verify, or None if it does."""
        if token is None:
            return "missing"
        if self.ctx.jwt_secret is None:
            return "cannot be checked: no secret"
        try:
            tokens.verify(self.ctx.jwt_secret, token, require_exp=False,
                          leeway=self.ctx.jwt_leeway)
        except tokens.TokenRefused as exc:
            return f"refused: {exc}"
        return None

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, Message):
            return dumps({"usr": event.sender or "", "msg": payload_text(event.payload),
                          "tim": rfc3339_ns(event.time_ns)})
        return None
