"""Idle connections park (chatd.parking): no task while their socket is
silent, and nothing a client can notice changes.

Each test waits for the connections to be parked (the server's parking
count), then checks what the clients see: frames still reach them, what
they send is still handled in order, and every way a connection ends
still ends it properly.
"""

from __future__ import annotations

import json

import pytest
import trio
from wsproto.events import CloseConnection, Pong, TextMessage

import chatd.connection

from tests.conftest import GUARD, SECRET
from tests.rawws import CONTINUATION, PING, RawClient, close_frame, frame, text


@pytest.fixture(autouse=True)
def park_at_once(monkeypatch):
    """Connections park as soon as they wait (not after a second of
    silence), so every wait below, between fragments included, is one
    where a connection could park."""
    monkeypatch.setattr(chatd.connection, "PARK_AFTER", 0.0)


async def _parked(server, count: int) -> None:
    with trio.fail_after(GUARD):
        while len(server._parking) != count:
            await trio.sleep(0.01)


async def _registered(server, name: str) -> RawClient:
    client = await RawClient.connect(server.port, "/multichat")
    await client.send(TextMessage(json.dumps({"action": "register", "client-name": name,
                                              "secret-key": SECRET})))
    assert json.loads(await client.next_message()) == {"action": "register-ack"}
    return client


def _message(content: str) -> bytes:
    return text(json.dumps({"action": "client-message", "content": content}))


async def test_parked_connections_still_send_and_receive(chat):
    server = await chat.start()
    a, b = await _registered(server, "a"), await _registered(server, "b")
    await _parked(server, 2)
    for i in range(3):  # each message wakes the sender, and it parks again
        await a.send_bytes(_message(f"hello {i}"))
        assert json.loads(await b.next_message())["content"] == f"hello {i}"
        await _parked(server, 2)
    await b.send_bytes(_message("back"))
    assert json.loads(await a.next_message())["content"] == "back"


async def test_a_message_fragmented_across_silences_arrives_whole(chat):
    # Between fragments the connection waits with half a message: it must
    # keep it (it does not park then) and join the rest when it comes.
    server = await chat.start()
    a, b = await _registered(server, "a"), await _registered(server, "b")
    body = json.dumps({"action": "client-message", "content": "split in three"}).encode()
    for piece, opcode, fin in ((body[:10], 0x1, False), (body[10:20], CONTINUATION, False)):
        await a.send_bytes(frame(opcode, piece, fin=fin))
        await a.send_bytes(frame(PING, b"sync"))  # the fragment is read once its pong is back
        assert isinstance(await a.next_event(), Pong)
    await a.send_bytes(frame(CONTINUATION, body[20:]))
    assert json.loads(await b.next_message())["content"] == "split in three"


async def test_a_parked_connection_answers_the_close_handshake(chat):
    server = await chat.start()
    a = await _registered(server, "a")
    await _parked(server, 1)
    await a.send_bytes(close_frame(1000, "bye"))
    event = await a.next_event()
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert await a.next_event() is None  # then the server closes TCP


async def test_a_parked_connection_is_killed_with_its_close_code(chat):
    server = await chat.start()
    a = await _registered(server, "a")
    await _parked(server, 1)
    server.shutdown()
    event = await a.until_close()
    assert event is not None and event.code == 1012


async def test_a_parked_connection_whose_peer_vanishes_is_dropped(chat):
    server = await chat.start()
    gone = await _registered(server, "gone")
    a, b = await _registered(server, "a"), await _registered(server, "b")
    await _parked(server, 3)
    await gone.reset()
    with trio.fail_after(GUARD):
        while server.metrics.connections["multichat"] != 2:
            await trio.sleep(0.01)
    await a.send_bytes(_message("still here"))
    assert json.loads(await b.next_message())["content"] == "still here"
