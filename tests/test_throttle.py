"""Flood control that loses nothing: a client over ``message-rate`` is read
later, never cut short; every frame costs, fragments and pings included;
a GradAgenda batch costs per action. And: once chatd decides to close, no
buffered frame of that client is handled."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from tests.conftest import GUARD, SECRET
from tests.lobby_peers import signed, socialvp, wcp
from tests.rawws import BINARY, CONTINUATION, PING, RawClient, frame, text
from tests.test_gradagenda import auth, create, login, message, ok

BURST = 40
RATE = 400.0
SENT = 200  # five bursts' worth: most of them over the rate


def throttled(caplog) -> bool:
    return any("over the message rate" in r.getMessage() for r in caplog.records)


async def wait_for_log(caplog, predicate) -> None:
    with trio.fail_after(GUARD):
        while not predicate(caplog):
            await trio.sleep(0.01)  # the server logs in its own time


async def test_a_multichat_burst_over_the_rate_arrives_whole_and_in_order(chat, caplog):
    caplog.set_level(logging.INFO)
    await chat.start(message_rate=RATE, message_burst=BURST)
    bridge = await chat.multichat("bridge")
    listener = await chat.multichat("listener")
    for i in range(SENT):
        await bridge.send({"action": "client-message", "content": f"replayed {i}"})
    got = [(await listener.recv())["content"] for _ in range(SENT)]
    assert got == [f"replayed {i}" for i in range(SENT)]
    assert throttled(caplog)
    # Still connected and still heard.
    await bridge.send({"action": "client-message", "content": "done"})
    assert (await listener.recv())["content"] == "done"


async def test_socialvp_wcp_and_wschat_bursts_arrive_whole_and_in_order(chat):
    await chat.start(message_rate=RATE, message_burst=BURST)
    sender_s = await socialvp(chat, "s")
    sender_w = await wcp(chat, "w")
    sender_x = await chat.connect("/wschat")
    listener = await chat.multichat("listener")
    for i in range(SENT):
        await sender_s.send({"command": "broadcast", "message": f"s{i}"})
        await sender_w.send({"type": "message", "data": f"w{i}"})
        await sender_x.send(signed("x", f"x{i}"))
    got: dict[str, list[str]] = {"s": [], "w": [], "x": []}
    for _ in range(3 * SENT):
        content = (await listener.recv())["content"]
        got[content[0]].append(content)
    for who in "swx":
        assert got[who] == [f"{who}{i}" for i in range(SENT)]


async def test_a_gradagenda_burst_is_stored_whole_and_in_order(chat):
    await chat.start(message_rate=RATE, message_burst=BURST)
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    for i in range(SENT):
        await alice.send(message(session_id, f"flush {i}", cdid=f"m{i}"))
    answers = [await alice.recv() for _ in range(SENT)]
    assert [a["cdid"] for a in answers] == [f"m{i}" for i in range(SENT)]
    assert [a["seq"] for a in answers] == list(range(1, SENT + 1))


async def test_a_batch_costs_one_token_per_action(chat, caplog):
    # No refill: the bucket holds exactly what the client may spend.
    caplog.set_level(logging.INFO)
    await chat.start(message_rate=0.001, message_burst=45)
    alice = await chat.connect("/gradagenda")
    await alice.send(auth("alice"))  # 1 token
    assert await alice.recv() == ok("auth")
    actions = [{"type": "request-mutable-session-creation", "cdid": f"c{i}", "user-id": ["bob"]}
               for i in range(40)]
    await alice.send({"type": "batch-mode-action", "actions": actions})  # 40 tokens
    for _ in range(40):
        assert (await alice.recv())["type"] == "providing-session-info"
    for i in range(4):  # the last 4 tokens
        await alice.send({"type": "request-mutable-session-listing", "cdid": f"ls{i}"})
        while (await alice.recv()) != ok(f"ls{i}"):
            pass
    assert not throttled(caplog)
    await alice.send({"type": "request-mutable-session-listing", "cdid": "over"})
    await wait_for_log(caplog, throttled)  # the 46th action waits, unread


async def test_endless_empty_fragments_are_throttled_and_the_message_still_arrives(chat, caplog):
    # An endless stream of empty continuation fragments (never FIN) used to
    # grow the server's memory and slow everyone: each fragment is a frame
    # and costs a token like any other.
    caplog.set_level(logging.INFO)
    server = await chat.start(message_rate=2000, message_burst=100)
    listener = await chat.multichat("listener")
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send_text(json.dumps({"action": "register", "client-name": "frag",
                                    "secret-key": SECRET}))
    assert isinstance(await raw.next_event(), TextMessage)
    body = json.dumps({"action": "client-message", "content": "fragmented"}).encode()
    await raw.send_bytes(text(body[:10], fin=False))
    empty = frame(CONTINUATION, b"", fin=False)
    for _ in range(20):
        await raw.send_bytes(empty * 100)
    await wait_for_log(caplog, throttled)
    # Others are served meanwhile.
    other = await chat.multichat("other")
    await other.send({"action": "client-message", "content": "meanwhile"})
    assert (await listener.recv())["content"] == "meanwhile"
    await raw.send_bytes(frame(CONTINUATION, body[10:], fin=True))
    assert (await listener.recv()) == {"action": "forwarding-message",
                                       "source-client-name": "frag", "content": "fragmented"}


async def test_a_ping_flood_is_answered_pong_for_pong_at_the_message_rate(chat, caplog):
    caplog.set_level(logging.INFO)
    server = await chat.start(message_rate=RATE, message_burst=BURST, ping_interval=0)
    raw = await RawClient.connect(server.port, "/wschat")
    await raw.send_bytes(b"".join(frame(PING, str(i).encode()) for i in range(SENT)))
    pongs = []
    while len(pongs) < SENT:
        event = await raw.next_event()
        assert isinstance(event, Pong), event
        pongs.append(bytes(event.payload).decode())
    assert pongs == [str(i) for i in range(SENT)]
    assert throttled(caplog)
    await raw.send_text(json.dumps(signed("pinger", "still here")))
    assert json.loads(await raw.next_message())["msg"] == "still here"


# --- nothing is handled after chatd decides to close ------------------------------


OVERSIZED = text("x" * 4097)
BAD_UTF8 = text(b"\xff\xfe")


@pytest.mark.parametrize("frames, code", [
    ([OVERSIZED, OVERSIZED], 1009),
    ([OVERSIZED, BAD_UTF8, OVERSIZED], 1009),
    ([BAD_UTF8, OVERSIZED], 1007),
    ([BAD_UTF8, BAD_UTF8], 1007),
    ([frame(BINARY, b"x"), text("x" * 4097), frame(PING, b"p")], 1003),
    ([OVERSIZED, frame(PING, b"p"), frame(PING, b"q")], 1009),
    ([frame(0x3, b"reserved opcode"), OVERSIZED], 1002),
    ([text("x" * 3000, fin=False), text("y" * 2000), OVERSIZED], 1002),
    ([frame(CONTINUATION, b"x" * 3000, fin=False), OVERSIZED], 1002),
    ([text("a" * 3000, fin=False), frame(CONTINUATION, b"b" * 2000), OVERSIZED], 1009),
])
async def test_frames_after_a_fatal_one_are_never_handled(chat, caplog, frames, code):
    server = await chat.start(ping_interval=0)
    listener = await chat.connect("/wschat")
    raw = await RawClient.connect(server.port, "/wschat")
    # A message first, so there is something to compare with, then the
    # fatal frames in one write.
    await raw.send_bytes(text(json.dumps(signed("raw", "before")))
                         + b"".join(frames)
                         + text(json.dumps(signed("raw", "after"))))
    events = []
    while (event := await raw.next_event()) is not None:
        events.append(event)
        if isinstance(event, CloseConnection):
            break
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [code]
    assert not [e for e in events if isinstance(e, (Ping, Pong))]
    assert (await listener.recv())["msg"] == "before"
    # "after" was never relayed: the next thing the listener hears is this.
    other = await chat.connect("/wschat")
    await other.send(signed("other", "next"))
    assert (await listener.recv())["msg"] == "next"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- answers larger than the outbox --------------------------------------------------


async def test_a_listing_longer_than_the_outbox_is_written_as_the_client_reads(chat):
    # An answer to the client's own request is produced as the socket
    # drains; "slow consumer" is for clients that do not read.
    from tests.test_gradagenda import answers
    await chat.start(outbox_size=16, message_burst=10_000, max_sessions_per_user=10_000,
                     max_groups_per_user=10_000)
    alice = await login(chat, "alice")
    sessions = 1600
    for start in range(0, sessions, 40):
        await alice.send({"type": "batch-mode-action", "actions": [
            {"type": "request-mutable-session-creation", "cdid": f"c{i}", "user-id": ["bob"]}
            for i in range(start, start + 40)]})
        for _ in range(40):
            assert (await alice.recv())["type"] == "providing-session-info"
    await alice.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    listed, frames = await answers(alice, "ls")
    assert len(listed) == sessions and len(frames) > 16
    await alice.send({"type": "request-mutable-session-listing", "cdid": "again"})
    assert len((await answers(alice, "again"))[0]) == sessions
