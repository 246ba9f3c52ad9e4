"""Moderation across three real chatd nodes on one Redis and one PostgreSQL
(issue 22): an action asked of one node takes effect on every node, and
bans live in the shared store."""

from __future__ import annotations

import trio

from tests.api_helpers import KEY, api
from tests.cluster_helpers import (  # noqa: F401
    cluster, redis_server, socialvp, until, wcp,
)
from tests.conftest import GUARD
from tests.pg import pg_run_database, pg_url  # noqa: F401


async def applied(node, method: str, count: int) -> None:
    """Wait until ``node`` lists ``count`` rules (``bans``/``mutes``): the
    action has reached it."""
    with trio.fail_after(GUARD):
        while len((await api(node.port, method, {}))[method]) != count:
            await trio.sleep(0.05)  # polling the node's own answer, as an operator would


def joined(name: str):
    return lambda f: f.get("type") == "user_joined" and f["user_id"] == name


async def test_bans_mutes_notices_and_disconnects_reach_every_node(cluster):
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3", **{"api-key": KEY})
    mallory = await wcp(cluster, n3, "mallory")
    wendy = await wcp(cluster, n2, "wendy")
    await until(wendy, joined("mallory"))
    sam = await socialvp(cluster, n1, "sam")
    await until(wendy, joined("sam"))

    # A notice published on n2 reaches the clients of every node.
    answer = await api(n2.port, "publish", {"room": "lobby", "text": "hello all"})
    assert answer["sender"] == "chatd"
    assert (await sam.recv()) == {"type": "broadcast", "from": "chatd", "message": "hello all"}
    frame = await until(mallory, lambda f: f.get("type") == "message")
    assert (frame["user_id"], frame["data"]) == ("chatd", "hello all")

    # A mute asked of n1 silences wendy on n2: her error, nothing for the room.
    await api(n1.port, "mute", {"name": "wendy", "room": "lobby", "reason": "noise"})
    await until(wendy, lambda f: f.get("type") == "message")  # the notice
    await applied(n2, "mutes", 1)
    await wendy.send({"type": "message", "data": "noise"})
    assert await wendy.recv() == {"type": "error", "message": "muted: noise"}
    await api(n1.port, "unmute", {"name": "wendy"})
    await applied(n2, "mutes", 0)
    await wendy.send({"type": "message", "data": "quiet now"})
    assert (await sam.recv())["message"] == "quiet now"  # and "noise" never came before it

    # A ban asked of n1 closes mallory on n3 with wcp's refusal, and refuses
    # a look-alike on n2.
    ban = await api(n1.port, "ban", {"name": "Mallory", "reason": "spam"})
    assert ban["disconnected"] == 0  # nobody on n1 itself
    frame = await until(mallory, lambda f: f.get("type") == "error")
    assert frame == {"type": "error", "message": "banned: spam"}
    assert await mallory.closed() == 1008
    await applied(n2, "bans", 1)
    peer = await cluster.connect(n2, "socialvp")
    assert (await peer.recv())["type"] == "init"
    await peer.send({"command": "identify", "name": "mаllory"})  # a Cyrillic a
    assert (await peer.recv())["code"] == 403
    assert await peer.closed() == 1008
    assert [b["name"] for b in (await api(n3.port, "bans", {}))["bans"]] == ["Mallory"]

    # A disconnect asked of n3 closes sam on n1.
    assert await api(n3.port, "disconnect", {"name": "sam", "code": 4002}) == {"disconnected": 0}
    assert await sam.closed() == 4002

    # The ban is in the shared store: a node started now enforces it.
    n4 = await cluster.start("n4", **{"api-key": KEY})
    peer = await cluster.connect(n4, "wcp")
    await peer.send({"type": "user_joined", "user_id": "MALLORY", "display_name": "m"})
    assert await peer.recv() == {"type": "error", "message": "banned: spam"}
    info = await api(n4.port, "info", {})
    assert info["broker"]["kind"] == "redis" and info["rules"]["bans"] == 1
    with trio.fail_after(GUARD):  # until n4 has heard the others' presence
        while not (presence := await api(n4.port, "presence", {"room": "lobby"}))["clients"]:
            await trio.sleep(0.05)
    assert {(c["name"], c["node"]) for c in presence["clients"]} == {("wendy", "n2")}


async def test_a_session_notice_is_stored_once_and_reaches_members_on_every_node(cluster):
    from tests.test_cluster_gradagenda import login
    from tests.test_gradagenda import create, message

    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3", **{"api-key": KEY})
    alice = await login(cluster, n1, "alice")
    bob = await login(cluster, n2, "bob")
    session = (await create(alice, "bob"))["session-id"]
    await until(bob, lambda f: f.get("type") == "providing-session-info")
    await alice.send(message(session, "first", cdid="m1"))
    assert (await alice.recv())["seq"] == 1
    assert (await until(bob, lambda f: f.get("type") == "message-broadcast"))["seq"] == 1
    with trio.fail_after(GUARD):  # until n3 has heard of the session
        while True:
            answer = await api(n3.port, "publish", {"session": session, "text": "notice"},
                               status=None)
            if answer.get("seq"):
                break
            assert answer == {"error": "no such session"}
            await trio.sleep(0.05)
    assert answer["seq"] == 2 and answer["sender"] == "chatd"
    for peer in (alice, bob):
        frame = await until(peer, lambda f: f.get("type") == "message-broadcast")
        assert (frame["seq"], frame["sender-id"], frame["message"]["body"]) == (2, "chatd",
                                                                              "notice")
    await bob.send(message(session, "after", cdid="m2"))
    assert (await until(alice, lambda f: f.get("type") == "message-broadcast"))["seq"] == 3


async def test_a_ban_made_while_the_name_is_being_claimed_refuses_the_claim(
        chat, tmp_path, redis_server, pg_url):  # noqa: F811
    """A claim waits for Redis; a ban of the name made meanwhile found no
    client holding it (the name is the client's only once the claim is
    granted), so the client then joined under the banned name."""
    from tests.lobby_peers import IDENTIFIED, INIT
    from tests.lobby_peers import wcp as lobby_wcp
    from tests.test_api import config

    server = await chat.start(config(tmp_path, broker=redis_server.url, store=pg_url))
    bystander = await lobby_wcp(chat, "sam")
    peer = await chat.connect("/socialvp")
    assert await peer.recv() == INIT
    redis_server.pause()
    try:
        await peer.send({"command": "identify", "name": "mallory"})
        with trio.fail_after(GUARD):
            while not server.lobby._pending:  # the claim is waiting for Redis
                await trio.sleep(0.01)
        answer = await api(server.port, "ban", {"name": "Mallory", "reason": "spam"})
    finally:
        redis_server.resume()
    assert answer["disconnected"] == 1
    frame = await peer.recv()
    assert frame != IDENTIFIED
    assert frame == {"type": "outcome", "success": False, "code": 403, "message": "Banned: spam!"}
    from trio_websocket import ConnectionClosed

    with trio.fail_after(GUARD):
        try:
            late = await peer.ws.get_message()
            raise AssertionError(f"after the refusal: {late}")  # e.g. "Identified"
        except ConnectionClosed as exc:
            assert exc.reason.code == 1008
    # Nobody saw mallory join (the next join the room hears is zoe's).
    await lobby_wcp(chat, "zoe")
    assert (await bystander.recv())["user_id"] == "zoe"
