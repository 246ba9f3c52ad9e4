"""The decode boundary (issue #9 item 7): no frame makes a protocol raise.

``base.decode`` alone, then every endpoint of a real server fed the
issue's frame and its kin: each answers with its own bad-JSON answer,
logs no error, and goes on serving. The hypothesis fuzzers of every
protocol draw the same kinds of frames (``tests.strategies.odd_frames``).
"""

from __future__ import annotations

import json

import msgspec
import pytest

from chatd.protocols.base import MAX_JSON_DEPTH, NotJSON, WrongShape, decode, too_deep
from tests.abuse import no_tracebacks  # noqa: F401  (fails a test that logs an error)
from tests.conftest import SECRET
from tests.lobby_peers import signed, socialvp, wcp, wschat

ANY = msgspec.json.Decoder()


class Point(msgspec.Struct):
    x: int


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_limit_is_read_and_deeper_is_not_json():
    assert decode(ANY, nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(NotJSON, match="nested deeper than 64 levels"):
        decode(ANY, nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(NotJSON):
        decode(ANY, '{"x":' + "[" * 990 + "]" * 990 + "}")  # the issue's frame


@pytest.mark.parametrize("text", [
    json.dumps({"text": "[" * 500 + "{" * 500}),  # brackets in a string are text
    json.dumps({"text": 'say \\"[[[[' + "[" * 100}),  # even after escaped quotes
    json.dumps([["\\"]] * 100),
])
def test_brackets_inside_strings_do_not_count(text):
    assert not too_deep(text)
    assert decode(ANY, text) == json.loads(text)


@pytest.mark.parametrize("text", [
    "1e400", '{"x": -1e400}', "NaN", "Infinity", '"\\ud800"', '"\\udc00x"', "{", "",
    "\ud800",  # a lone surrogate in the text itself
])
def test_what_is_not_json_raises_only_not_json(text):
    for decoder in (ANY, msgspec.json.Decoder(Point)):
        with pytest.raises(NotJSON):
            decode(decoder, text)


def test_json_of_the_wrong_shape_carries_the_frame_as_plain_json():
    with pytest.raises(WrongShape) as wrong:
        decode(msgspec.json.Decoder(Point), '{"x": "one", "y": [1]}')
    assert wrong.value.value == {"x": "one", "y": [1]}
    # A wrong value before a syntax error further on is still not JSON.
    with pytest.raises(NotJSON):
        decode(msgspec.json.Decoder(Point), '{"x": "one", "y": [1}')
    with pytest.raises(NotJSON):
        decode(msgspec.json.Decoder(Point), '{"x": "one", "y": 1e999}')


# --- every endpoint ---------------------------------------------------------------------------

ISSUE_FRAME = '{"x":' + "[" * 990 + "]" * 990 + "}"
ODD = [
    ISSUE_FRAME,
    nested(2000),
    '{"a":' * 600 + "0" + "}" * 600,
    "[" * 3000,
    "1e400",
    '{"usr": "u", "msg": -1e400, "type": "message", "command": "broadcast", "message": 1e400}',
    '"\\ud800"',
    "NaN",
]


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
async def test_socialvp_answers_malformed_json(chat, text):
    await chat.start()
    alice = await socialvp(chat, "alice")
    bob = await socialvp(chat, "bob")
    await alice.send(text)
    assert await alice.recv() == {"type": "outcome", "success": False, "code": 400,
                                  "message": "Malformed JSON request!"}
    await alice.send({"command": "broadcast", "message": "still here"})
    assert await bob.recv() == {"type": "broadcast", "from": "alice", "message": "still here"}


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
async def test_wcp_answers_invalid_message_format(chat, text):
    await chat.start()
    stranger = await chat.connect("/wcp")
    await stranger.send(text)
    assert await stranger.recv() == {"type": "error", "message": "Invalid message format"}
    wendy = await wcp(chat, "wendy")
    walt = await wcp(chat, "walt")
    assert (await wendy.recv())["user_id"] == "walt"
    await wendy.send(text)
    assert await wendy.recv() == {"type": "error", "message": "Invalid message format"}
    await wendy.send({"type": "message", "data": "still here"})
    assert (await walt.recv())["data"] == "still here"


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
async def test_wschat_drops_it(chat, text):
    await chat.start()
    ann = await wschat(chat)
    await ann.send(text)
    await ann.send(signed("ann", "still here"))
    # Nothing came of the odd frame: the next echo is the message after it.
    assert (await ann.recv())["msg"] == "still here"


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
async def test_multichat_closes_1008_before_register_and_ignores_it_after(chat, text):
    await chat.start()
    first = await chat.connect("/multichat")
    await first.send(text)
    assert await first.closed() == 1008
    bridge = await chat.multichat("bridge")
    other = await chat.multichat("other")
    await bridge.send(text)
    await bridge.send({"action": "client-message", "content": "still here"})
    assert (await other.recv())["content"] == "still here"


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
async def test_gradagenda_closes_1007(chat, text, authenticated):
    from tests.test_gradagenda import login

    await chat.start()
    peer = await login(chat, "alice") if authenticated else await chat.connect("/gradagenda")
    await peer.send(text)
    assert await peer.closed() == 1007
    await login(chat, "alice")


async def test_an_odd_value_inside_a_gradagenda_batch_closes_1007(chat):
    from tests.test_gradagenda import login

    await chat.start()
    peer = await login(chat, "alice")
    await peer.send('{"type": "batch-mode-action", "cdid": "b", "actions": ['
                    '{"type": "request-message-history", "cdid": "h", "session-id": "s", '
                    '"limit": 1e400}]}')
    assert await peer.closed() == 1007


async def test_register_secret_is_checked_before_an_odd_name(chat):
    # A frame that is well-formed but whose name is not: refused like any bad register.
    await chat.start()
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": "b\u200bridge", "secret-key": SECRET})
    assert await peer.closed() == 1008
