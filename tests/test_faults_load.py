"""Abuse in bulk: 10,000 garbage frames per protocol, a flood beside a
conversation, and a store that stops accepting writes.

The per-connection message rate limit is lifted here (``no_rate_limits``)
so these tests see how the protocols and the router bear the load on
their own; test_limits.py shows the limit cutting a flood short.
"""

from __future__ import annotations

import json
import random

import trio

from tests.abuse import no_rate_limits, no_tracebacks, still_serving  # noqa: F401 (fixture)
from tests.conftest import GUARD
from tests.lobby_peers import signed, socialvp, wcp, wschat
from tests.rawws import RawClient, text
from tests.test_faults import chat_message, raw_multichat
from tests.test_gradagenda import auth, create, direct, failed, login, message, ok

GARBAGE = 10_000
BATCH = 500
ALPHABET = 'abc xyz{}[]":,01\\é€🙂\t\n'

# Per protocol: JSON of the wrong shape, each answered (or ignored) the same way.
SHAPES = {
    "multichat": [{"action": "shout"}, {"foo": 1}, [1, 2], 42, "str",
                  {"action": "client-message"}, {"action": "client-message", "content": 5},
                  {"action": "client-message", "content": ""},
                  {"action": "register", "client-name": "x", "secret-key": "y"}],
    "wschat": [{"usr": "x"}, {"msg": "x"}, {"usr": 1, "msg": "x"}, [1], 42, None,
               {"usr": "x", "msg": "unsigned"}, {"usr": "x", "msg": "forged", "jwt": "e30.e30.x"}],
    "socialvp": [[1, 2], 42, "s", {"foo": 1}, {"command": "broadcast"},
                 {"command": "message", "message": "x"}, {"command": "identify"},
                 {"command": "message", "to": 5, "message": "x"}],
    "wcp": [[1], 42, {"foo": 1}, {"type": "shout"}, {"type": "message"},
            {"type": "message", "data": 5}, {"type": "user_joined", "user_id": "x"},
            {"type": "user_left"}],
    "gradagenda": [[1], 42, {"foo": 1}, {"type": "shout", "cdid": "g"},
                   {"type": "request-sending-a-message", "cdid": "g"},
                   {"type": "request-direct-session-info", "cdid": "g", "user-id": 7}],
}


def garbage(protocol: str, n: int, *, json_only: bool = False) -> list[bytes]:
    """``n`` frames: text that is not JSON, JSON cut short, and JSON of the
    wrong shape (only the last with ``json_only``)."""
    rng = random.Random(f"{protocol}-{n}")
    shapes = SHAPES[protocol]
    containers = [s for s in shapes if isinstance(s, (dict, list))]
    frames = []
    for _ in range(n):
        kind = 2 if json_only else rng.randrange(3)
        if kind == 0:  # "x" first: never JSON
            data = "x" + "".join(rng.choices(ALPHABET, k=rng.randrange(60)))
        elif kind == 1:  # a proper prefix of an object or array is never JSON
            whole = json.dumps(rng.choice(containers), ensure_ascii=False)
            data = whole[:rng.randrange(1, len(whole))]
        else:
            data = json.dumps(rng.choice(shapes), ensure_ascii=False)
        frames.append(text(data))
    return frames


async def send_in_batches(raw: RawClient, frames: list[bytes]) -> None:
    for i in range(0, len(frames), BATCH):
        await raw.send_bytes(b"".join(frames[i:i + BATCH]))


