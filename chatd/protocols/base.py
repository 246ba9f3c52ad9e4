"""What every protocol module provides: a sans-IO state machine.

A protocol instance lives for one connection. It is fed decoded text
frames and returns *outputs*: ``Send`` (a frame for this client only),
``Close`` (end the connection with a code), or router commands from
``chatd.events``. It never touches a socket or a channel, so it is tested
with plain function calls. The class-level ``encode`` turns a router event
into this protocol's wire bytes; the router calls it once per event and
protocol, never once per recipient.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from chatd.events import Command, Event


class Send(msgspec.Struct, frozen=True):
    """A frame (UTF-8 JSON bytes) for this connection only."""

    data: bytes


class Close(msgspec.Struct, frozen=True):
    """Close this connection after the frames already queued."""

    code: int
    reason: str = ""


class Stream(msgspec.Struct, frozen=True):
    """Frames (UTF-8 JSON bytes each) for this connection only, written as
    the socket drains rather than queued at once: for answers that may be
    larger than the outbox (a long listing). ``frames`` is an iterable."""

    frames: Any


class AuthFailed(msgspec.Struct, frozen=True):
    """An authentication attempt this connection made was refused: the
    connection logs it at INFO with the peer and path (issue #9 item 10).
    ``user`` is the name or user id the client claimed, if it gave one;
    ``reason`` is what the client was told, or more. It sends nothing."""

    user: str | None
    reason: str


Output = Send | Close | Stream | AuthFailed | Command


class Context(msgspec.Struct, kw_only=True):
    """What a protocol may know about its endpoint and the server."""

    room: str = "lobby"
    secret_key: str | None = None
    #: The HS256 key for tokens (configured or generated).
    jwt_secret: str | None = None
    #: True when the operator set ``jwt-secret``/``JWT_SECRET`` (wschat then
    #: verifies every message; a generated secret does not switch that on).
    jwt_configured: bool = False
    #: Seconds of clock skew allowed when checking a token's exp, iat and
    #: nbf (config ``jwt-leeway``; the server fills it in).
    jwt_leeway: float = 30.0
    max_frame_bytes: int = 4096


class Protocol:
    """One connection's protocol state. Subclasses override what they use."""

    name: ClassVar[str]
    #: True if the connection must finish an auth stage within
    #: ``auth-timeout``; it ends when ``authenticated`` becomes True.
    auth_stage: ClassVar[bool] = False
    #: True if the sender receives its own lobby messages (wschat).
    echo: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.authenticated = not self.auth_stage

    def greeting(self) -> list[Output]:
        """Outputs when the WebSocket opens."""
        return []

    def receive(self, text: str) -> list[Output]:
        """Outputs for one text frame from the client."""
        raise NotImplementedError

    def on_result(self, command: Command, result: Any) -> list[Output]:
        """Outputs once the router has answered a ``Request``."""
        return []

    def binary(self) -> list[Output]:
        """Outputs for a binary message (its first frame; the connection
        skips the rest of it). By default close 1003 (RFC 6455 section
        7.4.1: data it cannot accept): every protocol document here is
        text-only, and GradAgenda's says the server closes otherwise.
        A protocol whose original server ignores binary says so here."""
        return [Close(1003, "binary frames are not supported")]

    def auth_timeout(self) -> list[Output]:
        """Outputs when the auth stage ran out of time."""
        return [Close(1008, "authentication timeout")]

    def on_disconnect(self) -> list[Command]:
        """Commands to send on the client's behalf when it goes away."""
        return []

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        """This protocol's wire bytes for a router event, or None to skip."""
        return None


encoder = msgspec.json.Encoder()


def dumps(obj: Any) -> bytes:
    return encoder.encode(obj)


# --- reading frames ------------------------------------------------------------------

#: Deepest nesting of arrays and objects chatd reads in a frame. Deeper
#: frames are answered as malformed JSON (RFC 8259 section 9 lets a parser
#: limit nesting), so no decoder or encoder can run out of stack.
MAX_JSON_DEPTH = 64
#: The largest integer every JSON decoder reads exactly (I-JSON, RFC 7493
#: section 2.2: IEEE 754 doubles). A number a client sends and chatd
#: relays to others as sent (a wcp ``timestamp``, a GradAgenda
#: ``sender-timestamp``) stays within it: 10**30 or 2**64 would lose
#: precision in JavaScript and fail in an int64 decoder.
JSON_SAFE_INT = 2**53 - 1
SafeInt = Annotated[int, Meta(ge=-JSON_SAFE_INT, le=JSON_SAFE_INT)]
SafeFloat = Annotated[float, Meta(ge=-JSON_SAFE_INT, le=JSON_SAFE_INT)]


class NotJSON(ValueError):
    """The frame is not JSON chatd reads: bad syntax, nested deeper than
    ``MAX_JSON_DEPTH``, a number beyond the 64-bit float range (RFC 8259
    section 6 allows the limit), or text that is not valid Unicode."""


class WrongShape(ValueError):
    """The frame is JSON but not a message of the protocol; ``value`` is
    the frame as plain JSON (dicts, lists, ...) for a precise answer."""

    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.value = value


_any_decoder = msgspec.json.Decoder()
# A JSON string (skipped whole, so brackets inside it do not count) or a bracket.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def too_deep(text: str) -> bool:
    """True if ``text`` nests arrays and objects deeper than MAX_JSON_DEPTH.
    Frames with few brackets (all real chat) cost two ``str.count`` calls."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def decode(decoder: msgspec.json.Decoder, data: str | bytes) -> Any:
    """Decode one frame with a protocol's typed ``decoder``: the decode
    boundary of every protocol, so that no input can raise anything else.

    Raises ``NotJSON`` (the protocol's bad-JSON answer) or ``WrongShape``
    (JSON, but not a valid message). Text is checked for depth first; bytes
    are parts of a frame already checked (a GradAgenda batch's actions).
    """
    if isinstance(data, str) and too_deep(data):
        raise NotJSON(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        error = exc
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise NotJSON(str(exc)) from None
    # The typed decoder may stop at the first wrong value, before a syntax
    # error or an out-of-range number further on: only a full parse tells.
    try:
        value = _any_decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError, UnicodeError) as exc:
        raise NotJSON(str(exc)) from None
    raise WrongShape(str(error), value) from None
