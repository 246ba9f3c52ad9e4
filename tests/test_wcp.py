"""wcp end to end against a real server."""

from __future__ import annotations

import json
import time

import pytest

from tests.lobby_peers import wcp

INVALID = {"type": "error", "message": "Invalid message format"}
JOIN_FIRST = {"type": "error", "message": "send user_joined first"}


async def test_user_joined_is_broadcast_to_the_others(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await chat.connect("/wcp")
    await bob.send({"type": "user_joined", "user_id": "bob", "display_name": "Bob B."})
    assert await alice.recv() == {"type": "user_joined", "user_id": "bob",
                                  "display_name": "Bob B."}


async def test_taken_user_id_gets_an_error_and_client_may_try_again(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    other = await chat.connect("/wcp")
    await other.send({"type": "user_joined", "user_id": "alice", "display_name": "Fake"})
    assert await other.recv() == {"type": "error", "message": "user_id already in use"}
    await other.send({"type": "user_joined", "user_id": "alicia", "display_name": "Alicia"})
    assert await alice.recv() == {"type": "user_joined", "user_id": "alicia",
                                  "display_name": "Alicia"}


async def test_message_is_relayed_with_the_bound_user_id_and_client_timestamp(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await wcp(chat, "bob")
    carol = await wcp(chat, "carol")
    for seen in ("bob", "carol"):
        assert (await alice.recv())["user_id"] == seen
    assert (await bob.recv())["user_id"] == "carol"
    await alice.send({"type": "message", "data": "Hello, world!", "timestamp": 1234567890,
                      "user_id": "bob"})
    expected = {"type": "message", "user_id": "alice", "data": "Hello, world!",
                "timestamp": 1234567890}
    assert await bob.recv() == expected
    assert await carol.recv() == expected
    # Not echoed: alice's next frame is bob's reply.
    await bob.send({"type": "message", "data": "hi", "timestamp": 1.5})
    assert await alice.recv() == {"type": "message", "user_id": "bob", "data": "hi",
                                  "timestamp": 1.5}
    assert (await carol.recv())["data"] == "hi"


async def test_message_without_timestamp_gets_the_server_time_in_seconds(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await wcp(chat, "bob")
    await alice.recv()
    before = int(time.time())
    await bob.send({"type": "message", "data": "when?"})
    frame = await alice.recv()
    after = int(time.time())
    assert isinstance(frame["timestamp"], int) and before <= frame["timestamp"] <= after
    assert frame == {"type": "message", "user_id": "bob", "data": "when?",
                     "timestamp": frame["timestamp"]}


async def test_user_left_is_relayed_and_the_connection_closes_normally(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await wcp(chat, "bob")
    await alice.recv()
    await bob.send({"type": "user_left", "user_id": "bob"})
    assert await alice.recv() == {"type": "user_left", "user_id": "bob"}
    assert await bob.closed() == 1000
    # The user_id is free again.
    await wcp(chat, "bob")
    assert (await alice.recv())["type"] == "user_joined"


async def test_user_left_for_someone_else_is_refused(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await wcp(chat, "bob")
    await alice.recv()
    await bob.send({"type": "user_left", "user_id": "alice"})
    assert await bob.recv() == {"type": "error",
                                "message": "user_left must carry your own user_id"}
    await bob.send({"type": "message", "data": "still here"})
    assert (await alice.recv())["data"] == "still here"


async def test_disconnect_without_user_left_is_announced(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    bob = await wcp(chat, "bob")
    await alice.recv()
    await bob.close()
    assert await alice.recv() == {"type": "user_left", "user_id": "bob"}


@pytest.mark.parametrize("joined", [False, True])
@pytest.mark.parametrize("junk", [
    "{not json", "", "[]", "null", json.dumps({"data": "no type"}),
    json.dumps({"type": "shout", "data": "x"}),
    json.dumps({"type": "message"}),
    json.dumps({"type": "message", "data": 5}),
    json.dumps({"type": "message", "data": "x", "timestamp": "noon"}),
    # Numbers other clients' decoders cannot read exactly (I-JSON, RFC 7493
    # section 2.2): relayed as sent, they broke int64 decoders.
    json.dumps({"type": "message", "data": "x", "timestamp": 123456789012345678901234567890}),
    json.dumps({"type": "message", "data": "x", "timestamp": 2**53}),
    json.dumps({"type": "message", "data": "x", "timestamp": -2**63 - 1}),
    json.dumps({"type": "message", "data": "x", "timestamp": 1e300}),
    json.dumps({"type": "user_joined", "user_id": "x"}),
    json.dumps({"type": "user_joined", "user_id": 1, "display_name": "x"}),
    json.dumps({"type": "user_left"}),
])
async def test_invalid_frames_get_an_error_and_keep_the_connection(chat, junk, joined):
    await chat.start()
    watcher = await wcp(chat, "watcher")
    if joined:
        peer = await wcp(chat, "peer")
        assert (await watcher.recv())["type"] == "user_joined"
    else:
        peer = await chat.connect("/wcp")
    await peer.send(junk)
    assert await peer.recv() == INVALID
    if not joined:
        await peer.send({"type": "user_joined", "user_id": "peer", "display_name": "P"})
        assert (await watcher.recv())["user_id"] == "peer"
    await peer.send({"type": "message", "data": "fine"})
    assert (await watcher.recv())["data"] == "fine"


@pytest.mark.parametrize("early", [
    {"type": "message", "data": "too soon"},
    {"type": "user_left", "user_id": "ghost"},
])
async def test_frames_before_user_joined_get_an_error(chat, early):
    await chat.start()
    watcher = await wcp(chat, "watcher")
    peer = await chat.connect("/wcp")
    await peer.send(early)
    assert await peer.recv() == JOIN_FIRST
    await peer.send({"type": "user_joined", "user_id": "late", "display_name": "Late"})
    assert (await watcher.recv())["user_id"] == "late"


async def test_empty_user_id_is_refused(chat):
    await chat.start()
    peer = await chat.connect("/wcp")
    await peer.send({"type": "user_joined", "user_id": "", "display_name": "Nobody"})
    assert await peer.recv() == {"type": "error", "message": "user_id must not be empty"}


async def test_joining_twice_is_refused(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    await alice.send({"type": "user_joined", "user_id": "mallory", "display_name": "M"})
    assert await alice.recv() == {"type": "error", "message": "already joined as alice"}


async def test_client_that_never_joins_is_closed_1008(chat):
    await chat.start(auth_timeout=0.2)
    peer = await chat.connect("/wcp")
    assert await peer.closed() == 1008


@pytest.mark.parametrize("user_id, display_name, message", [
    ("bell\x07", "Bell", "user_id contains a control character (U+0007)"),
    ("ok", "esc\x1b[31m", "display_name contains a control character (U+001B)"),
    ("x" * 257, "Long", "user_id is longer than 256 characters"),
    ("ok", "", "display_name is empty or only spaces"),
    ("alice\u200b", "Alice", "user_id contains an invisible or formatting character "
                             "(U+200B ZERO WIDTH SPACE)"),
    ("ok", "Ok\u2066", "display_name contains an invisible or formatting character "
                      "(U+2066 LEFT-TO-RIGHT ISOLATE)"),
])
async def test_invalid_names_are_refused_saying_why(chat, user_id, display_name, message):
    await chat.start()
    peer = await chat.connect("/wcp")
    await peer.send({"type": "user_joined", "user_id": user_id, "display_name": display_name})
    assert await peer.recv() == {"type": "error", "message": message}
    # The client may try again with a valid name.
    await peer.send({"type": "user_joined", "user_id": "ok", "display_name": "Ok"})
    await peer.send({"type": "user_left", "user_id": "someone else"})
    assert await peer.recv() == {"type": "error", "message": "user_left must carry your own user_id"}

