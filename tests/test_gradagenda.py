"""GradAgenda end to end against a real server: accounts, sessions, messages."""

from __future__ import annotations

import json

import pytest

from chatd.sessions import direct_session_id
from chatd.tokens import mint
from tests.conftest import JWT_SECRET, Peer

PATH = "/gradagenda"


def auth(user: str, device: str = "phone", cdid: str = "auth", token: str | None = None) -> dict:
    return {"type": "authenticate", "cdid": cdid, "user-id": user, "device-id": device,
            "token": mint(JWT_SECRET, user) if token is None else token}


def ok(cdid: str) -> dict:
    return {"type": "status-response", "cdid": cdid, "status": "succeeded"}


async def login(chat, user: str, device: str = "phone") -> Peer:
    peer = await chat.connect(PATH)
    await peer.send(auth(user, device))
    assert await peer.recv() == ok("auth")
    return peer


async def failed(peer: Peer, cdid) -> str:
    """The next frame is a failed status-response for ``cdid``; its message."""
    answer = await peer.recv()
    assert answer["type"] == "status-response" and answer["status"] == "failed", answer
    assert answer.get("cdid") == cdid, answer
    return answer["message"]


async def create(peer: Peer, *members: str, cdid: str = "create") -> dict:
    await peer.send({"type": "request-mutable-session-creation", "cdid": cdid,
                     "user-id": list(members)})
    info = await peer.recv()
    assert info["type"] == "providing-session-info" and info["cdid"] == cdid, info
    return info


def message(session_id: str, body: str, cdid: str = "m", **extra) -> dict:
    return {"type": "request-sending-a-message", "cdid": cdid, "session-id": session_id,
            "message": {"type": "text", "body": body}, "sender-timestamp": 1700000000000,
            **extra}


async def direct(peer: Peer, other: str, cdid: str = "direct") -> dict:
    await peer.send({"type": "request-direct-session-info", "cdid": cdid, "user-id": other})
    info = await peer.recv()
    assert info["type"] == "providing-session-info", info
    return info


async def answers(peer: Peer, cdid: str) -> tuple[list[dict], list[str]]:
    """A multi-action answer: its actions, and the raw frames, up to the end marker."""
    actions, frames = [], []
    while True:
        raw = await peer.recv_raw()
        frame = json.loads(raw)
        if frame == ok(cdid):
            return actions, frames
        frames.append(raw)
        if frame["type"] == "batch-mode-action":
            assert frame["cdid"] == cdid
            actions += frame["actions"]
        else:
            actions.append(frame)


async def history(peer: Peer, session_id: str, cdid: str = "h", **params) -> list[dict]:
    await peer.send({"type": "request-message-history", "cdid": cdid, "session-id": session_id,
                     **params})
    return (await answers(peer, cdid))[0]


# --- authentication ----------------------------------------------------------------


async def test_authenticate_succeeds_and_answers_with_the_cdid(chat):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send(auth("alice", cdid="c-1"))
    assert await peer.recv() == ok("c-1")


async def test_bad_tokens_fail_and_the_third_failure_closes_1008(chat):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send(auth("alice", cdid="1", token=mint("another secret", "alice")))
    assert "token" in await failed(peer, "1")
    await peer.send(auth("alice", cdid="2", token=mint(JWT_SECRET, "mallory")))
    assert "token" in await failed(peer, "2")
    # Expired by more than the clock-skew leeway (jwt-leeway, 30 s).
    await peer.send(auth("alice", cdid="3", token=mint(JWT_SECRET, "alice", ttl=-3600)))
    await failed(peer, "3")
    assert await peer.closed() == 1008


@pytest.mark.parametrize("token", ["", "not.a.jwt", mint(JWT_SECRET, "alice", ttl=None)])
async def test_malformed_or_expiry_free_tokens_are_refused(chat, token):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send(auth("alice", token=token))
    await failed(peer, "auth")


@pytest.mark.parametrize("user, device", [("", "phone"), ("a" * 257, "phone"),
                                          ("bell\x07", "phone"), ("alice", ""),
                                          ("alice", "\x1b[31mred")])
async def test_names_unfit_to_show_are_refused_at_authentication(chat, user, device):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send(auth(user, device))
    assert "-id " in await failed(peer, "auth")


