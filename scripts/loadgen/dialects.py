"""How each chatd protocol authenticates and what its chat messages look like.

One class per protocol, the client's side of its document (multichat,
socialvp, wschat, wcp, GradAgenda): the auth stage a connection goes
through before it counts as connected, the frame a publisher sends, which
server frames report a failure, and the few control frames worth decoding.

Every chat text the load test sends starts with :data:`MARK`, the send time
and the sender's tag (:func:`message_content`), so receivers time a
delivery by a byte search instead of decoding JSON (``client.py``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import WsClient
    from .plan import Plan

#: Every chat text sent carries MARK + 19-digit monotonic ns + ":" + tag + ":".
MARK = b"~lt"


class LoadError(Exception):
    """A client step failed; the message is the error's category."""


def message_content(tag: bytes, size: int) -> bytes:
    """A chat text of ``size`` bytes carrying the send time and the sender's tag."""
    head = b"%s%019d:%s:" % (MARK, time.monotonic_ns(), tag)
    return head + b"x" * (size - len(head)) if size > len(head) else head


def json_text(value: str) -> bytes:
    return json.dumps(value).encode()


class Dialect:
    """The client side of one chatd protocol, as its document describes it."""

    name = ""
    #: The publisher receives its own lobby message (so it is its own probe).
    echo = False
    #: Byte strings that make a non-chat frame worth parsing as JSON.
    markers: tuple[bytes, ...] = ()
    #: Clients carry a JWT (minted from the secret, or by `chatd token`).
    tokens = False
    #: A room is a group created over one endpoint (not an endpoint per room);
    #: its members, publishers included, join before it is created.
    groups = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    async def authenticate(self, client: WsClient) -> None:
        """Finish the auth stage; raise LoadError if the server refuses."""

    def publish(self, client: WsClient, content: bytes) -> bytes:
        """The frame payload that sends ``content`` (JSON-safe bytes) as a chat message."""
        raise NotImplementedError

    def problem(self, obj: Any) -> str | None:
        """A failure the server reported in a frame, if this frame is one."""
        return None

    def observe(self, client: WsClient, obj: Any) -> None:
        """Note what a control frame tells this client (e.g. a session id)."""


class MultichatDialect(Dialect):
    """``register`` with the shared secret, answered by ``register-ack``."""

    name = "multichat"

    async def authenticate(self, client: WsClient) -> None:
        frame = {"action": "register", "client-name": client.name,
                 "secret-key": self.plan.secret_key}
        await client.request(frame, lambda o: o.get("action") == "register-ack")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"action":"client-message","content":"' + content + b'"}'


class SocialvpDialect(Dialect):
    """``identify``, answered by an ``outcome``."""

    name = "socialvp"
    markers = (b"false",)

    async def authenticate(self, client: WsClient) -> None:
        reply = await client.request({"command": "identify", "name": client.name},
                                     lambda o: o.get("type") == "outcome")
        if not reply.get("success"):
            raise LoadError(f"auth: outcome {reply.get('code')} {reply.get('message')}")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"command":"broadcast","message":"' + content + b'"}'

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "outcome" and not obj.get("success"):
            return f"outcome {obj.get('code')} {obj.get('message')}"
        return None


class WschatDialect(Dialect):
    """No auth stage; with a JWT secret every message carries a token."""

    name = "wschat"
    echo = True
    tokens = True

    def publish(self, client: WsClient, content: bytes) -> bytes:
        jwt = b',"jwt":' + json_text(client.token) if client.token else b""
        return b'{"usr":' + json_text(client.name) + jwt + b',"msg":"' + content + b'"}'


class WcpDialect(Dialect):
    """``user_joined`` has no acknowledgement, so the client then sends an
    empty object: its ``error`` answer proves the join was handled first."""

    name = "wcp"
    markers = (b'"error"',)

    async def authenticate(self, client: WsClient) -> None:
        await client.send_json({"type": "user_joined", "user_id": client.name,
                                "display_name": client.name})
        await client.request({}, lambda o: o.get("type") == "error")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"type":"message","data":"' + content + b'"}'

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "error":
            return f"error {obj.get('message')}"
        return None


class GradagendaDialect(Dialect):
    """``authenticate`` with a JWT; messages go to a group (mutable session)."""

    name = "gradagenda"
    echo = True  # a sent message reaches every member device, the sender's too
    tokens = True
    groups = True
    markers = (b"failed", b"providing-session-info")

    async def authenticate(self, client: WsClient) -> None:
        frame = {"cdid": "auth", "type": "authenticate", "user-id": client.name,
                 "device-id": f"{client.name}-loadtest", "token": client.token}
        reply = await client.request(frame, lambda o: o.get("cdid") == "auth")
        if reply.get("status") != "succeeded":
            raise LoadError(f"auth: {reply.get('message') or reply.get('status')}")

    async def create_group(self, client: WsClient, members: list[str]) -> None:
        """Create a mutable session of ``members``; each learns its id (observe)."""
        frame = {"cdid": "create", "type": "request-mutable-session-creation", "user-id": members}
        reply = await client.request(frame, lambda o: o.get("type") == "providing-session-info"
                                     or (o.get("cdid") == "create" and o.get("status") == "failed"),
                                     "group creation")
        if reply.get("type") != "providing-session-info":
            raise LoadError(f"group creation: {reply.get('message')}")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return (b'{"cdid":"m","type":"request-sending-a-message","session-id":' + client.session
                + b',"message":{"type":"text","body":"' + content
                + b'"},"sender-timestamp":%d}' % (time.time_ns() // 1_000_000))

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "status-response" and obj.get("status") == "failed":
            return f"status-response failed: {obj.get('message')}"
        return None

    def observe(self, client: WsClient, obj: Any) -> None:
        if obj.get("type") == "providing-session-info" and obj.get("status") != "deleted":
            client.session = json.dumps(obj.get("session-id")).encode()
            client.session_known.set()


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (
    MultichatDialect, SocialvpDialect, WschatDialect, WcpDialect, GradagendaDialect)}
PROTOCOLS = tuple(DIALECTS)
