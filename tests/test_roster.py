"""Answers sized by the room are paced, not bounded (issue 19 item 1).

A wcp joiner is sent a ``user_joined`` for every name in its room. That
roster once went out as one outbox item: past the slow-consumer byte
bound (``outbox-size`` x 512 bytes) the joiner was closed 1008 "slow
consumer" while reading at full speed, so a big enough room let nobody
in. Now an answer to a client's own request is written as the client
reads (docs/protocols.md, "Slow readers"), and only broadcast traffic
held behind it counts towards the bound. These tests use a small ``outbox-size`` so that a room
of a few dozen long names is larger than the bound.
"""

from __future__ import annotations

import json

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import TextMessage

from tests.conftest import GUARD
from tests.lobby_peers import socialvp, wcp
from tests.rawws import RawClient

#: 16 frames, 8 KiB: the bound a roster used to be held to.
OUTBOX = 16
BOUND_BYTES = OUTBOX * 512


def long_name(i: int, length: int = 200) -> str:
    return f"n{i:04d}" + "x" * (length - 5)


async def test_a_joiner_of_a_room_larger_than_the_outbox_gets_the_whole_roster(chat):
    server = await chat.start(outbox_size=OUTBOX)
    names = [long_name(i, 256) for i in range(200)]
    peers = [await socialvp(chat, name) for name in names]
    # The joiner reads as fast as it can, through a small receive window
    # (as a client on a slow link does): most of the roster waits in the
    # server until it is read.
    joiner = await RawClient.connect(server.port, "/wcp", rcvbuf=4096)
    await joiner.send(TextMessage(json.dumps({"type": "user_joined", "user_id": "joiner",
                                              "display_name": "Joiner"})))
    roster = [json.loads(await joiner.next_message()) for _ in names]
    assert sum(len(json.dumps(frame)) for frame in roster) > 10 * BOUND_BYTES
    assert [(frame["type"], frame["user_id"]) for frame in roster] == [
        ("user_joined", name) for name in names]
    # Joined for good: it receives what the room says after its roster,
    # and the room hears it.
    await peers[0].send({"command": "broadcast", "message": "welcome"})
    frame = json.loads(await joiner.next_message())
    assert (frame["type"], frame["user_id"], frame["data"]) == ("message", names[0], "welcome")
    await joiner.send(TextMessage(json.dumps({"type": "message", "data": "thanks"})))
    while (frame := await peers[1].recv()).get("from") != "joiner":
        pass
    assert frame["message"] == "thanks"


async def test_events_during_a_roster_come_after_it_and_add_up_to_the_room(chat):
    # While the roster is written, names come and go: whatever the timing,
    # each change reaches the joiner after the roster, so replaying what it
    # got gives the room as it is.
    await chat.start(outbox_size=OUTBOX)
    names = [long_name(i) for i in range(50)]
    peers = dict(zip(names, [await socialvp(chat, name) for name in names]))
    joiner = await chat.connect("/wcp")
    await joiner.send({"type": "user_joined", "user_id": "joiner", "display_name": "Joiner"})
    leaving = names[:10]
    for name in leaving:
        await peers.pop(name).close()
    newcomers = [long_name(i) for i in range(100, 110)]
    for name in newcomers:
        peers[name] = await socialvp(chat, name)
    # A last marker: once it arrives, every change above has been seen.
    await peers[newcomers[-1]].send({"command": "broadcast", "message": "marker"})
    room: list[str] = []
    while (frame := await joiner.recv())["type"] != "message":
        if frame["type"] == "user_joined":
            assert frame["user_id"] not in room
            room.append(frame["user_id"])
        else:
            assert frame["type"] == "user_left" and frame["user_id"] in room
            room.remove(frame["user_id"])
    assert sorted(room) == sorted(peers)