async def flood_and_read(raw: RawClient, frames: list[bytes], check_answer) -> None:
    """Send ``frames`` while reading one answer per frame, checking each."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_in_batches, raw, frames)
        for _ in range(len(frames)):
            check_answer(json.loads(await raw.next_message()))


# --- 10,000 garbage frames ------------------------------------------------------


async def test_multichat_ignores_garbage_after_register(chat):
    server = await chat.start(**no_rate_limits())
    vandal = await raw_multichat(server.port, "vandal")
    watcher = await chat.multichat("watcher")
    await send_in_batches(vandal, garbage("multichat", GARBAGE))
    # Nothing was relayed: the watcher's next frame is the vandal's real message...
    await vandal.send_text(chat_message("sorry"))
    assert (await watcher.recv())["content"] == "sorry"
    # ...and nothing was answered: the vandal's next frame is the watcher's.
    await watcher.send({"action": "client-message", "content": "apology accepted"})
    assert json.loads(await vandal.next_message())["content"] == "apology accepted"
    await still_serving(chat)


async def test_wschat_drops_garbage_and_relays_what_follows(chat):
    server = await chat.start(**no_rate_limits())
    vandal = await RawClient.connect(server.port, "/wschat")
    watcher = await wschat(chat)
    await send_in_batches(vandal, garbage("wschat", GARBAGE))
    await vandal.send_text(json.dumps(signed("vandal", "sorry")))
    # wschat echoes: for both, the next frame is the real message.
    assert (await watcher.recv())["msg"] == "sorry"
    assert json.loads(await vandal.next_message())["msg"] == "sorry"
    await still_serving(chat)


async def test_socialvp_answers_every_garbage_frame_with_outcome_400(chat):
    server = await chat.start(**no_rate_limits())
    vandal = await RawClient.connect(server.port, "/socialvp")
    await vandal.next_message()  # init
    await vandal.send_text(json.dumps({"command": "identify", "name": "vandal"}))
    assert json.loads(await vandal.next_message())["code"] == 300
    watcher = await socialvp(chat, "watcher")

    def check(answer: dict) -> None:
        assert answer["type"] == "outcome" and answer["code"] == 400, answer
        assert answer["success"] is False

    await flood_and_read(vandal, garbage("socialvp", GARBAGE), check)
    await vandal.send_text(json.dumps({"command": "broadcast", "message": "sorry"}))
    assert await watcher.recv() == {"type": "broadcast", "from": "vandal", "message": "sorry"}
    await still_serving(chat)


async def test_wcp_answers_every_garbage_frame_with_an_error(chat):
    server = await chat.start(**no_rate_limits())
    vandal = await RawClient.connect(server.port, "/wcp")
    watcher = await wcp(chat, "watcher")
    await vandal.send_text(json.dumps({"type": "user_joined", "user_id": "vandal",
                                       "display_name": "V"}))
    assert (await watcher.recv())["user_id"] == "vandal"
    # The roster: who was in the room when the vandal joined.
    assert json.loads(await vandal.next_message())["user_id"] == "watcher"

    def check(answer: dict) -> None:
        assert answer == {"type": "error", "message": "Invalid message format"}

    await flood_and_read(vandal, garbage("wcp", GARBAGE), check)
    await vandal.send_text(json.dumps({"type": "message", "data": "sorry"}))
    assert (await watcher.recv())["data"] == "sorry"
    await still_serving(chat)


async def test_gradagenda_fails_each_wrong_action_then_closes_1007_on_bad_json(chat):
    server = await chat.start(**no_rate_limits())
    vandal = await RawClient.connect(server.port, "/gradagenda")
    await vandal.send_text(json.dumps(auth("vandal")))
    assert json.loads(await vandal.next_message()) == ok("auth")
    bob = await login(chat, "bob")

    def check(answer: dict) -> None:
        assert answer["type"] == "status-response" and answer["status"] == "failed", answer

    await flood_and_read(vandal, garbage("gradagenda", GARBAGE - 1, json_only=True), check)
    await vandal.send_text("x not json")
    close = await vandal.until_close()
    assert close is not None and close.code == 1007
    # Bob carries on: his next frame is the answer to his own request.
    await create(bob, cdid="after")
    await still_serving(chat)


# --- a flood beside a conversation ---------------------------------------------------


async def test_a_flooding_client_does_not_keep_others_from_their_conversation(chat):
    # The flood is not throttled here, and this test's own clients read
    # slower than chatd delivers 20,000 frames: room for all of them, so
    # what is tested is the conversation, not the slow-consumer cut-off.
    server = await chat.start(**no_rate_limits(), outbox_size=25_000)
    flooder = await raw_multichat(server.port, "flooder")
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    flood = [text(chat_message(f"flood {i}")) for i in range(20_000)]
    flood.append(text(chat_message("flood over")))
    talk = 50
    heard: dict[str, list[str]] = {"alice": [], "bob": []}
    floods_seen = {"alice": 0, "bob": 0}

    async def speak(me: str, peer) -> None:
        for i in range(talk):
            await peer.send({"action": "client-message", "content": f"{me} says {i}"})

    async def listen(me: str, peer) -> None:
        # Everything the lobby carries arrives: the flood, then its end, and
        # all the other's lines, in order, whatever the interleaving.
        flood_over = False
        while not flood_over or len(heard[me]) < talk:
            frame = await peer.recv()
            if frame["source-client-name"] == "flooder":
                if frame["content"] == "flood over":
                    flood_over = True
                else:
                    floods_seen[me] += 1
            else:
                heard[me].append(frame["content"])

    with trio.fail_after(6 * GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_batches, flooder, flood)
            for me, peer in (("alice", alice), ("bob", bob)):
                nursery.start_soon(speak, me, peer)
                nursery.start_soon(listen, me, peer)
    assert heard["alice"] == [f"bob says {i}" for i in range(talk)]
    assert heard["bob"] == [f"alice says {i}" for i in range(talk)]
    assert floods_seen == {"alice": 20_000, "bob": 20_000}


# --- a store that stops writing ---------------------------------------------------------


async def test_a_read_only_database_fails_sends_clearly_and_lobbies_keep_working(chat, caplog):
    server = await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session_id = (await direct(alice, "bob"))["session-id"]
    await alice.send(message(session_id, "stored", cdid="m1"))
    assert (await alice.recv())["seq"] == 1
    assert (await bob.recv())["message"]["body"] == "stored"
    # The database turns read-only under the running server (the writer is
    # idle: message 1 is confirmed). chmod would not do: the file is already
    # open for writing, and the tests may run as root.
    server.store.db.execute("PRAGMA query_only=ON")
    await alice.send(message(session_id, "lost?", cdid="m2"))
    assert "storage unavailable" in await failed(alice, "m2")
    # Bob got nothing: his next frame is the answer to his own request.
    await bob.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    assert (await bob.recv())["cdid"] == "ls"
    # Alice is told again rather than left waiting.
    await alice.send(message(session_id, "again", cdid="m3"))
    assert "storage unavailable" in await failed(alice, "m3")
    await still_serving(chat)
    # The operator is told why, once, with the cause.
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.name for r in errors] == ["chatd.store"]
    assert "readonly" in str(errors[0].exc_info[1])
    caplog.clear()  # expected: not a traceback for no_tracebacks to report


async def test_a_direct_session_that_failed_to_store_is_not_reported_to_exist(chat, caplog):
    server = await chat.start()
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    server.store.db.execute("PRAGMA query_only=ON")
    await alice.send({"type": "request-direct-session-info", "cdid": "d1", "user-id": "bob"})
    assert "storage unavailable" in await failed(alice, "d1")
    # Bob asking for the same pair must not be told it exists.
    await bob.send({"type": "request-direct-session-info", "cdid": "d2", "user-id": "alice"})
    assert "storage unavailable" in await failed(bob, "d2")
    caplog.clear()  # the store's logged cause is expected here
