"""Fuzzing the socialvp, wschat and wcp decoders with arbitrary JSON and text.

Two layers: the sans-IO protocol classes (never raise, only allowed
outputs, the protocol's answer rules hold for every input), then a short
run against the real server over one connection per protocol, where a
small oracle says what each frame must produce and another client must
still chat afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import draw, json_values, odd_frames

from chatd.names import InvalidName, parse as parse_name
from chatd.events import Command, Direct, Join, Leave, Message, Publish, Request, UserJoined, UserLeft
from chatd.protocols.base import JSON_SAFE_INT, AuthFailed, Close, Context, NotJSON, Send, decode
from chatd.protocols.socialvp import SocialVP
from chatd.protocols.wcp import Wcp
from chatd.protocols.wschat import WsChat
from tests.lobby_peers import socialvp, wcp, wschat

# --- what the fuzzers send ---------------------------------------------------------

names = st.sampled_from(["alice", "bob", "peer", "watcher", "nobody", ""]) | json_values


def shaped(fields: dict[str, Any]) -> st.SearchStrategy[dict]:
    """Objects with the protocol's own keys, each present or not, well typed or not."""
    return st.fixed_dictionaries({}, optional=fields)


SOCIALVP_OBJECTS = shaped({
    "command": st.sampled_from(["identify", "broadcast", "message", "quit"]) | json_values,
    "name": names, "to": names, "message": json_values,
})
WSCHAT_OBJECTS = shaped({
    "usr": st.text(max_size=10) | json_values, "msg": st.text(max_size=20) | json_values,
    "jwt": st.text(max_size=10) | json_values,
})
# Well-formed frames with arbitrary contents, so the relaying paths get fuzzed too.
SOCIALVP_SENDS = st.fixed_dictionaries({
    "command": st.sampled_from(["broadcast", "message"]), "to": names, "message": json_values})
WSCHAT_MESSAGES = st.fixed_dictionaries({"usr": st.text(max_size=10), "msg": st.text()},
                                        optional={"jwt": st.text(max_size=10) | st.none()})
WCP_MESSAGES = st.fixed_dictionaries(
    {"type": st.just("message"), "data": st.text()},
    optional={"timestamp": st.none() | st.integers() | st.floats(allow_nan=False,
                                                                  allow_infinity=False),
              "user_id": names})
WCP_OBJECTS = shaped({
    "type": st.sampled_from(["message", "user_joined", "user_left", "error"]) | json_values,
    "user_id": names, "display_name": names, "data": st.text(max_size=20) | json_values,
    "timestamp": st.integers() | st.floats(allow_nan=False, allow_infinity=False) | json_values,
})


#: Valid frames of each protocol, for odd JSON to be put into (``odd_frames``).
SHAPES = {
    "socialvp": [{"command": "broadcast", "message": 0}, {"command": "message", "to": "alice",
                                                          "message": 0},
                 {"command": "identify", "name": "x"}],
    "wschat": [{"usr": "u", "msg": "m"}, {"usr": "u", "msg": "m", "jwt": "j"}],
    "wcp": [{"type": "message", "data": "d", "timestamp": 1},
            {"type": "user_joined", "user_id": "u", "display_name": "d"},
            {"type": "user_left", "user_id": "u"}],
}


def frames(protocol: str, *objects: st.SearchStrategy[dict],
           sendable: bool = True) -> st.SearchStrategy[str]:
    """Any text, any JSON, protocol-shaped JSON, and odd JSON (deep, huge
    numbers, surrogates: ``odd_frames``), all within the frame limit.
    ``sendable``: only text a WebSocket can carry (for the server tests)."""
    shaped_texts = [o.map(lambda o: json.dumps(o, ensure_ascii=False)) for o in objects]
    texts = st.one_of(st.text(), json_values.map(json.dumps), *shaped_texts)
    odd = odd_frames(*SHAPES[protocol], sendable=sendable)
    if sendable:
        texts = texts.filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t))
    return st.one_of(texts.filter(lambda t: len(t.encode("utf-8", "surrogatepass")) <= 4096), odd)