async def test_a_joiner_that_does_not_read_is_still_cut_off_when_the_room_is_busy(chat):
    server = await chat.start(outbox_size=OUTBOX, message_rate=1e6, message_burst=10**6,
                              close_timeout=0.5)
    names = [long_name(i) for i in range(60)]
    peers = [await socialvp(chat, name) for name in names]
    # A joiner with a tiny receive window that never reads: its roster
    # stops at the socket, and the room's traffic waits behind it.
    slow = await RawClient.connect(server.port, "/wcp", rcvbuf=4096)
    await slow.send(TextMessage(json.dumps({"type": "user_joined", "user_id": "slow",
                                            "display_name": "Slow"})))
    reader = await wcp(chat, "reader")
    total = 200
    payload = "y" * 1000

    async def read_all():
        for i in range(total):
            while (frame := await reader.recv())["type"] != "message":
                pass
            assert frame["data"] == f"{i} {payload}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for i in range(total):
            await peers[0].send({"command": "broadcast", "message": f"{i} {payload}"})
    close = await slow.until_close()
    assert close is None or (close.code, close.reason) == (1008, "slow consumer")
    # The reader was never taken for a slow consumer (the socialvp peers,
    # which did not read either, may have been).
    last = await socialvp(chat, "last")
    await last.send({"command": "broadcast", "message": "still here"})
    while (frame := await reader.recv())["type"] != "message":
        pass
    assert frame["data"] == "still here"


_sizes = st.lists(st.integers(min_value=4, max_value=256), min_size=1, max_size=40)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(lengths=_sizes, outbox=st.integers(min_value=1, max_value=32))
def test_any_room_reaches_a_reading_joiner_whatever_the_outbox(lengths, outbox):
    """Rooms of any names (1 to 256 characters) and any ``outbox-size``:
    the joiner gets exactly the room, in the order names were claimed."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from tests.conftest import Harness

    async def main():
        with TemporaryDirectory() as tmp:
            async with trio.open_nursery() as nursery:
                chat = Harness(nursery, Path(tmp))
                server = await chat.start(outbox_size=outbox, store=":memory:")
                # Digits after a "u" and "x"s: no two of them look alike.
                names = [f"u{i:02d}" + "x" * (length - 3) for i, length in enumerate(lengths)]
                for name in names:
                    await socialvp(chat, name)
                joiner = await RawClient.connect(server.port, "/wcp", rcvbuf=4096)
                await joiner.send(TextMessage(json.dumps(
                    {"type": "user_joined", "user_id": "joiner", "display_name": "Joiner"})))
                roster = [json.loads(await joiner.next_message()) for _ in names]
                assert [frame["user_id"] for frame in roster] == names
                await joiner.aclose()
                server.shutdown()
                with trio.fail_after(GUARD):
                    await server.stopped.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)


async def test_a_history_larger_than_the_outbox_reaches_a_reader_through_a_small_window(chat):
    # The same kind on GradAgenda: 100 stored messages of ~3 KB are ~300 KB
    # of answer, over 30 times the bound; a device reading through a 4 KB
    # receive window gets all of it.
    from tests.test_gradagenda import auth, create, login, message, ok

    server = await chat.start(outbox_size=OUTBOX, message_burst=1000)
    alice = await login(chat, "alice")
    session = (await create(alice))["session-id"]
    body = "z" * 3000
    for n in range(100):
        await alice.send(message(session, f"{n} {body}", cdid=f"m{n}"))
        assert (await alice.recv())["seq"] == n + 1
    reader = await RawClient.connect(server.port, "/gradagenda", rcvbuf=4096)
    await reader.send(TextMessage(json.dumps(auth("alice", "laptop"))))
    assert json.loads(await reader.next_message()) == ok("auth")
    await reader.send(TextMessage(json.dumps({"type": "request-message-history", "cdid": "h",
                                              "session-id": session, "limit": 100})))
    got, size = [], 0
    while (text := await reader.next_message()) and json.loads(text) != ok("h"):
        size += len(text)
        got += [action["message"]["body"] for action in json.loads(text)["actions"]]
    assert size > 30 * BOUND_BYTES
    assert got == [f"{n} {body}" for n in range(100)]
