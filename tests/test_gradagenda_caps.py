"""max-sessions-per-user: nobody can put a user into unlimited sessions
(issue #9 item 12)."""

from __future__ import annotations

from chatd.sessions import Sessions
from tests.test_gradagenda import answers, create, direct, failed, login

CAP = 3


async def start(chat):
    server = await chat.start(max_sessions_per_user=CAP)
    # Until server.py passes config.max_sessions_per_user to Sessions.
    for service in server.services:
        if isinstance(service, Sessions):
            service.max_sessions_per_user = server.config.max_sessions_per_user
    return server


async def listed(peer, cdid="ls") -> list[str]:
    await peer.send({"type": "request-mutable-session-listing", "cdid": cdid})
    return [info["session-id"] for info in (await answers(peer, cdid))[0]]


async def test_a_group_that_would_put_a_user_over_the_cap_is_refused_naming_them(chat):
    await start(chat)
    mallory, bob, carol = [await login(chat, name) for name in ("mallory", "bob", "carol")]
    groups = []
    for n in range(CAP):
        groups.append((await create(mallory, "bob", cdid=f"g{n}"))["session-id"])
        await bob.recv()
    await mallory.send({"type": "request-mutable-session-creation", "cdid": "one-more",
                        "user-id": ["bob", "carol"]})
    answer = await failed(mallory, "one-more")
    assert answer == f"bob, mallory are already in {CAP} sessions (max-sessions-per-user)"
    # Mallory is at the cap too, as creator of all three. Nothing was
    # stored or sent: carol is in no session, bob in the same three.
    assert await listed(carol) == []
    assert sorted(await listed(bob)) == sorted(groups)


async def test_modifying_and_direct_sessions_respect_the_cap_and_leaving_frees_a_place(chat):
    await start(chat)
    alice, bob = await login(chat, "alice"), await login(chat, "bob")
    full = [(await create(bob, cdid=f"b{n}"))["session-id"] for n in range(CAP)]
    mine = (await create(alice, cdid="mine"))["session-id"]
    await alice.send({"type": "request-mutable-session-modification", "cdid": "add-bob",
                      "session-id": mine, "user-id": ["alice", "bob"]})
    refusal = f"bob is already in {CAP} sessions (max-sessions-per-user)"
    assert await failed(alice, "add-bob") == refusal
    await alice.send({"type": "request-direct-session-info", "cdid": "d", "user-id": "bob"})
    assert await failed(alice, "d") == refusal
    # Bob leaves one group; now alice may add him.
    await bob.send({"type": "request-mutable-session-deletion", "cdid": "del",
                    "session-id": full[0]})
    assert (await bob.recv())["status"] == "deleted"
    assert (await direct(alice, "bob"))["user-id"] == ["alice", "bob"]
