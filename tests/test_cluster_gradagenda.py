"""GradAgenda across three real chatd nodes sharing Redis and PostgreSQL:
every device gets every message of its sessions once, in ``seq`` order,
checked against the database; session changes reach every node."""

from __future__ import annotations

import json

import psycopg
import trio

from tests.cluster_helpers import Cluster, Node, cluster, redis_server  # noqa: F401
from tests.conftest import GUARD, Peer
from tests.pg import pg_run_database, pg_url  # noqa: F401
from tests.test_gradagenda import auth, create, direct, history, message, ok


async def login(cluster: Cluster, node: Node, user: str, device: str = "phone") -> Peer:
    peer = await cluster.connect(node, "gradagenda")
    await peer.send(auth(user, device))
    assert await peer.recv() == ok("auth")
    return peer


def stored(pg_url: str, session_id: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT seq, sender_id, message FROM messages WHERE session_id = %s "
                            "ORDER BY seq", (session_id,)).fetchall()


async def send_all(peer: Peer, session_id: str, sender: str, count: int, window: int = 16,
                   ) -> list[int]:
    """Send ``count`` messages, ``window`` unconfirmed at most; the seqs confirmed."""
    confirmed: list[int] = []
    sent = 0
    while len(confirmed) < count:
        while sent < count and sent - len(confirmed) < window:
            await peer.send(message(session_id, f"{sender} {sent}", cdid=f"{sender}-{sent}"))
            sent += 1
        frame = await peer.recv()
        if frame.get("cdid", "").startswith(f"{sender}-"):
            assert frame["type"] == "message-broadcast", frame
            confirmed.append(frame["seq"])
    return confirmed


async def broadcasts(peer: Peer, count: int) -> list[dict]:
    got = []
    with trio.fail_after(3 * GUARD):
        while len(got) < count:
            frame = await peer.recv()
            if frame["type"] == "message-broadcast":
                got.append(frame)
    return got


async def test_devices_on_three_nodes_get_every_message_once_in_order(cluster, pg_url):
    nodes = await cluster.nodes_up("n1", "n2", "n3")
    senders = ["bob", "carol", "dave"]
    creator = await login(cluster, nodes[0], "bob", "creator")
    info = await create(creator, "alice", *senders)
    session_id = info["session-id"]
    devices = [await login(cluster, node, "alice", f"dev-{node.name}") for node in nodes]
    peers = [await login(cluster, node, user) for node, user in zip(nodes, senders, strict=True)]
    per_sender = 60
    confirmed: dict[str, list[int]] = {}

    async def run(peer: Peer, sender: str) -> None:
        confirmed[sender] = await send_all(peer, session_id, sender, per_sender)

    with trio.fail_after(6 * GUARD):
        async with trio.open_nursery() as senders_at_once:
            for peer, sender in zip(peers, senders, strict=True):
                senders_at_once.start_soon(run, peer, sender)
    total = per_sender * len(senders)
    rows = stored(pg_url, session_id)
    assert [row[0] for row in rows] == list(range(1, total + 1))
    assert sorted(seq for seqs in confirmed.values() for seq in seqs) == list(range(1, total + 1))
    for device in devices:
        got = await broadcasts(device, total)
        assert [f["seq"] for f in got] == list(range(1, total + 1))
        assert [(f["sender-id"], f["message"]["body"]) for f in got] == [
            (sender, json.loads(text)["body"]) for _, sender, text in rows]
    # Every sender's other devices got them all too (bob's creator device).
    assert [f["seq"] for f in await broadcasts(creator, total)] == list(range(1, total + 1))
    # History is the same from every node.
    for node in nodes:
        reader = await login(cluster, node, "carol", f"reader-{node.name}")
        assert [m["seq"] for m in await history(reader, session_id, after=total - 50)] == list(
            range(total - 49, total + 1))


