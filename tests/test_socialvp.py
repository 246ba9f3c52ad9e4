"""socialvp end to end against a real server."""

from __future__ import annotations

import json

import pytest

from tests.lobby_peers import IDENTIFIED, INIT, socialvp


def outcome(code: int, message: str, success: bool = False) -> dict:
    return {"type": "outcome", "success": success, "code": code, "message": message}


IDENTIFY_FIRST = outcome(10, "Please identify yourself")
NAME_TAKEN = outcome(305, "Client with that name already exists!")
NOBODY = outcome(404, "No client with that name is currently connected!")


async def test_connect_greets_with_init_and_identify_succeeds(chat):
    await chat.start()
    peer = await chat.connect("/socialvp")
    assert await peer.recv() == INIT
    await peer.send({"command": "identify", "name": "alice"})
    assert await peer.recv() == IDENTIFIED


async def test_taken_name_gets_305_and_client_may_try_again(chat):
    await chat.start()
    await socialvp(chat, "alice")
    bob = await chat.connect("/socialvp")
    await bob.recv()
    await bob.send({"command": "identify", "name": "alice"})
    assert await bob.recv() == NAME_TAKEN
    await bob.send({"command": "identify", "name": "bob"})
    assert await bob.recv() == IDENTIFIED


@pytest.mark.parametrize("frame", [
    {"command": "broadcast", "message": "hi"},
    {"command": "message", "to": "alice", "message": "hi"},
    {"command": "broadcast"},
    {"command": "dance"},
    {"command": 7},
    {"command": []},
    {"command": {"a": 1}},
])
async def test_commands_before_identifying_get_10(chat, frame):
    await chat.start()
    alice = await socialvp(chat, "alice")
    peer = await chat.connect("/socialvp")
    await peer.recv()
    await peer.send(frame)
    assert await peer.recv() == IDENTIFY_FIRST
    # Nothing reached alice: the next frame she gets is this one.
    bob = await socialvp(chat, "bob")
    await bob.send({"command": "broadcast", "message": "after"})
    assert await alice.recv() == {"type": "broadcast", "from": "bob", "message": "after"}


@pytest.mark.parametrize("identified", [False, True])
@pytest.mark.parametrize("frame, answer", [
    ({"name": "x"}, outcome(400, "Missing 'command' field!")),
    ("{not json", outcome(400, "Malformed JSON request!")),
    ("", outcome(400, "Malformed JSON request!")),
    ([1, 2], outcome(400, "Request must be a JSON object!")),
    ("\"identify\"", outcome(400, "Request must be a JSON object!")),
    ({"command": "identify"}, outcome(400, "Missing 'name' field!")),
    ({"command": "identify", "name": ""}, outcome(400, "Field 'name' must be a non-empty string!")),
    ({"command": "identify", "name": 5}, outcome(400, "Field 'name' must be a non-empty string!")),
])
async def test_bad_requests_get_400_and_keep_the_connection(chat, frame, answer, identified):
    await chat.start()
    if identified:
        peer = await socialvp(chat, "carol")
    else:
        peer = await chat.connect("/socialvp")
        await peer.recv()
    await peer.send(frame if isinstance(frame, str) else json.dumps(frame))
    assert await peer.recv() == answer
    await peer.send({"command": "identify", "name": "dave"})
    assert await peer.recv() == IDENTIFIED


@pytest.mark.parametrize("frame, answer", [
    ({"command": "broadcast"}, outcome(400, "Missing 'message' field!")),
    ({"command": "message", "to": "bob"}, outcome(400, "Missing 'message' field!")),
    ({"command": "message", "message": "hi"}, outcome(400, "Missing 'to' field!")),
    # Issue #9 item 4: a 'to' that is not a non-empty string, of any kind.
    *[({"command": "message", "to": to, "message": "hi"},
       outcome(400, "Field 'to' must be a non-empty string!"))
      for to in ("", ["bob"], None, 5, 1.5, True, {"name": "bob"}, [])],
    ({"command": "message", "to": "nobody", "message": "hi"}, NOBODY),
    # A name nobody could hold is nobody's either.
    ({"command": "message", "to": "bob\u200b", "message": "hi"}, NOBODY),
    ({"command": "message", "to": " ", "message": "hi"}, NOBODY),
])
async def test_send_errors_after_identifying(chat, frame, answer):
    await chat.start()
    alice = await socialvp(chat, "alice")
    await socialvp(chat, "bob")
    await alice.send(frame)
    assert await alice.recv() == answer


