"""The GradAgenda protocol class alone (sans-IO), and its decoder fuzzed."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.strategies import draw, json_values, odd_frames

from chatd.events import (
    Command, CreateSession, DirectSessionInfo, ListSessions, Login, Logout, ReadHistory, Request,
    SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.protocols.base import AuthFailed, Close, Context, NotJSON, Send, Stream, decode
from chatd.protocols.gradagenda import GradAgenda, batch_frames
from chatd.tokens import mint
from tests.conftest import JWT_SECRET
from tests.test_gradagenda import create, login, message, ok

LIMIT = 4096


def protocol(limit: int = LIMIT) -> GradAgenda:
    return GradAgenda(Context(jwt_secret=JWT_SECRET, max_frame_bytes=limit))


def auth(user: str = "alice", cdid: str = "a", token: str | None = None) -> str:
    return json.dumps({"type": "authenticate", "cdid": cdid, "user-id": user,
                       "device-id": "phone", "token": mint(JWT_SECRET, user) if token is None
                       else token})


def flat(outputs: list) -> list[Any]:
    """Outputs with each Stream's frames as Sends (as the client gets them)."""
    out: list[Any] = []
    for o in outputs:
        out.extend(Send(f) for f in o.frames) if isinstance(o, Stream) else out.append(o)
    return out


def frames(outputs: list) -> list[Any]:
    """The frames and closes among ``outputs`` (not what is only logged)."""
    return [json.loads(o.data) if isinstance(o, Send) else o for o in flat(outputs)
            if not isinstance(o, AuthFailed)]


def logged_in(limit: int = LIMIT) -> GradAgenda:
    p = protocol(limit)
    [login] = p.receive(auth())
    assert isinstance(login, Login) and (login.user_id, login.device_id) == ("alice", "phone")
    assert frames(p.on_result(login, None)) == [
        {"type": "status-response", "cdid": "a", "status": "succeeded"}]
    assert p.authenticated
    return p


def test_authentication_binds_the_user_and_logs_out_on_disconnect():
    p = protocol()
    assert p.auth_stage and not p.authenticated and p.on_disconnect() == []
    p = logged_in()
    assert [type(c) for c in p.on_disconnect()] == [Logout]


def test_three_failed_attempts_close_1008():
    p = protocol()
    out = p.receive(auth(token=mint("wrong", "alice"))) + p.receive('{"type": "nope"}')
    assert [f["status"] for f in frames(out)] == ["failed", "failed"]
    out = frames(p.receive(json.dumps({"type": "request-mutable-session-listing", "cdid": "l"})))
    assert out[0]["cdid"] == "l" and out[1] == Close(1008, "too many failed authentication attempts")


def test_a_missing_secret_refuses_every_token():
    p = GradAgenda(Context(jwt_secret=None))
    assert frames(p.receive(auth()))[0]["status"] == "failed"


def test_text_that_is_not_json_closes_1007():
    assert protocol().receive("{nope") == [Close(1007, "frame is not valid JSON")]
    assert logged_in().receive("") == [Close(1007, "frame is not valid JSON")]


def test_creation_includes_the_creator_once():
    [cmd] = logged_in().receive(json.dumps({"type": "request-mutable-session-creation",
                                            "cdid": "c", "user-id": ["bob", "alice", "bob"]}))
    assert isinstance(cmd, CreateSession) and cmd.members == ["alice", "bob"]


def test_a_message_is_normalised_to_its_stored_form():
    [cmd] = logged_in().receive(json.dumps({
        "type": "request-sending-a-message", "cdid": "m", "session-id": "s",
        "message": {"type": "text", "body": "hé", "extra": 1}, "sender-timestamp": 5}))
    assert isinstance(cmd, SendMessage)
    assert msgspec.json.decode(cmd.message) == {"type": "text", "body": "hé"}


def test_history_limit_is_capped_at_100():
    [cmd] = logged_in().receive(json.dumps({"type": "request-message-history", "cdid": "h",
                                            "session-id": "s", "limit": 10**30}))
    assert isinstance(cmd, ReadHistory) and cmd.limit == 100


