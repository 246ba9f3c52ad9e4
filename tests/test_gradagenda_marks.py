"""GradAgenda delivery and read marks (issue 23) against real servers: two
devices, two nodes, forward only, after a restart, read marks turned off."""

from __future__ import annotations

import signal

import trio

from chatd.events import FlushMarks
from chatd.marks import MARKS_BYTES, Marks, chunks
from chatd.sessions import Sessions
from chatd.store.sqlite import SQLiteStore
from tests.cluster_helpers import cluster, redis_server  # noqa: F401 (fixtures)
from tests.conftest import GUARD, Peer
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.test_cluster_gradagenda import login as node_login
from tests.test_gradagenda import create, login, message, ok
from tests.test_gradagenda_persistence import Server, store  # noqa: F401 (fixture)


def mark(session_id: str, cdid: str = "mk", **seqs: int) -> dict:
    return {"type": "request-marking-messages", "cdid": cdid, "session-id": session_id,
            **{key.replace("_", "-"): value for key, value in seqs.items()}}


async def marks_of(peer: Peer, session_id: str, user: str, *, delivered: int,
                   read: int | None = -1) -> dict:
    """Read ``peer``'s frames until a providing-marks shows ``user`` at
    ``delivered`` (and ``read``; None: no read-seq); that mark. Marks are
    coalesced, so earlier values may or may not be seen first."""
    with trio.fail_after(GUARD):
        while True:
            frame = await peer.recv()
            if frame["type"] != "providing-marks" or frame["session-id"] != session_id:
                continue
            for entry in frame["marks"]:
                if entry["user-id"] == user and entry["delivered-seq"] == delivered and (
                        read == -1 or entry.get("read-seq") == read):
                    return entry


async def send(peer: Peer, session_id: str, count: int) -> None:
    for n in range(count):
        await peer.send(message(session_id, f"m{n}", cdid=f"s{n}"))
        while (await peer.recv()).get("cdid") != f"s{n}":
            pass


async def test_marks_reach_every_device_of_every_member_and_only_move_forward(chat):
    await chat.start()
    phone = await login(chat, "alice", "phone")
    laptop = await login(chat, "alice", "laptop")
    bob = await login(chat, "bob", "phone")
    bob_tablet = await login(chat, "bob", "tablet")
    session_id = (await create(phone, "bob"))["session-id"]
    await send(phone, session_id, 3)
    await bob.send(mark(session_id, delivered_seq=3, read_seq=2))
    assert await answers_ok(bob, "mk")
    for peer in (phone, laptop, bob_tablet):
        assert await marks_of(peer, session_id, "bob", delivered=3, read=2) == {
            "user-id": "bob", "delivered-seq": 3, "read-seq": 2}
    # Backwards is ignored, past the newest message is cut to it; read
    # implies delivered.
    await bob.send(mark(session_id, "back", read_seq=1, delivered_seq=1))
    assert await answers_ok(bob, "back")
    await bob_tablet.send(mark(session_id, "far", read_seq=99))
    assert await answers_ok(bob_tablet, "far")
    assert await marks_of(phone, session_id, "bob", delivered=3, read=3)
    await laptop.send({"type": "request-marks", "cdid": "ask", "session-id": session_id})
    got = await asked(laptop, "ask")
    assert got == [{"type": "providing-marks", "session-id": session_id,
                    "marks": [{"user-id": "bob", "delivered-seq": 3, "read-seq": 3}]}]
    # A mark needs a seq; a non-member may neither mark nor read the marks.
    await bob.send({"type": "request-marking-messages", "cdid": "none", "session-id": session_id})
    assert "delivered-seq or read-seq" in await refused(bob, "none")
    mallory = await login(chat, "mallory")
    await mallory.send(mark(session_id, "evil", read_seq=1))
    assert "member" in await refused(mallory, "evil")
    await mallory.send({"type": "request-marks", "cdid": "peek", "session-id": session_id})
    assert "member" in await refused(mallory, "peek")


async def asked(peer: Peer, cdid: str) -> list[dict]:
    """The actions answering ``cdid`` (its batch frames, up to the end
    marker), skipping frames that do not carry it (marks flushed meanwhile)."""
    actions: list[dict] = []
    with trio.fail_after(GUARD):
        while True:
            frame = await peer.recv()
            if frame == ok(cdid):
                return actions
            if frame["type"] == "batch-mode-action" and frame.get("cdid") == cdid:
                actions += frame["actions"]


async def refused(peer: Peer, cdid: str) -> str:
    """Skip marks flushed meanwhile; ``cdid``'s failed answer: its message."""
    with trio.fail_after(GUARD):
        while True:
            frame = await peer.recv()
            if frame["type"] != "providing-marks":
                assert frame["type"] == "status-response" and frame["status"] == "failed"
                assert frame["cdid"] == cdid, frame
                return frame["message"]