async def test_any_other_action_first_fails_then_authentication_still_works(chat):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send({"type": "request-mutable-session-listing", "cdid": "early"})
    assert "authenticate" in await failed(peer, "early")
    await peer.send(auth("alice"))
    assert await peer.recv() == ok("auth")
    await peer.send({"type": "request-mutable-session-listing", "cdid": "l"})
    assert await peer.recv() == ok("l")


async def test_second_authenticate_is_refused_and_the_session_goes_on(chat):
    await chat.start()
    peer = await login(chat, "alice")
    await peer.send(auth("bob", cdid="again"))
    assert "already" in await failed(peer, "again")
    info = await create(peer)
    assert info["user-id"] == ["alice"]


async def test_auth_stage_times_out_with_1008(chat):
    await chat.start(auth_timeout=0.2)
    peer = await chat.connect(PATH)
    assert await peer.closed() == 1008


@pytest.mark.parametrize("authenticated", [False, True])
async def test_invalid_json_closes_1007_and_others_carry_on(chat, authenticated):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob") if authenticated else await chat.connect(PATH)
    await bob.send('{"type": "authenticate", ')
    assert await bob.closed() == 1007
    info = await create(alice, "carol")
    assert info["user-id"] == ["alice", "carol"]


@pytest.mark.parametrize("frame, cdid", [
    ({"type": "no-such-action", "cdid": "x"}, "x"),
    ({"cdid": "x"}, "x"),
    ({"type": "request-mutable-session-creation", "cdid": "x"}, "x"),
    ({"type": "request-mutable-session-creation", "cdid": "x", "user-id": "bob"}, "x"),
    ({"type": "request-mutable-session-creation", "cdid": "x", "user-id": [""]}, "x"),
    ({"type": "request-mutable-session-creation", "cdid": "x", "user-id": ["bob", "a\x1b[2J"]},
     "x"),
    ({"type": "request-direct-session-info", "cdid": "x", "user-id": "b" * 257}, "x"),
    ({"type": "request-sending-a-message", "cdid": "x", "session-id": "s",
      "message": {"type": "text", "body": "hi"}}, "x"),
    ({"type": "request-message-history", "cdid": "x", "session-id": "s", "limit": 0}, "x"),
    ({"type": "request-message-history", "cdid": "x", "session-id": "s", "before": -1}, "x"),
    ({"type": "request-mutable-session-listing"}, None),
    ({"type": "request-mutable-session-listing", "cdid": 7}, 7),
    ([1, 2], None),
    ("just a string", None),
])
async def test_invalid_actions_fail_with_their_cdid_and_keep_the_connection(chat, frame, cdid):
    await chat.start()
    peer = await login(chat, "alice")
    await peer.send(json.dumps(frame))
    await failed(peer, cdid)
    await peer.send({"type": "request-mutable-session-listing", "cdid": "still"})
    assert await peer.recv() == ok("still")


async def test_binary_frames_close_1003_and_oversized_frames_1009(chat):
    await chat.start()
    peer = await login(chat, "alice")
    await peer.ws.send_message(b"{}")
    assert await peer.closed() == 1003
    peer = await login(chat, "alice")
    await peer.send(message("s", "x" * 4096))
    assert await peer.closed() == 1009