async def test_session_changes_reach_every_device_on_every_node(cluster):
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3")
    alice = await login(cluster, n1, "alice")
    bob = await login(cluster, n2, "bob")
    carol = await login(cluster, n3, "carol")
    info = await create(alice, "bob")
    session_id = info["session-id"]
    created = await bob.recv()
    assert (created["session-id"], created["status"], created["user-id"]) == (
        session_id, "created", ["alice", "bob"])
    # A session created on n1 is known on n2 and n3: members use it there.
    await bob.send(message(session_id, "hi from n2", cdid="b1"))
    assert (await bob.recv())["cdid"] == "b1"
    assert (await alice.recv())["message"]["body"] == "hi from n2"
    # Roles cross nodes (issue 23): alice, the owner, on n1 makes bob an
    # admin; bob, on n2, adds carol (on n3); alice leaves, and the group
    # passes to its admin, bob. Every old and new member, on every node,
    # hears each change.
    await alice.send({"type": "request-mutable-session-modification", "cdid": "adm",
                      "session-id": session_id, "user-id": ["alice", "bob"],
                      "admin-id": ["bob"]})
    assert (await alice.recv())["cdid"] == "adm"
    got = await bob.recv()
    assert (got["owner-id"], got["admin-id"]) == (["alice"], ["bob"])
    await bob.send({"type": "request-mutable-session-modification", "cdid": "mod",
                    "session-id": session_id, "user-id": ["alice", "bob", "carol"]})
    answer = await bob.recv()
    assert (answer["status"], answer["cdid"]) == ("modified", "mod")
    for peer in (alice, carol):
        got = await peer.recv()
        assert (got["status"], got["user-id"]) == ("modified", ["alice", "bob", "carol"])
    await alice.send({"type": "request-mutable-session-modification", "cdid": "bye",
                      "session-id": session_id, "user-id": ["bob", "carol"]})
    assert (await alice.recv())["cdid"] == "bye"
    for peer in (bob, carol):
        got = await peer.recv()
        assert (got["user-id"], got["owner-id"], got["admin-id"]) == (
            ["bob", "carol"], ["bob"], [])
    # alice is out everywhere; carol (on n3) is in and gets what follows.
    await alice.send(message(session_id, "still here?", cdid="a2"))
    assert (await alice.recv())["message"] == "not a member of this session"
    await carol.send(message(session_id, "hello from n3", cdid="c1"))
    assert (await carol.recv())["seq"] == 2
    assert (await bob.recv())["message"]["body"] == "hello from n3"
    # alice, on n1, no longer gets the session's messages: her next frame is
    # one of another session.
    pair = await direct(bob, "alice")
    await bob.send(message(pair["session-id"], "just us", cdid="b9"))
    assert (await bob.recv())["cdid"] == "b9"
    assert (await alice.recv())["message"]["body"] == "just us"
    # carol, a member, may not delete it; bob, its owner now, may: everyone
    # hears it, and nobody can use it on any node.
    await carol.send({"type": "request-mutable-session-deletion", "cdid": "del",
                      "session-id": session_id})
    assert (await carol.recv())["status"] == "failed"
    await bob.send({"type": "request-mutable-session-deletion", "cdid": "del",
                    "session-id": session_id})
    assert (await bob.recv())["status"] == "deleted"
    assert (await carol.recv())["status"] == "deleted"
    await bob.send(message(session_id, "gone?", cdid="b2"))
    assert (await bob.recv())["message"] == "no such session"


