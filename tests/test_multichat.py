"""multichat end to end against a real server."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SECRET, open_websocket_url
from tests.lobby_peers import wcp


async def test_register_gets_ack_and_messages_reach_others_not_sender(chat):
    await chat.start()
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    carol = await chat.multichat("carol")
    await alice.send({"action": "client-message", "content": "hi all"})
    expected = {"action": "forwarding-message", "source-client-name": "alice", "content": "hi all"}
    assert await bob.recv() == expected
    assert await carol.recv() == expected
    # Alice must not get her own message back: the next frame she gets is Bob's.
    await bob.send({"action": "client-message", "content": "hello alice"})
    assert await alice.recv() == {"action": "forwarding-message",
                                  "source-client-name": "bob", "content": "hello alice"}


@pytest.mark.parametrize("second", ["Bridge", "BRIDGE", "bridg\u0435"])
async def test_a_look_alike_of_a_name_another_bridge_holds_is_refused_1008(chat, second):
    # Bridges may share a name shown exactly alike (tests/test_bridges.py;
    # full-width letters are shown as the ASCII ones, so they share too),
    # not a look-alike: another case or a Cyrillic e.
    await chat.start()
    watcher = await wcp(chat, "watcher")
    one = await chat.multichat("bridge")
    assert await watcher.recv() == {"type": "user_joined", "user_id": "bridge",
                                    "display_name": "bridge"}
    two = await chat.connect("/multichat")
    await two.send({"action": "register", "client-name": second, "secret-key": SECRET})
    assert await two.closed() == 1008
    assert two.ws.closed.reason == "client-name already in use"
    # Once the holder has gone (and the room heard it), the name is free again.
    await one.close()
    assert await watcher.recv() == {"type": "user_left", "user_id": "bridge"}
    await chat.multichat(second)


@pytest.mark.parametrize("first", [
    {"action": "register", "client-name": "a", "secret-key": "wrong"},
    {"action": "register", "client-name": "", "secret-key": SECRET},
    {"action": "register", "client-name": "a", "secret-key": ""},
    {"action": "register", "client-name": "evil\x1b[2J", "secret-key": SECRET},
    {"action": "register", "client-name": "x" * 257, "secret-key": SECRET},
    {"action": "client-message", "content": "before register"},
    {"action": "nonsense"},
    "not json at all",
    [1, 2, 3],
])
async def test_bad_first_frame_closes_1008(chat, first):
    await chat.start()
    peer = await chat.connect("/multichat")
    await peer.send(first if isinstance(first, str) else json.dumps(first))
    assert await peer.closed() == 1008


async def test_auth_stage_times_out_with_1008(chat):
    await chat.start(auth_timeout=0.2)
    peer = await chat.connect("/multichat")
    assert await peer.closed() == 1008


async def test_junk_after_registration_is_ignored(chat):
    await chat.start()
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    for junk in ["{not json", json.dumps({"action": "unknown"}),
                 json.dumps({"action": "client-message", "content": ""}),
                 json.dumps({"action": "client-message", "content": 5}),
                 json.dumps({"action": "register", "client-name": "x", "secret-key": SECRET})]:
        await alice.send(junk)
    await alice.send({"action": "client-message", "content": "still here"})
    assert await bob.recv() == {"action": "forwarding-message", "source-client-name": "alice",
                                "content": "still here"}


async def test_frame_limit_counts_utf8_bytes(chat):
    await chat.start()
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    envelope = json.dumps({"action": "client-message", "content": ""})
    exact = json.dumps({"action": "client-message", "content": "a" * (4096 - len(envelope))})
    assert len(exact.encode()) == 4096
    await alice.send(exact)
    assert len((await bob.recv())["content"]) == 4096 - len(envelope)
    # 4097 bytes in fewer characters: "é" is two bytes in UTF-8.
    n = 4097 - len(envelope)
    over = json.dumps({"action": "client-message", "content": "é" + "a" * (n - 2)},
                      ensure_ascii=False)
    assert len(over.encode()) == 4097 and len(over) < 4097
    await alice.send(over)
    assert await alice.closed() == 1009


async def test_frame_over_limit_in_characters_closes_1009(chat):
    await chat.start()
    alice = await chat.multichat("alice")
    await alice.send("x" * 4097)
    assert await alice.closed() == 1009


async def test_binary_frame_after_registration_is_ignored(chat):
    # As the original Go server (tests/test_bridges.py replays it raw).
    await chat.start()
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    await alice.ws.send_message(b"\x00\x01")
    await alice.send({"action": "client-message", "content": "after"})
    assert (await bob.recv())["content"] == "after"


async def test_unknown_path_is_rejected_404(chat):
    from trio_websocket import ConnectionRejected
    await chat.start()
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(chat.url("/nowhere")):
            pass
    assert info.value.status_code == 404


# --- the decoder, fuzzed without sockets ------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from chatd.events import Join, Publish  # noqa: E402
from chatd.protocols.base import AuthFailed, Close, Context  # noqa: E402
from chatd.protocols.multichat import Multichat  # noqa: E402
from tests.strategies import json_values, odd_frames  # noqa: E402

frames = st.text(max_size=200) | json_values.map(json.dumps) | st.fixed_dictionaries(
    {"action": st.sampled_from(["register", "client-message", "forwarding-message", "x"])},
    optional={"client-name": json_values, "secret-key": st.just(SECRET) | json_values,
              "content": json_values}).map(json.dumps) | odd_frames(
    {"action": "register", "client-name": "bridge", "secret-key": SECRET},
    {"action": "client-message", "content": "c"}, sendable=False)


BINARY = object()  # a binary message, given to ``Multichat.binary``


@settings(max_examples=300, deadline=None)
@given(st.lists(frames | st.just(BINARY), min_size=1, max_size=6))
def test_any_frame_sequence_gets_only_the_documented_outputs(texts):
    protocol = Multichat(Context(secret_key=SECRET))
    for text in texts:
        outputs = protocol.binary() if text is BINARY else protocol.receive(text)
        if text is BINARY and protocol.authenticated:
            assert outputs == []  # ignored, as by the original Go server
            continue
        if not protocol.authenticated:
            # Before registering: a register becomes a Join, anything else is
            # reported and closes 1008.
            if len(outputs) == 1 and isinstance(outputs[0], Join):
                protocol.on_result(outputs[0], True)
            else:
                failed, close = outputs
                assert isinstance(failed, AuthFailed) and failed.reason
                assert isinstance(close, Close) and close.code == 1008
                assert len(close.reason.encode()) <= 123
                return
        else:
            # After: a non-empty client-message is published, the rest ignored.
            assert outputs == [] or (len(outputs) == 1 and isinstance(outputs[0], Publish)
                                     and outputs[0].payload)