async def test_direct_session_id_is_the_same_from_both_sides_and_never_changes(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    first = await direct(alice, "bob", cdid="d1")
    assert first == {"type": "providing-session-info", "cdid": "d1",
                     "session-id": first["session-id"], "session-type": "direct",
                     "status": "unchanged", "user-id": ["alice", "bob"]}
    again = await direct(alice, "bob", cdid="d2")
    theirs = await direct(bob, "alice", cdid="d3")
    assert first["session-id"] == again["session-id"] == theirs["session-id"]
    assert theirs["status"] == again["status"] == "unchanged"
    other = await direct(alice, "carol")
    assert other["session-id"] != first["session-id"]


async def test_direct_session_with_oneself_is_refused(chat):
    await chat.start()
    alice = await login(chat, "alice")
    await alice.send({"type": "request-direct-session-info", "cdid": "me", "user-id": "alice"})
    await failed(alice, "me")


async def test_direct_messages_reach_both_users_and_no_one_else_may_send(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    mallory = await login(chat, "mallory")
    session_id = (await direct(alice, "bob"))["session-id"]
    await bob.send(message(session_id, "hi alice", cdid="b1"))
    mine, theirs = await bob.recv(), await alice.recv()
    assert mine["cdid"] == "b1" and "cdid" not in theirs
    assert theirs["sender-id"] == "bob" and theirs["message"] == {"type": "text", "body": "hi alice"}
    await mallory.send(message(session_id, "let me in", cdid="x"))
    assert "member" in await failed(mallory, "x")
    await mallory.send({"type": "request-message-history", "cdid": "hx", "session-id": session_id})
    assert "member" in await failed(mallory, "hx")


async def test_a_direct_session_must_be_requested_before_messages(chat):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = direct_session_id("alice", "bob")
    await alice.send(message(session_id, "too early", cdid="early"))
    assert "no such session" in await failed(alice, "early")
    assert (await direct(alice, "bob"))["session-id"] == session_id
    await alice.send(message(session_id, "now", cdid="now"))
    assert (await alice.recv())["seq"] == 1


async def test_direct_sessions_cannot_be_modified_or_deleted(chat):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await direct(alice, "bob"))["session-id"]
    await alice.send({"type": "request-mutable-session-modification", "cdid": "mod",
                      "session-id": session_id, "user-id": ["alice", "carol"]})
    assert "direct" in await failed(alice, "mod")
    await alice.send({"type": "request-mutable-session-deletion", "cdid": "del",
                      "session-id": session_id})
    assert "direct" in await failed(alice, "del")


# --- group sessions ------------------------------------------------------------------


async def test_creation_adds_the_creator_and_reaches_every_device_of_every_member(chat):
    await chat.start()
    phone = await login(chat, "alice", "phone")
    laptop = await login(chat, "alice", "laptop")
    bob = await login(chat, "bob")
    info = await create(phone, "bob", "carol", "bob", cdid="new")
    assert info["status"] == "created" and info["session-type"] == "mutable"
    assert info["user-id"] == ["alice", "bob", "carol"]
    plain = {k: v for k, v in info.items() if k != "cdid"}
    assert await laptop.recv() == plain
    assert await bob.recv() == plain


async def test_modification_reaches_old_and_new_members(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    carol = await login(chat, "carol")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    # The owner (issue 23: only owner and admins change the members).
    await alice.send({"type": "request-mutable-session-modification", "cdid": "swap",
                      "session-id": session_id, "user-id": ["alice", "carol"]})
    mine = await alice.recv()
    assert mine["cdid"] == "swap" and mine["status"] == "modified"
    assert mine["user-id"] == ["alice", "carol"]
    plain = {k: v for k, v in mine.items() if k != "cdid"}
    assert await bob.recv() == plain
    assert await carol.recv() == plain
    # Bob left: he may no longer send, read, modify or delete.
    await bob.send(message(session_id, "hello?", cdid="s"))
    assert "member" in await failed(bob, "s")
    await bob.send({"type": "request-message-history", "cdid": "h", "session-id": session_id})
    assert "member" in await failed(bob, "h")
    await bob.send({"type": "request-mutable-session-modification", "cdid": "back",
                    "session-id": session_id, "user-id": ["bob"]})
    assert "member" in await failed(bob, "back")
    await bob.send({"type": "request-mutable-session-deletion", "cdid": "del",
                    "session-id": session_id})
    assert "member" in await failed(bob, "del")
    # Carol, the new member, may send.
    await carol.send(message(session_id, "hi", cdid="c"))
    assert (await carol.recv())["seq"] == 1
    assert (await alice.recv())["sender-id"] == "carol"


async def test_modification_to_nobody_is_refused(chat):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice))["session-id"]
    await alice.send({"type": "request-mutable-session-modification", "cdid": "empty",
                      "session-id": session_id, "user-id": []})
    await failed(alice, "empty")