def valid_name(text: str) -> bool:
    try:
        parse_name(text)
    except InvalidName:
        return False
    return True


def shown(text: str) -> str:
    return parse_name(text).shown


def parsed(text: str) -> Any:
    """The frame as the server reads it (base.decode), or a marker when it
    is not JSON chatd reads (bad syntax, too deep, a number out of range)."""
    try:
        return decode(msgspec.json.Decoder(), text)
    except NotJSON:
        return NotImplemented


# --- sans-IO ---------------------------------------------------------------------------


def run(protocol, text: str, results) -> list:
    """Feed one frame, answering each router request as the router might; all outputs."""
    outputs = []
    pending = list(protocol.receive(text))
    while pending:
        out = pending.pop(0)
        assert isinstance(out, (Send, Close, AuthFailed, Command)), out
        if isinstance(out, Send):
            msgspec.json.decode(out.data)  # always valid JSON
        outputs.append(out)
        if isinstance(out, Request):
            pending[:0] = protocol.on_result(out, results.draw(st.booleans()))
    return outputs


def decoded(outputs: list) -> list:
    return [msgspec.json.decode(o.data) if isinstance(o, Send) else o for o in outputs
            if not isinstance(o, AuthFailed)]


@given(st.lists(frames("socialvp", SOCIALVP_OBJECTS, SOCIALVP_SENDS, sendable=False), max_size=8),
       st.data())
def test_socialvp_answers_every_frame_before_identify(texts, results):
    protocol = SocialVP(Context())
    for text in texts:
        was_identified = protocol.authenticated
        outputs = decoded(run(protocol, text, results))
        replies = [o for o in outputs if isinstance(o, dict)]
        assert all(r["type"] == "outcome" and set(r) == {"type", "success", "code", "message"}
                   for r in replies)
        assert not any(isinstance(o, Close) for o in outputs)
        if not was_identified:
            # Exactly one outcome, and nothing reaches anyone else.
            assert len(replies) == 1, outputs
            assert all(isinstance(o, (dict, Join)) for o in outputs)
            assert replies[0]["code"] in (10, 300, 305, 400)
            assert replies[0]["success"] == (replies[0]["code"] == 300)
        else:
            assert len(replies) <= 1
            assert all(r["code"] in (300, 305, 400, 404) for r in replies)


@given(st.lists(frames("wschat", WSCHAT_OBJECTS, WSCHAT_MESSAGES, sendable=False), max_size=8),
       st.booleans())
def test_wschat_publishes_only_well_formed_messages(texts, jwt_configured):
    protocol = WsChat(Context(jwt_secret="a fuzzing secret, long enough for HS256",
                              jwt_configured=jwt_configured))
    assert protocol.greeting() == [Join()]
    for text in texts:
        outputs = protocol.receive(text)
        frame = parsed(text)
        if jwt_configured:
            # No fuzzed jwt verifies: a valid message is reported, never published.
            assert outputs == ([AuthFailed(frame["usr"], outputs[0].reason)] if outputs else [])
            assert bool(outputs) == wschat_valid(frame)
        elif outputs:
            assert outputs == [Publish(payload=frame["msg"], sender=shown(frame["usr"]))]
        else:
            assert not wschat_valid(frame)