def test_too_many_participants_for_one_frame_are_refused():
    p = logged_in(limit=256)
    out = frames(p.receive(json.dumps({"type": "request-mutable-session-creation", "cdid": "c",
                                       "user-id": [f"user-{i}" for i in range(20)]})))
    assert out[0]["status"] == "failed" and "frame" in out[0]["message"]


def test_answers_for_the_asker_are_batched_then_ended():
    p = logged_in(limit=300)
    [cmd] = p.receive('{"type": "request-mutable-session-listing", "cdid": "ls"}')
    infos = [SessionInfo(session_id=f"s{i}", kind="mutable", status="unchanged",
                         members=["alice", "bob"]) for i in range(6)]
    out = flat(p.on_result(cmd, infos))
    assert all(len(o.data) <= 300 for o in out)
    decoded = frames(out)
    assert decoded[-1] == {"type": "status-response", "cdid": "ls", "status": "succeeded"}
    listed = [a["session-id"] for f in decoded[:-1] for a in f["actions"]]
    assert listed == [f"s{i}" for i in range(6)] and len(decoded) > 2


def test_a_router_refusal_becomes_a_failed_status():
    p = logged_in()
    [cmd] = p.receive('{"type": "request-direct-session-info", "cdid": "d", "user-id": "bob"}')
    assert isinstance(cmd, DirectSessionInfo)
    assert frames(p.on_result(cmd, "no")) == [
        {"type": "status-response", "cdid": "d", "status": "failed", "message": "no"}]


def test_events_encode_to_the_documents_actions():
    message = StoredMessage(session_id="s", seq=3, sender_id="bob",
                            message=msgspec.Raw(b'{"type":"text","body":"x"}'),
                            sender_timestamp=1, server_timestamp=2)
    assert json.loads(GradAgenda.encode(message)) == {
        "type": "message-broadcast", "session-id": "s", "sender-id": "bob",
        "message": {"type": "text", "body": "x"}, "sender-timestamp": 1, "seq": 3,
        "server-timestamp": 2}
    info = SessionInfo(session_id="s", kind="direct", status="unchanged", members=["a", "b"],
                       cdid="c")
    assert json.loads(GradAgenda.encode(info)) == {
        "type": "providing-session-info", "cdid": "c", "session-id": "s",
        "session-type": "direct", "status": "unchanged", "user-id": ["a", "b"]}
    assert json.loads(GradAgenda.encode(Status(cdid="c", ok=False, message="why"))) == {
        "type": "status-response", "cdid": "c", "status": "failed", "message": "why"}


@given(st.lists(st.binary(min_size=2, max_size=300), max_size=30),
       st.integers(min_value=64, max_value=2000))
def test_batch_frames_keep_order_and_fit_the_limit(sizes, limit):
    items = [json.dumps({"n": i, "pad": "x" * len(b)}).encode() for i, b in enumerate(sizes)]
    out = list(batch_frames("cdid", items, limit))
    unpacked = []
    for frame in out:
        decoded = json.loads(frame)
        if decoded.get("type") == "batch-mode-action":
            assert len(frame) <= limit and decoded["cdid"] == "cdid"
            unpacked += decoded["actions"]
        else:
            unpacked.append(decoded)  # too big to wrap: sent bare, as it came
            assert len(frame) + len(b'{"type":"batch-mode-action","cdid":"cdid","actions":[]}') > limit
    assert [u["n"] for u in unpacked] == list(range(len(items)))


# --- fuzzing -----------------------------------------------------------------------------

ACTIONS = ["authenticate", "request-direct-session-info", "request-mutable-session-creation",
           "request-mutable-session-modification", "request-mutable-session-deletion",
           "request-mutable-session-listing", "request-sending-a-message",
           "request-message-history", "batch-mode-action"]