async def test_deletion_reaches_every_member_and_ends_the_session(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    mallory = await login(chat, "mallory")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    await mallory.send({"type": "request-mutable-session-deletion", "cdid": "evil",
                        "session-id": session_id})
    assert "member" in await failed(mallory, "evil")
    await alice.send({"type": "request-mutable-session-deletion", "cdid": "bye",
                      "session-id": session_id})
    gone = {"type": "providing-session-info", "session-id": session_id,
            "session-type": "mutable", "status": "deleted", "user-id": ["alice", "bob"],
            "owner-id": ["alice"], "admin-id": []}
    assert await alice.recv() == {**gone, "cdid": "bye"}
    assert await bob.recv() == gone
    await bob.send(message(session_id, "anyone?", cdid="late"))
    assert "no such session" in await failed(bob, "late")


async def test_listing_answers_only_the_askers_group_sessions(chat):
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    one = (await create(alice, "bob", cdid="1"))["session-id"]
    two = (await create(alice, cdid="2"))["session-id"]
    await direct(alice, "bob")
    await alice.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    listed, _ = await answers(alice, "ls")
    assert [(s["session-id"], s["status"], s["session-type"]) for s in listed] == [
        (one, "unchanged", "mutable"), (two, "unchanged", "mutable")]
    await bob.recv()  # created
    await bob.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    listed, _ = await answers(bob, "ls")
    assert [s["session-id"] for s in listed] == [one]


async def test_listing_is_split_to_fit_the_frame_limit(chat):
    await chat.start(max_frame_bytes=600)
    alice = await login(chat, "alice")
    created = [(await create(alice, f"user-{i}", cdid=str(i)))["session-id"] for i in range(12)]
    await alice.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    listed, frames = await answers(alice, "ls")
    assert [s["session-id"] for s in listed] == created
    assert len(frames) > 1
    assert all(len(frame.encode()) <= 600 for frame in frames)


# --- messages ------------------------------------------------------------------------


async def test_a_message_reaches_every_device_of_every_member_after_it_is_stored(chat):
    await chat.start()
    phone = await login(chat, "alice", "phone")
    laptop = await login(chat, "alice", "laptop")
    bob = await login(chat, "bob")
    outsider = await login(chat, "mallory")
    session_id = (await create(phone, "bob"))["session-id"]
    await laptop.recv(), await bob.recv()
    for n in (1, 2):
        await phone.send(message(session_id, f"hello {n}", cdid=f"m{n}"))
        mine = await phone.recv()
        assert mine["cdid"] == f"m{n}"
        assert mine["seq"] == n and mine["sender-id"] == "alice"
        assert isinstance(mine["server-timestamp"], int)
        assert mine["sender-timestamp"] == 1700000000000
        plain = {k: v for k, v in mine.items() if k != "cdid"}
        assert await laptop.recv() == plain
        assert await bob.recv() == plain
    # The outsider got none of it: the next frame it sees is its own answer.
    await outsider.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    assert await outsider.recv() == ok("ls")


async def test_a_non_member_cannot_send_or_read(chat):
    await chat.start()
    alice = await login(chat, "alice")
    mallory = await login(chat, "mallory")
    session_id = (await create(alice))["session-id"]
    await mallory.send(message(session_id, "spam", cdid="s"))
    assert "member" in await failed(mallory, "s")
    await mallory.send({"type": "request-message-history", "cdid": "h", "session-id": session_id})
    assert "member" in await failed(mallory, "h")
    await mallory.send(message("mutable-nonexistent", "spam", cdid="n"))
    assert "no such session" in await failed(mallory, "n")
    # Alice got nothing from Mallory's attempts.
    await alice.send(message(session_id, "mine", cdid="a"))
    assert (await alice.recv())["seq"] == 1


@pytest.mark.parametrize("body, problem", [
    ({"type": "sticker", "body": "cat.png"}, "type"),
    # An image needs its upload's media-id (issue 23: tests/test_gradagenda_media.py).
    ({"type": "image", "body": "cat.png"}, "media-id"),
    ({"type": "text", "body": {"rich": True}}, "string"),
    ({"body": "no type"}, "type"),
])
async def test_only_known_message_types_are_accepted(chat, body, problem):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice))["session-id"]
    await alice.send({**message(session_id, "", cdid="x"), "message": body})
    assert problem in await failed(alice, "x")


async def test_a_message_whose_broadcast_would_not_fit_a_frame_is_refused(chat):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice))["session-id"]
    envelope = len(json.dumps(message(session_id, "", cdid="x")).encode())
    await alice.send(message(session_id, "a" * (4096 - envelope), cdid="x"))
    assert "frame" in await failed(alice, "x")
    await alice.send(message(session_id, "a" * 3000, cdid="fits"))
    raw = await alice.recv_raw()
    assert json.loads(raw)["cdid"] == "fits" and len(raw.encode()) <= 4096


