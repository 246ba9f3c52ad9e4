"""Abuse limits and keepalive, against a real server."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionRejected
from wsproto.events import CloseConnection, Ping, TextMessage

from tests.conftest import SECRET, open_websocket_url
from tests.rawws import RawClient, open_stream


async def rejected_status(url: str, **kwargs) -> int | None:
    """The HTTP status a handshake is refused with, or None if accepted."""
    try:
        async with open_websocket_url(url, **kwargs):
            return None
    except ConnectionRejected as exc:
        return exc.status_code


def message(text: str) -> dict:
    return {"action": "client-message", "content": text}


# Loopback is exempt from the per-address limits by default; these tests
# lift the exemption to see the limits themselves.
NO_EXEMPTION = {"limits_exempt": []}


async def test_connections_per_address_are_capped_with_429(chat):
    server = await chat.start(max_connections_per_ip=2, **NO_EXEMPTION)
    first = await chat.multichat("a")
    await chat.multichat("b")
    assert await rejected_status(chat.url("/multichat")) == 429
    await first.close()
    # A freed place can be taken again: the count follows disconnects
    # (the close handshake ends before the server releases the place).
    with trio.fail_after(10):
        while server.ledger.total > 1:
            await trio.sleep(0.01)  # no event to wait on: the server lets go in its own time
    assert await rejected_status(chat.url("/multichat")) is None


async def test_total_connections_are_capped_with_503(chat):
    await chat.start(max_connections=2)
    await chat.multichat("a")
    await chat.multichat("b")
    assert await rejected_status(chat.url("/multichat")) == 503


async def test_connecting_too_fast_from_one_address_gets_429(chat):
    await chat.start(connect_burst_per_ip=3, connect_rate_per_ip=0.001, **NO_EXEMPTION)
    for name in "abc":
        await chat.multichat(name)
    assert await rejected_status(chat.url("/multichat")) == 429


async def test_loopback_is_exempt_from_per_address_limits_but_not_the_total(chat):
    await chat.start(max_connections_per_ip=1, connect_burst_per_ip=1,
                     connect_rate_per_ip=0.001, max_connections=3)
    for name in "abc":
        await chat.multichat(name)  # three from 127.0.0.1, over both per-address limits
    assert await rejected_status(chat.url("/multichat")) == 503


async def test_silent_connection_that_never_pongs_is_closed_1011(chat):
    server = await chat.start(ping_interval=0.1, ping_timeout=0.1)
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send(TextMessage(json.dumps({"action": "register", "client-name": "mute",
                                           "secret-key": SECRET})))
    assert isinstance(await raw.next_event(), TextMessage)  # register-ack
    # The raw client never answers the server's pings.
    close = await raw.until_close()
    assert close is not None and close.code == 1011


async def test_connection_answering_pings_stays_open(chat):
    server = await chat.start(ping_interval=0.05, ping_timeout=5)
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send(TextMessage(json.dumps({"action": "register", "client-name": "polite",
                                           "secret-key": SECRET})))
    assert isinstance(await raw.next_event(), TextMessage)
    pings = 0
    while pings < 3:
        event = await raw.next_event()
        assert not isinstance(event, CloseConnection)
        if isinstance(event, Ping):
            pings += 1
            await raw.send(event.response())
    other = await chat.multichat("other")
    await other.send(message("still there?"))
    while not isinstance(event := await raw.next_event(), TextMessage):
        assert not isinstance(event, CloseConnection)
    assert json.loads(event.data)["content"] == "still there?"


@pytest.mark.parametrize("origin, require, status", [
    ("https://chat.example", False, None),
    ("https://evil.example", False, 403),
    (None, False, None),
    (None, True, 403),
])
async def test_allowed_origins(chat, origin, require, status):
    await chat.start(allowed_origins=["https://chat.example"], require_origin=require)
    headers = [(b"Origin", origin.encode())] if origin else None
    assert await rejected_status(chat.url("/multichat"), extra_headers=headers) == status


async def test_shutdown_does_not_wait_for_a_ping_nobody_answers(chat):
    server = await chat.start(ping_interval=0.05, ping_timeout=3600, shutdown_timeout=3600)
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send(TextMessage(json.dumps({"action": "register", "client-name": "deaf",
                                           "secret-key": SECRET})))
    while not isinstance(await raw.next_event(), Ping):
        pass  # a ping is now pending, and the client will never answer it
    server.shutdown()
    close = await raw.until_close()
    assert close.code == 1012
    await raw.send(close.response())
    with trio.fail_after(10):  # a hang guard: nothing is left to wait for
        await server.stopped.wait()


async def test_refused_handshakes_are_bounded_per_address(chat):
    server = await chat.start(max_connections_per_ip=2, **NO_EXEMPTION)
    await chat.multichat("a")
    await chat.multichat("b")
    # Silent connections beyond the limit: two are held to be answered 429,
    # the rest are dropped at once instead of holding sockets.
    held = [await open_stream(server.port) for _ in range(2)]
    with trio.fail_after(10):
        while server.ledger.refusing_total < 2:
            await trio.sleep(0.01)  # no event to wait on: the server accepts in its own time
    dropped = await open_stream(server.port)
    with trio.fail_after(10):
        assert await dropped.receive_some(1024) == b""
    await held[0].send_all(b"GET /multichat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           b"Sec-WebSocket-Version: 13\r\n\r\n")
    with trio.fail_after(10):
        assert (await held[0].receive_some(1024)).startswith(b"HTTP/1.1 429")
