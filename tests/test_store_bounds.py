"""What one GradAgenda user can make the store keep is bounded, and no
user can reset a bound by leaving, reconnecting or a server restart
(issue 19 item 2: one user created 1,200 groups of made-up ids in 20 s,
left each one, and every start loaded them all).

Bounds: ``max-groups-per-user`` (groups a user created that are still
stored, left or not), ``max-members-per-session``,
``max-messages-per-user-per-session``; direct sessions, which cannot be
left or deleted, stay under ``max-sessions-per-user``. Each refusal is a
failed ``status-response`` that names the key. The restart tests run a
real chatd process on a SQLite file and on PostgreSQL, ``kill -9``
included.
"""

from __future__ import annotations

import signal

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GUARD, Peer
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.test_gradagenda import create, failed, login, message, ok
from tests.test_gradagenda_persistence import Server

GROUPS, MEMBERS, MESSAGES = 3, 5, 4
BOUNDS = {"max_groups_per_user": GROUPS, "max_members_per_session": MEMBERS,
          "max_messages_per_user_per_session": MESSAGES}
GROUPS_REFUSAL = (f"you have created {GROUPS} groups that are still stored "
                  "(max-groups-per-user): delete one first (a group you left counts until "
                  "its members delete it)")
MESSAGES_REFUSAL = (f"you have {MESSAGES} messages stored in this session "
                    "(max-messages-per-user-per-session)")


def members_refusal(count: int) -> str:
    return (f"a session has at most {MEMBERS} members (max-members-per-session); "
            f"this one would have {count}")


async def leave(peer: Peer, session_id: str, members: list[str], cdid: str = "leave") -> None:
    """Modify the group to ``members`` (without the asker): it leaves."""
    await peer.send({"type": "request-mutable-session-modification", "cdid": cdid,
                     "session-id": session_id, "user-id": members})
    info = await peer.recv()
    assert info["cdid"] == cdid and info["status"] == "modified", info


async def send(peer: Peer, session_id: str, body: str, cdid: str) -> dict:
    await peer.send(message(session_id, body, cdid=cdid))
    return await peer.recv()


# --- one server ------------------------------------------------------------------------


async def test_groups_left_by_their_creator_still_count(chat):
    await chat.start(**BOUNDS)
    mallory = await login(chat, "mallory")
    for n in range(GROUPS):
        made_up = [f"ghost-{n}-{i}" for i in range(MEMBERS - 1)]
        group = await create(mallory, *made_up, cdid=f"g{n}")
        await leave(mallory, group["session-id"], made_up, cdid=f"l{n}")
    # She is in no group now, yet may create no more.
    await mallory.send({"type": "request-mutable-session-creation", "cdid": "more",
                        "user-id": ["ghost-x"]})
    assert await failed(mallory, "more") == GROUPS_REFUSAL
    # Nobody else is affected, and nothing of the refused group exists.
    bob = await login(chat, "bob")
    assert (await create(bob, "carol"))["status"] == "created"
    await mallory.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    assert await mallory.recv() == ok("ls")


async def test_deleting_a_group_gives_its_place_back(chat):
    await chat.start(**BOUNDS)
    alice = await login(chat, "alice")
    groups = [(await create(alice, "bob", cdid=f"g{n}"))["session-id"] for n in range(GROUPS)]
    await alice.send({"type": "request-mutable-session-creation", "cdid": "more",
                      "user-id": ["bob"]})
    assert await failed(alice, "more") == GROUPS_REFUSAL
    await alice.send({"type": "request-mutable-session-deletion", "cdid": "del",
                      "session-id": groups[0]})
    assert (await alice.recv())["status"] == "deleted"
    assert (await create(alice, "bob", cdid="again"))["status"] == "created"


async def test_a_session_has_at_most_max_members(chat):
    await chat.start(**BOUNDS)
    alice = await login(chat, "alice")
    others = [f"user-{i}" for i in range(MEMBERS)]
    await alice.send({"type": "request-mutable-session-creation", "cdid": "big",
                      "user-id": others})  # with alice: one too many
    assert await failed(alice, "big") == members_refusal(MEMBERS + 1)
    group = await create(alice, *others[:MEMBERS - 1])
    assert len(group["user-id"]) == MEMBERS
    await alice.send({"type": "request-mutable-session-modification", "cdid": "grow",
                      "session-id": group["session-id"], "user-id": ["alice", *others]})
    assert await failed(alice, "grow") == members_refusal(MEMBERS + 1)
    # Swapping members within the bound is fine.
    await leave(alice, group["session-id"], ["alice", *others[1:]])


