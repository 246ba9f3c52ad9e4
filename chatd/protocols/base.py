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

from typing import Any, ClassVar

import msgspec

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


Output = Send | Close | Stream | Command


class Context(msgspec.Struct, kw_only=True):
    """What a protocol may know about its endpoint and the server."""

    room: str = "lobby"
    secret_key: str | None = None
    #: The HS256 key for tokens (configured or generated).
    jwt_secret: str | None = None
    #: True when the operator set ``jwt-secret``/``JWT_SECRET`` (wschat then
    #: verifies every message; a generated secret does not switch that on).
    jwt_configured: bool = False
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

    def auth_timeout(self) -> list[Output]:
        """Outputs when the auth stage ran out of time."""
        return [Close(1008, "authentication timeout")]

    def rate_limited(self, text: str) -> list[Output]:
        """Outputs for a frame (``text``) dropped by the message-rate limit."""
        return []

    def on_disconnect(self) -> list[Command]:
        """Commands to send on the client's behalf when it goes away."""
        return []

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        """This protocol's wire bytes for a router event, or None to skip."""
        return None


encoder = msgspec.json.Encoder()

#: Longest name (user id, nickname, display name) a client may claim.
MAX_NAME_CHARS = 256
_CONTROL = {chr(c) for c in range(32)} - {"\t", "\n"} | {chr(127)} | {chr(c) for c in range(0x80, 0xA0)}


def valid_name(name: str) -> bool:
    """Non-empty, at most MAX_NAME_CHARS, no control characters but tab and
    newline: names are shown to other users, who must not be tricked by
    invisible or terminal-control characters."""
    return 0 < len(name) <= MAX_NAME_CHARS and _CONTROL.isdisjoint(name)


def dumps(obj: Any) -> bytes:
    return encoder.encode(obj)