users = st.sampled_from(["alice", "bob", "carol", ""]) | json_values
objects = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(ACTIONS) | json_values,
    "cdid": st.text(max_size=8) | json_values,
    "user-id": users | st.lists(users, max_size=4),
    "device-id": st.text(max_size=8) | json_values,
    "token": st.just(mint(JWT_SECRET, "alice")) | st.text(max_size=10) | json_values,
    "session-id": st.sampled_from(["@session", "nope"]) | json_values,
    "message": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["text", "image"]) | json_values,
        "body": st.text(max_size=20) | json_values}) | json_values,
    "sender-timestamp": st.integers() | json_values,
    "before": st.integers() | json_values, "after": st.integers() | json_values,
    "limit": st.integers() | json_values,
})
batches = st.fixed_dictionaries({"type": st.just("batch-mode-action"),
                                 "actions": st.lists(objects, max_size=4)},
                                optional={"cdid": st.text(max_size=8)})
ODD_SHAPES = [
    {"type": "request-sending-a-message", "cdid": "c", "session-id": "@session",
     "message": {"type": "text", "body": "b"}, "sender-timestamp": 1},
    {"type": "batch-mode-action", "cdid": "c", "actions": [{"type": "x", "cdid": "d"}]},
    {"type": "request-message-history", "cdid": "c", "session-id": "@session", "limit": 5},
]
#: ``sendable``: frames a WebSocket can carry (no lone surrogates), for the server.
sendable_frames = st.one_of(st.text().filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t)),
                            json_values.map(json.dumps),
                            (objects | batches).map(lambda o: json.dumps(o, ensure_ascii=False)),
                            odd_frames(*ODD_SHAPES))
fuzz_frames = sendable_frames | odd_frames(*ODD_SHAPES, sendable=False)


def is_json(text: str) -> bool:
    """JSON chatd reads (base.decode): not too deep, numbers in range."""
    try:
        decode(msgspec.json.Decoder(), text)
        return True
    except NotJSON:
        return False


def check_outputs(p: GradAgenda, text: str, was_authenticated: bool) -> list:
    """Feed one frame; every output must be one the protocol may produce."""
    outputs = p.receive(text)
    if not is_json(text):
        assert outputs == [Close(1007, "frame is not valid JSON")]
        return outputs
    for out in outputs:
        assert isinstance(out, (Send, Close, AuthFailed, Command)), out
        if isinstance(out, Send):
            frame = json.loads(out.data)
            assert frame["type"] == "status-response" and frame["status"] == "failed"
            assert len(out.data) <= LIMIT
        elif isinstance(out, Close):
            assert out.code == 1008 and not was_authenticated and out is outputs[-1]
        elif isinstance(out, AuthFailed):
            # A refused authenticate is reported (and logged), never a login.
            assert p.authenticated == was_authenticated
        elif not was_authenticated and not isinstance(out, Login):
            assert p.authenticated  # only after an authenticate in the same batch
        if isinstance(out, Request):
            answer: Any = [] if isinstance(out, ListSessions | ReadHistory) else None
            if isinstance(out, DirectSessionInfo):
                answer = SessionInfo(session_id="d", kind="direct", status="unchanged",
                                     members=["alice", out.peer])
            for extra in flat(p.on_result(out, answer)):
                assert isinstance(extra, Send) and json.loads(extra.data)["type"]
    return outputs


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzz_frames, max_size=6))
@example(['{"type":"authenticate","device-id":"","token":"","cdid":"","user-id":""}'])
def test_fuzzed_frames_before_and_after_authentication(texts):
    for p in (protocol(), logged_in()):
        for text in texts:
            outputs = check_outputs(p, text, p.authenticated)
            if any(isinstance(o, Close) for o in outputs):
                break




ANSWER_TYPES = {"status-response", "providing-session-info", "message-broadcast",
                "batch-mode-action"}