async def test_a_pipelined_burst_is_stored_and_broadcast_in_order(chat):
    await chat.start(message_burst=10_000)  # a deliberate burst
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    for n in range(200):
        await alice.send(message(session_id, f"#{n}", cdid=str(n)))
    for n in range(200):
        mine, theirs = await alice.recv(), await bob.recv()
        assert (mine["cdid"], mine["seq"], mine["message"]["body"]) == (str(n), n + 1, f"#{n}")
        assert theirs["seq"] == n + 1


# --- history -------------------------------------------------------------------------


async def test_history_pages_by_before_and_after_and_caps_the_limit(chat):
    await chat.start(message_burst=10_000)  # a deliberate burst
    alice = await login(chat, "alice")
    session_id = (await create(alice))["session-id"]
    for n in range(1, 131):
        await alice.send(message(session_id, f"message number {n}", cdid=str(n)))
    for n in range(1, 131):
        assert (await alice.recv())["seq"] == n

    def seqs(items):
        return [item["seq"] for item in items]

    latest = await history(alice, session_id)
    assert seqs(latest) == list(range(31, 131))
    assert latest[0] == {"type": "message-broadcast", "session-id": session_id,
                         "sender-id": "alice",
                         "message": {"type": "text", "body": "message number 31"},
                         "sender-timestamp": 1700000000000, "seq": 31,
                         "server-timestamp": latest[0]["server-timestamp"]}
    assert seqs(await history(alice, session_id, before=31)) == list(range(1, 31))
    assert seqs(await history(alice, session_id, before=31, limit=10)) == list(range(21, 31))
    assert seqs(await history(alice, session_id, after=120)) == list(range(121, 131))
    assert seqs(await history(alice, session_id, after=5, limit=3)) == [6, 7, 8]
    assert seqs(await history(alice, session_id, after=5, before=9)) == [6, 7, 8]
    assert seqs(await history(alice, session_id, after=0, limit=1000)) == list(range(1, 101))
    assert await history(alice, session_id, after=130) == []


async def test_history_is_split_to_fit_the_frame_limit(chat):
    await chat.start(max_frame_bytes=1024)
    alice = await login(chat, "alice")
    session_id = (await create(alice))["session-id"]
    for n in range(1, 41):
        await alice.send(message(session_id, "x" * 150 + str(n), cdid=str(n)))
    for n in range(1, 41):
        await alice.recv()
    await alice.send({"type": "request-message-history", "cdid": "h", "session-id": session_id})
    items, frames = await answers(alice, "h")
    assert [item["seq"] for item in items] == list(range(1, 41))
    assert len(frames) > 1 and all(len(f.encode()) <= 1024 for f in frames)


async def test_an_offline_device_catches_up_with_history(chat):
    await chat.start()
    phone = await login(chat, "alice", "phone")
    session_id = (await create(phone, "bob"))["session-id"]
    await phone.send(message(session_id, "seen", cdid="1"))
    await phone.recv()
    await phone.close()
    bob = await login(chat, "bob")
    await bob.send(message(session_id, "while you were away", cdid="b"))
    await bob.recv()
    phone = await login(chat, "alice", "phone")
    missed = await history(phone, session_id, after=1)
    assert [(m["seq"], m["sender-id"], m["message"]["body"]) for m in missed] == [
        (2, "bob", "while you were away")]


# --- batches from the client ------------------------------------------------------------