async def answers_ok(peer: Peer, cdid: str) -> bool:
    """Skip other frames (marks, broadcasts) up to ``cdid``'s answer: True if it succeeded."""
    with trio.fail_after(GUARD):
        while True:
            frame = await peer.recv()
            if frame.get("cdid") == cdid:
                assert frame == ok(cdid), frame
                return True


async def test_a_user_who_turns_read_marks_off_shows_delivery_only(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await send(alice, session_id, 2)
    await bob.send({"type": "request-read-marks-setting", "cdid": "off", "enabled": False})
    assert await answers_ok(bob, "off")
    await bob.send(mark(session_id, read_seq=2))
    assert await answers_ok(bob, "mk")
    assert await marks_of(alice, session_id, "bob", delivered=2, read=None) == {
        "user-id": "bob", "delivered-seq": 2}
    await bob.send({"type": "request-read-marks-setting", "cdid": "on", "enabled": True})
    assert await answers_ok(bob, "on")
    await alice.send({"type": "request-marks", "cdid": "ask", "session-id": session_id})
    got = await asked(alice, "ask")
    assert got[0]["marks"] == [{"user-id": "bob", "delivered-seq": 2, "read-seq": 2}]


async def test_marks_survive_a_restart_and_come_with_the_listing(process, tmp_path, nursery,
                                                                  store):  # noqa: F811
    server = Server(process, tmp_path, nursery, store)
    await server.start()
    alice = await server.login("alice")
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c",
                      "user-id": ["bob"]})
    session_id = (await alice.recv())["session-id"]
    await send(alice, session_id, 2)
    await alice.send(mark(session_id, read_seq=2))
    assert await answers_ok(alice, "mk")
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    await server.start()
    bob = await server.login("bob")
    await bob.send({"type": "request-mutable-session-listing", "cdid": "l"})
    got = await asked(bob, "l")
    assert [g["type"] for g in got] == ["providing-session-info", "providing-marks"]
    assert got[1]["marks"] == [{"user-id": "alice", "delivered-seq": 2, "read-seq": 2}]
    # Still forward only after the restart.
    await alice_again(server, session_id)


async def alice_again(server: Server, session_id: str) -> None:
    alice = await server.login("alice")
    await alice.send(mark(session_id, read_seq=1))
    assert await answers_ok(alice, "mk")
    await alice.send({"type": "request-marks", "cdid": "ask", "session-id": session_id})
    got = await asked(alice, "ask")
    assert got[0]["marks"] == [{"user-id": "alice", "delivered-seq": 2, "read-seq": 2}]


async def test_marks_cross_nodes(cluster):  # noqa: F811
    n1, n2 = await cluster.nodes_up("n1", "n2")
    alice = await node_login(cluster, n1, "alice")
    alice_laptop = await node_login(cluster, n2, "alice", "laptop")
    bob = await node_login(cluster, n2, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await send(alice, session_id, 2)
    await bob.send(mark(session_id, delivered_seq=2, read_seq=1))
    assert await answers_ok(bob, "mk")
    assert await marks_of(alice, session_id, "bob", delivered=2, read=1)  # n1
    assert await marks_of(alice_laptop, session_id, "bob", delivered=2, read=1)  # n2
    await alice.send({"type": "request-marks", "cdid": "ask", "session-id": session_id})
    got = await asked(alice, "ask")
    assert got[0]["marks"] == [{"user-id": "bob", "delivered-seq": 2, "read-seq": 1}]


# --- coalescing, in the service itself -------------------------------------------


async def test_marks_that_move_many_times_between_flushes_go_out_once_per_session():
    sessions = Sessions(SQLiteStore(":memory:"))
    marks = Marks(sessions, flush_ms=250)
    for seq in range(1, 101):
        marks.note("s1", ("bob", seq, seq))
        marks.note("s1", ("carol", seq, None))
        marks.note("s2", ("bob", seq, seq - 1))
    # One pending mark per session and user: the newest.
    assert marks.pending == {"s1": {"bob": ("bob", 100, 100), "carol": ("carol", 100, None)},
                             "s2": {"bob": ("bob", 100, 99)}}
    marks.flush(FlushMarks())
    assert marks.pending == {}


def test_a_large_groups_marks_are_split_to_fit_the_frame_limit():
    from chatd.protocols.gradagenda import GradAgenda
    users = [("u" * 60 + f"{n:03d}", n, n) for n in range(100)]
    events = chunks("mutable-" + "0" * 24, users)
    assert len(events) > 1
    assert [m.user for e in events for m in e.marks] == [u for u, _, _ in users]
    for event in events:
        assert len(GradAgenda.encode(event)) <= MARKS_BYTES + 200 < 4096
