"""Lobby rooms across three real chatd nodes on one Redis: messages in every
protocol's format, presence, the wcp roster, direct messages, one name
registry for the cluster (races included)."""

from __future__ import annotations

import json

import trio

from chatd.tokens import mint
from tests.cluster_helpers import (  # noqa: F401
    cluster, multichat, redis_server, socialvp, until, wcp,
)
from tests.conftest import GUARD, JWT_SECRET
from tests.pg import pg_run_database, pg_url  # noqa: F401
from tests.test_cluster_gradagenda import login
from tests.test_gradagenda import direct, message


def wschat(usr: str, msg: str) -> dict:
    return {"usr": usr, "msg": msg, "jwt": mint(JWT_SECRET, usr)}


def joined(name: str):
    return lambda f: f.get("type") == "user_joined" and f["user_id"] == name


async def test_a_message_from_any_node_reaches_all_five_protocols_on_every_node(cluster):
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3")
    wendy = await wcp(cluster, n3, "wendy", "Wendy W.")
    bridge = await multichat(cluster, n1, "bridge")
    assert await wendy.recv() == {"type": "user_joined", "user_id": "bridge",
                                  "display_name": "bridge"}
    sam = await socialvp(cluster, n2, "sam")
    assert await wendy.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    listener = await cluster.connect(n1, "wschat")

    await sam.send({"command": "broadcast", "message": {"mood": "sunny"}})
    text = json.dumps({"mood": "sunny"}, separators=(",", ":"))
    assert await bridge.recv() == {"action": "forwarding-message", "source-client-name": "sam",
                                   "content": text}
    got = await listener.recv()
    assert (got["usr"], got["msg"]) == ("sam", text) and got["tim"].endswith("Z")
    got = await wendy.recv()
    assert (got["type"], got["user_id"], got["data"]) == ("message", "sam", text)

    await wendy.send({"type": "message", "data": "hello from wcp", "timestamp": 1700000000})
    assert await bridge.recv() == {"action": "forwarding-message",
                                   "source-client-name": "wendy", "content": "hello from wcp"}
    assert await sam.recv() == {"type": "broadcast", "from": "wendy", "message": "hello from wcp"}
    assert (await listener.recv())["msg"] == "hello from wcp"

    # wschat's sender gets its own echo once (from its own node), and its
    # first message claims its name cluster-wide.
    await listener.send(wschat("wes", "hello from wschat"))
    echo = await listener.recv()
    assert (echo["usr"], echo["msg"]) == ("wes", "hello from wschat")
    assert (await bridge.recv())["content"] == "hello from wschat"
    assert await sam.recv() == {"type": "broadcast", "from": "wes", "message": "hello from wschat"}
    assert await wendy.recv() == {"type": "user_joined", "user_id": "wes", "display_name": "wes"}
    assert (await wendy.recv())["data"] == "hello from wschat"

    await bridge.send({"action": "client-message", "content": "from the bridge"})
    assert await sam.recv() == {"type": "broadcast", "from": "bridge", "message": "from the bridge"}
    assert (await listener.recv())["msg"] == "from the bridge"
    assert (await wendy.recv())["data"] == "from the bridge"

    # Nothing more came to anyone: a last message is the next frame each gets.
    await sam.send({"command": "broadcast", "message": "end"})
    assert (await bridge.recv())["content"] == "end"
    assert (await listener.recv())["msg"] == "end"
    assert (await wendy.recv())["data"] == "end"
    await wendy.send({"type": "message", "data": "end too"})
    assert (await sam.recv())["message"] == "end too"
    # The fifth protocol: GradAgenda users on two other nodes.
    alice = await login(cluster, n1, "alice")
    bob = await login(cluster, n3, "bob")
    pair = (await direct(alice, "bob"))["session-id"]
    await alice.send(message(pair, "hello from n1", cdid="a1"))
    assert (await alice.recv())["seq"] == 1
    got = await bob.recv()
    assert (got["type"], got["sender-id"], got["message"]["body"]) == (
        "message-broadcast", "alice", "hello from n1")