async def test_a_direct_session_asked_for_on_one_node_is_usable_on_another(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    alice = await login(cluster, n1, "alice")
    bob = await login(cluster, n2, "bob")
    info = await direct(alice, "bob")
    await alice.send(message(info["session-id"], "hi bob", cdid="a1"))
    assert (await alice.recv())["seq"] == 1
    got = await bob.recv()
    assert (got["seq"], got["sender-id"], got["message"]["body"]) == (1, "alice", "hi bob")
    await bob.send(message(info["session-id"], "hi alice", cdid="b1"))
    assert (await bob.recv())["seq"] == 2
    assert (await alice.recv())["seq"] == 2


async def test_a_device_logging_in_mid_stream_gets_everything_after_without_gaps(cluster, pg_url):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    bob = await login(cluster, n1, "bob")
    carol = await login(cluster, n2, "carol")
    session_id = (await create(bob, "alice", "carol"))["session-id"]
    await carol.recv()
    late: list[Peer] = []

    async def stream(peer: Peer, sender: str) -> None:
        await send_all(peer, session_id, sender, 150, window=8)

    async def log_in_meanwhile() -> None:
        while len(stored(pg_url, session_id)) < 40:
            await trio.sleep(0.02)  # waiting for the stream to be under way
        late.append(await login(cluster, n2, "alice", "late-phone"))
        late.append(await login(cluster, n1, "alice", "late-laptop"))

    with trio.fail_after(6 * GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, bob, "bob")
            nursery.start_soon(stream, carol, "carol")
            nursery.start_soon(log_in_meanwhile)
    for device in late:
        got: list[int] = []
        with trio.fail_after(3 * GUARD):
            while not got or got[-1] < 300:
                frame = await device.recv()
                if frame["type"] == "message-broadcast":
                    got.append(frame["seq"])
        assert got == list(range(got[0], 301)), got[:20]  # from its login on, every one


async def test_a_message_whose_publish_was_lost_is_filled_from_the_store(cluster, pg_url):
    # A node that committed a message and died before publishing it: no
    # other node ever hears of it, until the next message shows the gap.
    n1, n2 = await cluster.nodes_up("n1", "n2")
    alice = await login(cluster, n1, "alice")
    carol = await login(cluster, n2, "carol")
    session_id = (await create(alice, "carol"))["session-id"]
    await carol.recv()
    await carol.send(message(session_id, "one", cdid="c1"))
    assert (await carol.recv())["seq"] == 1
    assert (await alice.recv())["seq"] == 1
    with psycopg.connect(pg_url) as conn:  # committed elsewhere, never published
        conn.execute(
            "WITH s AS (UPDATE sessions SET last_seq = last_seq + 1 WHERE id = %s "
            "RETURNING id, last_seq) INSERT INTO messages (session_id, seq, sender_id, message, "
            "sender_timestamp, server_timestamp) SELECT id, last_seq, 'carol', %s, 1, 2 FROM s",
            (session_id, json.dumps({"type": "text", "body": "lost in transit"})))
    await carol.send(message(session_id, "three", cdid="c3"))
    for device in (carol, alice):  # the sender's node too: its own answer waits for seq 2
        got = [await device.recv() for _ in range(2)]
        assert [(f["seq"], f["message"]["body"]) for f in got] == [(2, "lost in transit"),
                                                                   (3, "three")]
    assert got[1].get("cdid") is None and "cdid" not in got[0]


async def test_a_message_from_a_node_that_missed_a_membership_change_reaches_the_new_member(
        cluster, pg_url):
    # carol was added, but the news never left the node that added her (it
    # died before publishing). dave's node still knows the old members when
    # dave speaks: the store says the members changed, so the message goes
    # to the members the store has, and carol's node learns of the session.
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3")
    alice = await login(cluster, n1, "alice")
    carol = await login(cluster, n2, "carol")
    dave = await login(cluster, n3, "dave")
    session_id = (await create(alice, "dave"))["session-id"]
    assert (await dave.recv())["status"] == "created"
    with psycopg.connect(pg_url) as conn:  # what set_members commits, never published
        conn.execute("UPDATE sessions SET members_version = members_version + 1 WHERE id = %s",
                     (session_id,))
        conn.execute("INSERT INTO members (session_id, user_id, since_seq) "
                     "SELECT id, 'carol', last_seq FROM sessions WHERE id = %s", (session_id,))
    await dave.send(message(session_id, "to all of you", cdid="d1"))
    assert (await dave.recv())["seq"] == 1
    told, got = await carol.recv(), await carol.recv()
    assert (told["type"], told["status"], told["user-id"]) == (
        "providing-session-info", "modified", ["alice", "carol", "dave"])
    assert (got["type"], got["seq"], got["message"]["body"]) == (
        "message-broadcast", 1, "to all of you")
    assert (await alice.recv())["seq"] == 1
