"""GradAgenda group access control (issue 23): owners, admins, members,
leaving and the hand-on rule, against a real server; and the rules alone."""

from __future__ import annotations

import signal

import pytest

from chatd import roles
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.test_gradagenda import create, failed, login
from tests.test_gradagenda_persistence import Server, store  # noqa: F401 (fixture)


def modify(session_id: str, users: list[str], cdid: str = "mod", **extra) -> dict:
    return {"type": "request-mutable-session-modification", "cdid": cdid,
            "session-id": session_id, "user-id": users, **extra}


async def test_the_creator_owns_and_a_member_who_is_not_an_admin_is_refused(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    carol = await login(chat, "carol")
    info = await create(alice, "bob")
    assert (info["owner-id"], info["admin-id"]) == (["alice"], [])
    session_id = info["session-id"]
    assert (await bob.recv())["owner-id"] == ["alice"]
    # bob is a member: he may neither add carol, nor make himself admin, nor delete.
    await bob.send(modify(session_id, ["alice", "bob", "carol"], "add"))
    assert "owner and admins" in await failed(bob, "add")
    await bob.send(modify(session_id, ["alice", "bob"], "self", **{"admin-id": ["bob"]}))
    assert "owner and admins" in await failed(bob, "self")
    await bob.send({"type": "request-mutable-session-deletion", "cdid": "del",
                    "session-id": session_id})
    assert "owner and admins" in await failed(bob, "del")
    # Nothing changed: alice's next change shows the members as they were.
    await alice.send(modify(session_id, ["alice", "bob"], "adm", **{"admin-id": ["bob"]}))
    got = await alice.recv()
    assert (got["cdid"], got["user-id"], got["owner-id"], got["admin-id"]) == (
        "adm", ["alice", "bob"], ["alice"], ["bob"])
    assert (await bob.recv())["admin-id"] == ["bob"]
    # An admin changes the members, but not the admins, and cannot remove the owner.
    await bob.send(modify(session_id, ["alice", "bob", "carol"], "add2"))
    assert (await bob.recv())["user-id"] == ["alice", "bob", "carol"]
    assert (await carol.recv())["status"] == "modified"
    await alice.recv()
    await bob.send(modify(session_id, ["alice", "bob", "carol"], "adm2",
                          **{"admin-id": ["bob", "carol"]}))
    assert "only the group's owner" in await failed(bob, "adm2")
    await bob.send(modify(session_id, ["bob", "carol"], "oust"))
    assert "cannot remove the group's owner" in await failed(bob, "oust")
    # Admins must be members.
    await alice.send(modify(session_id, ["alice", "bob"], "bad", **{"admin-id": ["dave"]}))
    assert "dave" in await failed(alice, "bad")


async def test_any_member_leaves_and_the_last_owner_hands_the_group_on(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    carol = await login(chat, "carol")
    session_id = (await create(alice, "carol", "bob"))["session-id"]
    await bob.recv(), await carol.recv()
    # carol, a plain member, leaves: the members without herself.
    await carol.send(modify(session_id, ["alice", "bob"], "leave"))
    mine = await carol.recv()
    assert (mine["cdid"], mine["user-id"]) == ("leave", ["alice", "bob"])
    await alice.recv(), await bob.recv()
    # A 2014 client leaving the same way while the owner: the group passes
    # on (no admin: the first member in user-id order).
    await alice.send(modify(session_id, ["bob"], "go"))
    assert (await alice.recv())["owner-id"] == ["bob"]
    got = await bob.recv()
    assert (got["user-id"], got["owner-id"], got["admin-id"]) == (["bob"], ["bob"], [])
    # bob owns it now: he may delete it.
    await bob.send({"type": "request-mutable-session-deletion", "cdid": "del",
                    "session-id": session_id})
    assert (await bob.recv())["status"] == "deleted"


async def test_roles_survive_a_restart(process, tmp_path, nursery, store):  # noqa: F811
    server = Server(process, tmp_path, nursery, store)
    await server.start()
    alice = await server.login("alice")
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c",
                      "user-id": ["bob", "carol"]})
    session_id = (await alice.recv())["session-id"]
    await alice.send(modify(session_id, ["alice", "bob", "carol"], **{"admin-id": ["bob"]}))
    assert (await alice.recv())["admin-id"] == ["bob"]
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    await server.start()
    carol = await server.login("carol")
    await carol.send({"type": "request-mutable-session-listing", "cdid": "l"})
    frame = await carol.recv()
    listed = frame["actions"][0]
    assert (listed["owner-id"], listed["admin-id"]) == (["alice"], ["bob"])
    await carol.recv()  # the end marker
    await carol.send(modify(session_id, ["alice", "bob", "carol", "dave"], "add"))
    assert "owner and admins" in await failed(carol, "add")
    bob = await server.login("bob")
    await bob.send(modify(session_id, ["alice", "bob", "carol", "dave"], "add"))
    assert (await bob.recv())["user-id"] == ["alice", "bob", "carol", "dave"]