@pytest.mark.parametrize("payload", ["hi all", {"x": [1, 2]}, 42, None, [True, "é"]])
async def test_broadcast_reaches_other_identified_clients_only(chat, payload):
    await chat.start()
    alice = await socialvp(chat, "alice")
    bob = await socialvp(chat, "bob")
    carol = await socialvp(chat, "carol")
    stranger = await chat.connect("/socialvp")
    assert await stranger.recv() == INIT
    await alice.send({"command": "broadcast", "message": payload})
    expected = {"type": "broadcast", "from": "alice", "message": payload}
    assert await bob.recv() == expected
    assert await carol.recv() == expected
    # No success answer, no echo: alice's and the stranger's next frames are later ones.
    await bob.send({"command": "broadcast", "message": "second"})
    assert await alice.recv() == {"type": "broadcast", "from": "bob", "message": "second"}
    assert await carol.recv() == {"type": "broadcast", "from": "bob", "message": "second"}
    await stranger.send({"command": "broadcast", "message": "me too"})
    assert await stranger.recv() == IDENTIFY_FIRST


async def test_message_reaches_only_the_named_client(chat):
    await chat.start()
    alice = await socialvp(chat, "alice")
    bob = await socialvp(chat, "bob")
    carol = await socialvp(chat, "carol")
    await alice.send({"command": "message", "to": "bob", "message": {"secret": 1}})
    assert await bob.recv() == {"type": "message", "from": "alice", "message": {"secret": 1}}
    await bob.send({"command": "broadcast", "message": "next"})
    assert await carol.recv() == {"type": "broadcast", "from": "bob", "message": "next"}
    assert await alice.recv() == {"type": "broadcast", "from": "bob", "message": "next"}


async def test_unknown_command_after_identifying_is_ignored(chat):
    await chat.start()
    alice = await socialvp(chat, "alice")
    await alice.send({"command": "dance", "message": "x"})
    await alice.send({"command": "message", "to": "nobody", "message": "x"})
    assert await alice.recv() == NOBODY


async def test_leaving_client_is_announced_as_quit(chat):
    await chat.start()
    alice = await socialvp(chat, "alice")
    bob = await socialvp(chat, "bob")
    await bob.close()
    assert await alice.recv() == {"type": "quit", "who": "bob"}
    # The name is free again.
    await socialvp(chat, "bob")


async def test_identifying_again_renames_and_frees_the_old_name(chat):
    await chat.start()
    alice = await socialvp(chat, "alice")
    bob = await socialvp(chat, "bob")
    await bob.send({"command": "identify", "name": "bob"})
    assert await bob.recv() == IDENTIFIED
    await bob.send({"command": "identify", "name": "robert"})
    assert await bob.recv() == IDENTIFIED
    assert await alice.recv() == {"type": "quit", "who": "bob"}
    await bob.send({"command": "broadcast", "message": "call me robert"})
    assert await alice.recv() == {"type": "broadcast", "from": "robert",
                                  "message": "call me robert"}
    await socialvp(chat, "bob")
    await alice.send({"command": "message", "to": "robert", "message": "ok"})
    assert await bob.recv() == {"type": "message", "from": "alice", "message": "ok"}


async def test_client_that_never_identifies_is_closed_1008(chat):
    await chat.start(auth_timeout=0.2)
    peer = await chat.connect("/socialvp")
    assert await peer.recv() == INIT
    assert await peer.closed() == 1008


@pytest.mark.parametrize("name, reason", [
    ("bell\x07", "contains a control character (U+0007)"),
    ("esc\x1b[31m", "contains a control character (U+001B)"),
    ("x" * 257, "is longer than 256 characters"),
    ("alice\u200b", "contains an invisible or formatting character (U+200B ZERO WIDTH SPACE)"),
    ("\u202eecila", "contains an invisible or formatting character "
                    "(U+202E RIGHT-TO-LEFT OVERRIDE)"),
    ("\u0301alice", "starts with a combining mark (U+0301 COMBINING ACUTE ACCENT)"),
])
async def test_invalid_names_get_400_saying_why(chat, name, reason):
    await chat.start()
    peer = await chat.connect("/socialvp")
    await peer.recv()
    await peer.send({"command": "identify", "name": name})
    assert await peer.recv() == outcome(400, f"Invalid name: it {reason}!")