async def test_a_client_batch_acts_like_its_actions_one_by_one(chat):
    await chat.start()
    bob = await login(chat, "bob")
    alice = await chat.connect(PATH)
    await alice.send({"type": "batch-mode-action", "cdid": "b", "actions": [
        auth("alice", cdid="a"),
        {"type": "request-mutable-session-creation", "cdid": "c", "user-id": ["bob"]},
        {"type": "batch-mode-action", "cdid": "nested", "actions": []},
        {"type": "no-such-thing", "cdid": "bad"},
        {"type": "request-mutable-session-listing", "cdid": "ls"},
    ]})
    # Answers are matched by cdid: a failure found while decoding is sent at
    # once, a session change only once it is stored.
    by_cdid = {}
    for _ in range(6):
        frame = await alice.recv()
        if frame["type"] == "batch-mode-action":
            by_cdid.setdefault(frame["cdid"], []).extend(frame["actions"])
        else:
            by_cdid.setdefault(frame.get("cdid"), []).append(frame)
    assert by_cdid["a"] == [ok("a")]
    [created] = by_cdid["c"]
    assert created["status"] == "created" and created["user-id"] == ["alice", "bob"]
    [nested] = by_cdid["nested"]
    assert nested["status"] == "failed" and "nested" in nested["message"]
    [bad] = by_cdid["bad"]
    assert bad["status"] == "failed" and "no-such-thing" in bad["message"]
    *listed, end = by_cdid["ls"]
    assert end == ok("ls")
    assert [s["session-id"] for s in listed] == [created["session-id"]]
    assert (await bob.recv())["session-id"] == created["session-id"]


async def test_failures_inside_a_batch_count_towards_the_three(chat):
    await chat.start()
    peer = await chat.connect(PATH)
    await peer.send({"type": "batch-mode-action", "cdid": "b", "actions": [
        auth("alice", cdid=str(n), token="bad") for n in range(5)]})
    for n in range(3):
        await failed(peer, str(n))
    assert await peer.closed() == 1008


async def test_a_malformed_batch_fails_with_its_cdid(chat):
    await chat.start()
    alice = await login(chat, "alice")
    await alice.send({"type": "batch-mode-action", "cdid": "b", "actions": "nope"})
    await failed(alice, "b")


# --- closing with requests in flight -------------------------------------------------


@pytest.mark.parametrize("how", ["close frame", "half-close"])
async def test_a_client_that_closes_right_after_its_requests_gets_every_answer(chat, how):
    # A client flushing its offline queue may send its messages and its close
    # in one write. Each message chatd accepted is stored and answered before
    # the close echo (RFC 6455 section 5.5.1 lets the server finish sending).
    from tests.rawws import RawClient, close_frame, text
    from wsproto.events import CloseConnection, TextMessage

    await chat.start()
    alice = await login(chat, "alice")
    session = (await create(alice, "bob"))["session-id"]
    raw = await RawClient.connect(chat.server.port, PATH)
    count = 60
    burst = text(json.dumps(auth("alice", "laptop"))) + b"".join(
        text(json.dumps(message(session, f"queued {i}", cdid=f"q{i}"))) for i in range(count))
    if how == "close frame":
        burst += close_frame(1000, "bye")
    await raw.send_bytes(burst)
    if how == "half-close":
        await raw.stream.send_eof()
    answered, close = [], None
    while (event := await raw.next_event()) is not None:
        if isinstance(event, CloseConnection):
            close = event
            break
        assert isinstance(event, TextMessage)
        frame = json.loads(event.data)
        assert frame.get("status", "succeeded") == "succeeded", frame
        answered.append(frame["cdid"])  # the status-response or, to the sender, the broadcast
    assert answered == ["auth"] + [f"q{i}" for i in range(count)]
    if how == "close frame":
        assert (close.code, close.reason) == (1000, "bye")  # the echo, after the answers
    await raw.aclose()
    # Stored, and delivered to the user's other device, in order.
    assert [(await alice.recv())["message"]["body"] for _ in range(count)] == \
        [f"queued {i}" for i in range(count)]
    bodies = [m["message"]["body"] for m in await history(alice, session, limit=count)]
    assert sorted(bodies) == sorted(f"queued {i}" for i in range(count))


@pytest.mark.parametrize("sent", [2**53, -(2**53), 10**30, 2**63 - 1])
async def test_a_sender_timestamp_no_decoder_reads_exactly_is_refused(chat, sent):
    # It is relayed as sent to every device of every member: beyond I-JSON's
    # exact range (RFC 7493 section 2.2) JavaScript would show another
    # number and an int64 decoder would fail on the whole frame.
    await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()  # told of the session
    await alice.send(message(session_id, "when?", cdid="t", **{"sender-timestamp": sent}))
    assert "sender-timestamp" in await failed(alice, "t")
    await alice.send(message(session_id, "now", cdid="n", **{"sender-timestamp": 2**53 - 1}))
    got = await bob.recv()
    assert (got["message"]["body"], got["sender-timestamp"]) == ("now", 2**53 - 1)