async def test_fuzzed_frames_against_the_server(chat):
    """Each frame gets only documented answers (or 1007 if not JSON), and
    the server goes on serving everyone."""
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    for n, text in enumerate(draw(sendable_frames, 60)):
        text = text.replace("@session", session_id)
        await alice.send(text)
        if not is_json(text):
            assert await alice.closed() == 1007
            alice = await login(chat, "alice")
            continue
        # A listing after it is answered after everything the frame caused.
        await alice.send({"type": "request-mutable-session-listing", "cdid": f"end-{n}"})
        while (frame := await alice.recv()) != ok(f"end-{n}"):
            assert frame["type"] in ANSWER_TYPES, frame
    carol = await login(chat, "carol")
    own = (await create(carol, cdid="carol"))["session-id"]
    await carol.send(message(own, "still fine", cdid="fine"))
    assert (await carol.recv())["message"]["body"] == "still fine"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=80), st.text(max_size=40), st.text(max_size=200),
       st.integers(-(2**63), 2**63 - 1))
def test_a_messages_answer_size_is_counted_exactly_from_its_parts(cdid, session_id, sender,
                                                                  body, sent):
    # The frame-size check counts the widest message-broadcast from its
    # parts; it must be the length of the broadcast itself, whatever the
    # strings hold (quotes, escapes, control and non-ASCII characters).
    from chatd.protocols.gradagenda import (
        _WIDEST_MS, _WIDEST_SEQ, MessageBroadcast, TextMessage, broadcast_size,
    )
    stored = msgspec.json.encode(TextMessage(type="text", body=body))
    widest = msgspec.json.encode(MessageBroadcast(
        cdid=cdid, session_id=session_id, sender_id=sender, message=msgspec.Raw(stored),
        sender_timestamp=sent, seq=_WIDEST_SEQ, server_timestamp=_WIDEST_MS))
    assert broadcast_size(cdid, session_id, sender, stored, sent) == len(widest)


def test_a_message_whose_answer_would_not_fit_is_refused_and_one_that_just_fits_is_sent():
    p = logged_in(limit=400)

    def send(body: str) -> list:
        return p.receive(json.dumps({"type": "request-sending-a-message", "cdid": "m",
                                     "session-id": "s", "sender-timestamp": 5,
                                     "message": {"type": "text", "body": body}}))

    fits = next(n for n in range(400, 0, -1) if isinstance(send("x" * n)[0], SendMessage))
    [refused] = frames(send("x" * (fits + 1)))
    assert refused["status"] == "failed" and "400-byte frame limit" in refused["message"]
    # The widest answer it can get (seq and server-timestamp at their widest) fits exactly.
    from chatd.protocols.gradagenda import _WIDEST_MS, _WIDEST_SEQ
    answer = p.encode(StoredMessage(session_id="s", seq=_WIDEST_SEQ, sender_id="alice",
                                    message=send("x" * fits)[0].message, sender_timestamp=5,
                                    server_timestamp=_WIDEST_MS, cdid="m"))
    assert len(answer) == 400


# --- issue 23: the new actions and message types, fuzzed ---------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=30),
                    st.lists(st.text(max_size=10), max_size=3), st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["request-marking-messages", "request-marks",
                             "request-read-marks-setting", "request-mutable-session-modification",
                             "request-sending-a-message"]),
       fields=st.dictionaries(st.sampled_from(["session-id", "delivered-seq", "read-seq", "enabled",
                                               "user-id", "admin-id", "sender-timestamp"]),
                              _VALUES, max_size=5),
       media=st.dictionaries(st.sampled_from(["type", "body", "media-id", "width", "height",
                                              "duration"]), _VALUES, max_size=6))
def test_the_new_actions_answer_a_command_or_a_failed_status_whatever_they_hold(
        kind, fields, media):
    p = logged_in()
    action = {"type": kind, "cdid": "x", **fields}
    if kind == "request-sending-a-message":
        action["message"] = media
    out = p.receive(json.dumps(action))
    assert len(out) == 1, out
    if isinstance(out[0], Send):
        answer = json.loads(out[0].data)
        assert (answer["status"], answer["cdid"]) == ("failed", "x"), answer
    else:  # a command, only for a well-formed action
        assert out[0].cdid == "x"
        if isinstance(out[0], SendMessage):
            stored = json.loads(bytes(out[0].message))
            assert stored["type"] in ("text", "image", "voice")
            if stored["type"] != "text":
                assert stored["media-id"].startswith("media-")