@given(st.lists(frames("wcp", WCP_OBJECTS, WCP_MESSAGES, sendable=False), max_size=8), st.data())
def test_wcp_answers_every_frame_with_one_error_or_action(texts, results):
    protocol = Wcp(Context())
    for text in texts:
        joined_as = protocol.user_id
        outputs = decoded(run(protocol, text, results))
        errors = [o for o in outputs if isinstance(o, dict)]
        assert all(set(e) == {"type", "message"} and e["type"] == "error" for e in errors)
        if joined_as is None:
            assert all(isinstance(o, (dict, Join)) for o in outputs), outputs
            assert len(errors) == 1 or (len(outputs) == 1 and protocol.user_id is not None)
        elif any(isinstance(o, Leave) for o in outputs):
            assert outputs == [Leave(), Close(1000, "user left")]
            assert parsed(text)["user_id"] == joined_as
            return
        else:
            assert protocol.user_id == joined_as
            assert len(outputs) == 1
            if isinstance(outputs[0], Publish):
                assert isinstance(outputs[0].payload, str)


events = st.one_of(
    st.builds(Message, room=st.just("lobby"), sender=st.text() | st.none(), payload=json_values,
              time_ns=st.integers(0, 2**63), client_timestamp=st.none() | st.integers() | st.floats(
                  allow_nan=False, allow_infinity=False)),
    st.builds(Direct, sender=st.text(), to=st.text(), payload=json_values,
              time_ns=st.integers(0, 2**63)),
    st.builds(UserJoined, name=st.text(), display_name=st.text() | st.none()),
    st.builds(UserLeft, name=st.text()),
)


@given(events)
def test_every_encoder_writes_json_objects(event):
    for protocol in (SocialVP, WsChat, Wcp):
        data = protocol.encode(event)
        if data is not None:
            assert isinstance(msgspec.json.decode(data), dict)


# --- against the server ----------------------------------------------------------------

EXAMPLES = 50


def socialvp_expects(frame: Any, identified: bool) -> tuple[int | None, str | None]:
    """(the outcome code the sender gets or None, who else receives it or None)."""
    if not isinstance(frame, dict) or "command" not in frame:
        return 400, None
    command = frame["command"]
    if command not in ("identify", "broadcast", "message"):
        return (None if identified else 10), None
    if command == "identify":
        return 400, None  # valid identifies are not sent here
    if not identified:
        return 10, None
    if "message" not in frame:
        return 400, None
    if command == "broadcast":
        return None, "alice"
    to = frame.get("to")
    if not isinstance(to, str) or not to:
        return 400, None
    # Names are addressed as RFC 8266 compares them: "Bob" reaches bob.
    address = parse_name(to).address if valid_name(to) else None
    return (None, address) if address in ("alice", "bob") else (404, None)


def valid_identify(text: str) -> bool:
    frame = parsed(text)
    return (isinstance(frame, dict) and frame.get("command") == "identify"
            and isinstance(frame.get("name"), str) and valid_name(frame["name"]))


async def test_socialvp_server_answers_fuzzed_frames_and_keeps_serving(chat):
    texts = [t for t in draw(frames("socialvp", SOCIALVP_OBJECTS, SOCIALVP_SENDS), EXAMPLES) if not valid_identify(t)]
    await chat.start()
    alice = await socialvp(chat, "alice")
    stranger = await chat.connect("/socialvp")
    await stranger.recv()
    for text in texts:
        await stranger.send(text)
        code, _ = socialvp_expects(parsed(text), identified=False)
        answer = await stranger.recv()
        assert (answer["type"], answer["success"], answer["code"]) == ("outcome", False, code), text

    bob = await socialvp(chat, "bob")
    probe = {"command": "message", "to": "nobody-at-all", "message": 0}
    alice_expects = []
    for text in texts:
        frame = parsed(text)
        code, recipient = socialvp_expects(frame, identified=True)
        await bob.send(text)
        await bob.send(probe)
        if recipient == "bob":
            assert await bob.recv() == {"type": "message", "from": "bob",
                                        "message": frame["message"]}, text
        elif recipient == "alice":
            kind = "broadcast" if frame["command"] == "broadcast" else "message"
            alice_expects.append({"type": kind, "from": "bob", "message": frame["message"]})
        if code is not None:
            assert (await bob.recv())["code"] == code, text
        assert (await bob.recv())["code"] == 404  # the probe's answer comes next
    await bob.send({"command": "broadcast", "message": "still chatting"})
    alice_expects.append({"type": "broadcast", "from": "bob", "message": "still chatting"})
    assert [await alice.recv() for _ in alice_expects] == alice_expects


