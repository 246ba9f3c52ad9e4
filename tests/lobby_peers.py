"""Clients of the lobby protocols, each returned once the server has let it in.

Each helper waits for proof that the server has processed the join, so a
test can send right after without racing it.
"""

from __future__ import annotations

import trio
import trio.testing

from chatd.tokens import mint
from tests.conftest import JWT_SECRET, Harness, Peer

INIT = {"type": "init", "message": "Please identify to receive messages."}
IDENTIFIED = {"type": "outcome", "success": True, "code": 300,
              "message": "Identified successfully!"}


async def socialvp(chat: Harness, name: str, path: str = "/socialvp") -> Peer:
    peer = await chat.connect(path)
    assert await peer.recv() == INIT
    await peer.send({"command": "identify", "name": name})
    assert await peer.recv() == IDENTIFIED
    return peer


async def wcp(chat: Harness, user_id: str, path: str = "/wcp",
              display_name: str | None = None) -> Peer:
    """A joined wcp client; ``peer.roster`` holds the ``user_joined`` frames
    it got for the names already in the room (chatd's roster extension)."""
    peer = await chat.connect(path)
    joined = {"type": "user_joined", "user_id": user_id,
              "display_name": display_name or user_id.title()}
    await peer.send(joined)
    # Frames are handled in order: this answer proves the join went through.
    await peer.send(joined)
    peer.roster = []
    while (frame := await peer.recv())["type"] == "user_joined":
        peer.roster.append(frame)
    assert frame == {"type": "error", "message": f"already joined as {user_id}"}
    return peer


def signed(usr: str, msg: str) -> dict:
    """A wschat message carrying a valid jwt (ignored when none is configured)."""
    return {"usr": usr, "msg": msg, "jwt": mint(JWT_SECRET, usr, ttl=None)}


async def wschat(chat: Harness, path: str = "/wschat") -> Peer:
    """A wschat client that has joined its lobby without sending anything.

    wschat answers nothing and announces nobody, so the proof is that the
    server has run out of work: the join happens as the connection opens,
    before the server blocks waiting for the client's first frame.
    """
    peer = await chat.connect(path)
    await trio.testing.wait_all_tasks_blocked()
    return peer