# --- the rules alone (chatd.roles) ---------------------------------------------


def test_hand_on_prefers_the_first_admin_then_the_first_member():
    assert roles.hand_on({"zed": "admin", "amy": "admin"}, ["bob", "amy", "zed"]) == {
        "zed": "admin", "amy": "owner"}
    assert roles.hand_on({}, ["carol", "bob"]) == {"bob": "owner"}
    assert roles.hand_on({"x": "owner"}, ["x", "a"]) == {"x": "owner"}
    assert roles.hand_on({}, []) == {}


@pytest.mark.parametrize("asker, new, admins, allowed", [
    ("m", {"o", "a"}, None, True),            # a member leaves
    ("m", {"o", "a", "m", "x"}, None, False),  # a member adds
    ("a", {"o", "a", "m", "x"}, None, True),   # an admin adds
    ("a", {"a", "m"}, None, False),            # an admin removes the owner
    ("a", {"o", "a", "m"}, ["m"], False),      # an admin changes the admins
    ("o", {"o", "a", "m"}, ["m"], True),       # the owner does
    ("a", {"o", "m"}, None, True),             # an admin leaves
])
def test_who_may_change_what(asker, new, admins, allowed):
    result = roles.change({"o": "owner", "a": "admin"}, frozenset({"o", "a", "m"}),
                          frozenset(new), asker, admins)
    assert isinstance(result, dict) is allowed, result


def test_groups_stored_before_roles_get_owners_when_the_store_is_migrated(tmp_path):
    import sqlite3

    from chatd.store import sqlite as backend
    path = tmp_path / "v4.db"
    db = sqlite3.connect(path)
    for script in backend.MIGRATIONS[:4]:
        db.executescript(script)
    db.execute("PRAGMA user_version=4")
    for sid, creator, members in (("g1", "alice", ["alice", "bob"]),
                                  ("g2", None, ["carol", "dave"]),
                                  ("g3", "eve", ["frank", "gina"]),
                                  ("d1", None, ["x", "y"])):
        db.execute("INSERT INTO sessions (id, kind, created_ms, created_by) VALUES (?, ?, 0, ?)",
                   (sid, "direct" if sid == "d1" else "mutable", creator))
        db.executemany("INSERT INTO members (session_id, user_id) VALUES (?, ?)",
                       [(sid, user) for user in members])
    db.commit()
    db.close()
    store = backend.SQLiteStore(str(path))
    try:
        assert store.schema_version == len(backend.MIGRATIONS)
        assert store.run_batch([roles.load_roles])[0] == {
            "g1": {"alice": "owner"},                    # its creator
            "g2": {"carol": "owner", "dave": "owner"},   # no creator known: every member
            "g3": {"frank": "owner", "gina": "owner"},   # its creator left: every member
        }
    finally:
        store.close()