def wschat_valid(frame: Any) -> bool:
    return (isinstance(frame, dict) and isinstance(frame.get("usr"), str)
            and valid_name(frame["usr"]) and isinstance(frame.get("msg"), str)
            and isinstance(frame.get("jwt"), (str, type(None))))


async def test_wschat_server_relays_only_valid_fuzzed_frames(chat):
    texts = draw(frames("wschat", WSCHAT_OBJECTS, WSCHAT_MESSAGES), EXAMPLES)
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    published = []
    for i, text in enumerate(texts):
        frame = parsed(text)
        expected = [(shown(frame["usr"]), frame["msg"])] if wschat_valid(frame) else []
        expected.append(("probe", str(i)))
        await talker.send(text)
        await talker.send({"usr": "probe", "msg": str(i)})
        # The talker gets back exactly the valid frame, if any, then its probe.
        echoes = [await talker.recv() for _ in expected]
        assert [(e["usr"], e["msg"]) for e in echoes] == expected, text
        published += expected
    late = await wschat(chat)
    await late.send({"usr": "late", "msg": "still chatting"})
    published.append(("late", "still chatting"))
    heard = [await listener.recv() for _ in published]
    assert [(h["usr"], h["msg"]) for h in heard] == published


def wcp_valid_join(text: str) -> bool:
    frame = parsed(text)
    return (isinstance(frame, dict) and frame.get("type") == "user_joined"
            and isinstance(frame.get("user_id"), str) and valid_name(frame["user_id"])
            and isinstance(frame.get("display_name"), str) and valid_name(frame["display_name"]))


def wcp_relayed(frame: Any) -> bool:
    if not (isinstance(frame, dict) and frame.get("type") == "message"
            and isinstance(frame.get("data"), str)):
        return False
    timestamp = frame.get("timestamp")
    # Relayed as sent, so only within what every JSON decoder reads exactly.
    return timestamp is None or (isinstance(timestamp, (int, float))
                                 and not isinstance(timestamp, bool)
                                 and abs(timestamp) <= JSON_SAFE_INT)


def wcp_own_leave(text: str) -> bool:
    frame = parsed(text)
    return (isinstance(frame, dict) and frame.get("type") == "user_left"
            and isinstance(frame.get("user_id"), str) and valid_name(frame["user_id"])
            and shown(frame["user_id"]) == "peer")


async def test_wcp_server_answers_fuzzed_frames_and_keeps_serving(chat):
    texts = [t for t in draw(frames("wcp", WCP_OBJECTS, WCP_MESSAGES), EXAMPLES)
             if not wcp_valid_join(t) and not wcp_own_leave(t)]
    await chat.start()
    watcher = await wcp(chat, "watcher")
    stranger = await chat.connect("/wcp")
    for text in texts:
        await stranger.send(text)
        assert (await stranger.recv())["type"] == "error", text

    peer = await wcp(chat, "peer")
    assert (await watcher.recv())["user_id"] == "peer"
    probe = {"type": "user_left", "user_id": "someone-else"}
    watcher_expects = []
    for text in texts:
        frame = parsed(text)
        await peer.send(text)
        await peer.send(probe)
        if wcp_relayed(frame):
            watcher_expects.append(frame["data"])
        else:
            assert (await peer.recv())["type"] == "error", text
        assert await peer.recv() == {"type": "error",
                                     "message": "user_left must carry your own user_id"}, text
    await peer.send({"type": "message", "data": "still chatting"})
    watcher_expects.append("still chatting")
    heard = [await watcher.recv() for _ in watcher_expects]
    assert [h["data"] for h in heard] == watcher_expects
    assert {h["user_id"] for h in heard} == {"peer"}