async def test_messages_per_user_per_session_are_bounded_per_sender(chat):
    await chat.start(**BOUNDS, message_burst=1000)
    alice, bob = await login(chat, "alice"), await login(chat, "bob")
    session = (await create(alice, "bob"))["session-id"]
    assert (await bob.recv())["status"] == "created"
    for n in range(MESSAGES):
        assert (await send(alice, session, f"a{n}", f"a{n}"))["type"] == "message-broadcast"
        assert (await bob.recv())["seq"] == n + 1
    await alice.send(message(session, "one too many", cdid="over"))
    assert await failed(alice, "over") == MESSAGES_REFUSAL
    # One member's flood does not silence the others.
    assert (await send(bob, session, "bob speaks", "b"))["seq"] == MESSAGES + 1
    assert (await alice.recv())["message"]["body"] == "bob speaks"


# --- the bounds hold across restarts ----------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "chatd.db")
    return request.getfixturevalue("pg_url")


def bounded_server(process, tmp_path, nursery, store: str) -> Server:
    """A chatd process with the bounds above, and clients for it."""
    return Server(process, tmp_path, nursery, store, **{
        "max-groups-per-user": GROUPS, "max-members-per-session": MEMBERS,
        "max-messages-per-user-per-session": MESSAGES})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "kill-9"])
async def test_no_restart_resets_a_bound(process, tmp_path, nursery, store, sig):
    server = bounded_server(process, tmp_path, nursery, store)
    await server.start()
    mallory = await server.login("mallory")
    for n in range(GROUPS - 1):
        made_up = [f"ghost-{n}-{i}" for i in range(MEMBERS - 1)]
        group = await create(mallory, *made_up, cdid=f"g{n}")
        await leave(mallory, group["session-id"], made_up, cdid=f"l{n}")
    chat = (await create(mallory, "bob", cdid="chat"))["session-id"]
    for n in range(MESSAGES - 1):
        assert (await send(mallory, chat, f"m{n}", f"m{n}"))["seq"] == n + 1
    await server.stop(sig)
    await server.start()
    mallory = await server.login("mallory")
    # The last message and the last group left before the bound: the
    # counts came back from the store, not from zero.
    assert (await send(mallory, chat, "last", "last"))["seq"] == MESSAGES
    await mallory.send(message(chat, "over", cdid="over"))
    assert await failed(mallory, "over") == MESSAGES_REFUSAL
    await mallory.send({"type": "request-mutable-session-creation", "cdid": "more",
                        "user-id": ["ghost-x"]})
    assert await failed(mallory, "more") == GROUPS_REFUSAL
    await server.stop()


# --- any sequence of actions ------------------------------------------------------------

_actions = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(min_value=0, max_value=MEMBERS + 1)),
    st.tuples(st.just("leave"), st.integers(min_value=0, max_value=10)),
    st.tuples(st.just("delete"), st.integers(min_value=0, max_value=10)),
    st.tuples(st.just("send"), st.integers(min_value=0, max_value=10)),
), max_size=25)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(actions=_actions)
def test_any_sequence_of_actions_stays_within_the_bounds(actions):
    """Creating groups of any size, leaving them, deleting them and
    sending, in any order: each answer is the one a model of the bounds
    predicts, so the store never keeps more than the bounds allow."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from tests.conftest import Harness

    async def main():
        with TemporaryDirectory() as tmp:
            async with trio.open_nursery() as nursery:
                chat = Harness(nursery, Path(tmp))
                server = await chat.start(**BOUNDS, store=":memory:", message_burst=1000)
                await run(chat)
                server.shutdown()
                with trio.fail_after(GUARD):
                    await server.stopped.wait()
                nursery.cancel_scope.cancel()

    async def run(chat):
        user = await login(chat, "user")
        created: list[str] = []   # groups the user created, still stored
        member_of: list[str] = []  # of those, the ones the user is still in
        sent: dict[str, int] = {}
        for step, (kind, arg) in enumerate(actions):
            cdid = f"s{step}"
            if kind == "create":
                made_up = [f"ghost-{step}-{i}" for i in range(arg)]
                await user.send({"type": "request-mutable-session-creation", "cdid": cdid,
                                 "user-id": made_up})
                if arg + 1 > MEMBERS:
                    assert await failed(user, cdid) == members_refusal(arg + 1)
                elif len(created) >= GROUPS:
                    assert await failed(user, cdid) == GROUPS_REFUSAL
                else:
                    info = await user.recv()
                    assert info["status"] == "created", info
                    created.append(info["session-id"])
                    member_of.append(info["session-id"])
            elif not member_of:
                continue
            elif kind == "leave":
                session = member_of.pop(arg % len(member_of))
                await leave(user, session, [f"ghost-{step}"], cdid=cdid)
            elif kind == "delete":
                session = member_of.pop(arg % len(member_of))
                await user.send({"type": "request-mutable-session-deletion", "cdid": cdid,
                                 "session-id": session})
                assert (await user.recv())["status"] == "deleted"
                created.remove(session)
            else:
                session = member_of[arg % len(member_of)]
                await user.send(message(session, "hi", cdid=cdid))
                if sent.get(session, 0) >= MESSAGES:
                    assert await failed(user, cdid) == MESSAGES_REFUSAL
                else:
                    assert (await user.recv())["type"] == "message-broadcast"
                    sent[session] = sent.get(session, 0) + 1

    trio.run(main)