async def test_one_senders_messages_arrive_on_other_nodes_in_the_order_sent(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    readers = [await socialvp(cluster, n2, f"reader{i}") for i in range(3)]
    sender = await socialvp(cluster, n1, "sender")
    for i in range(300):
        await sender.send({"command": "broadcast", "message": i})
    for reader in readers:
        got = [(await until(reader, lambda f: f["type"] == "broadcast"))["message"]
               for _ in range(300)]
        assert got == list(range(300))


async def test_names_are_unique_across_the_cluster_and_look_alikes_collide(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    await socialvp(cluster, n1, "alice")
    other = await cluster.connect(n2, "socialvp")
    await other.recv()
    for name in ("alice", "Alice", "аlice"):  # the last with a Cyrillic a
        await other.send({"command": "identify", "name": name})
        assert (await other.recv())["code"] == 305
    user = await wcp(cluster, n2, "ALICE")
    assert await user.recv() == {"type": "error", "message": "user_id already in use"}
    bridge = await cluster.connect(n2, "multichat")
    await bridge.send({"action": "register", "client-name": "alice", "secret-key": "test-secret"})
    assert await bridge.closed() == 1008
    # A wschat message as a name held on another node is dropped: no echo.
    listener = await cluster.connect(n2, "wschat")
    await listener.send(wschat("alice", "it is me"))
    await listener.send(wschat("carol", "me too"))
    assert (await listener.recv())["usr"] == "carol"


async def test_two_nodes_racing_for_one_name_exactly_one_wins(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    names = [f"racer{i}" for i in range(20)] + ["Zed", "zed"]
    peers = {}
    for node in (n1, n2):
        for name in names:
            peer = await cluster.connect(node, "socialvp")
            await peer.recv()
            peers[node.name, name] = peer
    outcomes: dict[tuple[str, str], int] = {}

    async def identify(key) -> None:
        peer = peers[key]
        await peer.send({"command": "identify", "name": key[1]})
        outcomes[key] = (await until(peer, lambda f: f["type"] == "outcome"))["code"]

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as race:
            for key in peers:
                race.start_soon(identify, key)
    for name in names[:-2]:
        assert sorted([outcomes["n1", name], outcomes["n2", name]]) == [300, 305], name
    # "Zed" and "zed" look alike: of the four claims, one wins.
    assert sorted(outcomes[n, z] for n in ("n1", "n2") for z in ("Zed", "zed")) == [300, 305,
                                                                                     305, 305]


async def test_presence_roster_and_direct_messages_cross_nodes(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    wendy = await wcp(cluster, n1, "wendy", "Wendy W.")
    sam = await socialvp(cluster, n1, "sam")
    assert await wendy.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    bridge = await multichat(cluster, n2, "bridge")
    await until(wendy, joined("bridge"))
    # A wcp user joining on another node gets the roster of the whole room.
    late = await wcp(cluster, n2, "late")
    roster = [await late.recv() for _ in range(3)]
    assert {(f["user_id"], f["display_name"]) for f in roster} == {
        ("bridge", "bridge"), ("wendy", "Wendy W."), ("sam", "sam")}
    await until(wendy, joined("late"))
    # Direct messages reach a name held on another node, as addressed.
    bob = await socialvp(cluster, n2, "bob")
    await until(wendy, joined("bob"))
    await bob.send({"command": "message", "to": "Wendy", "message": "just you"})
    got = await wendy.recv()
    assert (got["type"], got["user_id"], got["data"], got["to"]) == (
        "message", "bob", "just you", "wendy")
    await bob.send({"command": "message", "to": "sam", "message": {"x": 1}})
    assert await sam.recv() == {"type": "message", "from": "bob", "message": {"x": 1}}
    # Nobody holds it, or its holder cannot take direct messages: 404 at once.
    for to in ("nobody", "bridge"):
        await bob.send({"command": "message", "to": to, "message": "hi"})
        assert (await bob.recv())["code"] == 404
    # Leaving, on any node, is announced on every node.
    await bridge.close()
    assert await until(sam, lambda f: f["type"] == "quit") == {"type": "quit", "who": "bridge"}
    assert await until(late, lambda f: f["type"] == "user_left") == {
        "type": "user_left", "user_id": "bridge"}
    await sam.close()
    await until(bob, lambda f: f == {"type": "quit", "who": "sam"})
    # ... and a name given up is free again, on any node.
    again = await socialvp(cluster, n2, "sam")
    await again.close()


async def test_a_rename_on_one_node_is_announced_everywhere_and_frees_the_old_name(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    sam = await socialvp(cluster, n1, "sam")
    wally = await wcp(cluster, n2, "wally")
    assert (await wally.recv())["user_id"] == "sam"
    await sam.send({"command": "identify", "name": "samuel"})
    assert (await sam.recv())["code"] == 300
    assert await wally.recv() == {"type": "user_left", "user_id": "sam"}
    assert await wally.recv() == {"type": "user_joined", "user_id": "samuel",
                                  "display_name": "samuel"}
    again = await socialvp(cluster, n2, "Sam")  # the old name is free, on every node
    listener = await cluster.connect(n1, "wschat")
    await listener.send(wschat("samuel", "not me"))  # held on n1 by another connection
    await listener.send(wschat("wes", "me"))
    assert (await listener.recv())["usr"] == "wes"
    await listener.send(wschat("wesley", "renamed"))
    assert (await listener.recv())["usr"] == "wesley"
    assert await until(wally, joined("wesley")) == {"type": "user_joined", "user_id": "wesley",
                                                    "display_name": "wesley"}
    await again.close()


async def test_bridges_share_a_name_on_one_node_and_other_nodes_see_one_user(cluster):
    # Issue 20: two bridges of one name, as the original server allows. On
    # one node they share it (Redis holds it once, for that node); the other
    # nodes see one user, joined with the first and gone with the last.
    n1, n2 = await cluster.nodes_up("n1", "n2")
    watcher = await wcp(cluster, n2, "watcher")
    one = await multichat(cluster, n1, "qq")
    assert await until(watcher, joined("qq")) == {"type": "user_joined", "user_id": "qq",
                                                  "display_name": "qq"}
    two = await multichat(cluster, n1, "qq")
    await one.send({"action": "client-message", "content": "from one"})
    assert (await two.recv())["content"] == "from one"
    # No second user_joined on the other node: the message comes next.
    got = await watcher.recv()
    assert (got["type"], got["user_id"], got["data"]) == ("message", "qq", "from one")
    # A wcp user anywhere is refused (bridges on several nodes:
    # tests/test_cluster_bridges.py).
    impostor = await wcp(cluster, n1, "qq")
    assert await impostor.recv() == {"type": "error", "message": "user_id already in use"}
    # The first leaves: still held (in Redis too), nobody hears of it.
    await one.close()
    late = await wcp(cluster, n2, "qq")
    assert await late.recv() == {"type": "error", "message": "user_id already in use"}
    await two.send({"action": "client-message", "content": "still here"})
    got = await watcher.recv()
    assert (got["type"], got["data"]) == ("message", "still here")
    # The last leaves: one user_left everywhere, and the name is free.
    await two.close()
    assert await watcher.recv() == {"type": "user_left", "user_id": "qq"}
    free = await wcp(cluster, n2, "qq")
    await until(watcher, joined("qq"))
    await free.send({"type": "message", "data": "mine now"})
    got = await watcher.recv()
    assert (got["user_id"], got["data"]) == ("qq", "mine now")
