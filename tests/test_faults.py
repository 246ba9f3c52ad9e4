"""Hostile and broken connections: stalled handshakes, stalled auth stages,
clients that vanish mid-frame, pings at awkward moments.

Each test attacks a real server and then checks what a user would notice:
the attacker's close code, and that fresh clients can still chat.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Ping, Pong

from chatd.tokens import mint
from tests.abuse import no_tracebacks, still_serving  # noqa: F401 (fixture)
from tests.conftest import GUARD, JWT_SECRET, SECRET
from tests.lobby_peers import wcp
from tests.rawws import CONTINUATION, PING, RawClient, close_frame, frame, open_stream, text

HALF_REQUEST = (b"GET /multichat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n")


def register(name: str, secret: str = SECRET) -> str:
    return json.dumps({"action": "register", "client-name": name, "secret-key": secret})


def chat_message(content: str) -> str:
    return json.dumps({"action": "client-message", "content": content}, ensure_ascii=False)


async def raw_multichat(port: int, name: str) -> RawClient:
    raw = await RawClient.connect(port, "/multichat")
    await raw.send_text(register(name))
    assert json.loads(await raw.next_message()) == {"action": "register-ack"}
    return raw


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it drops the connection."""
    data = b""
    with trio.fail_after(GUARD):
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


# --- slowloris ---------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", HALF_REQUEST], ids=["nothing", "half-request"])
async def test_a_stalled_handshake_is_dropped_after_the_handshake_timeout(chat, sent):
    # 2 s, not less: the clients of ``still_serving`` below handshake under
    # the same timeout, on a machine the suite's four workers load.
    server = await chat.start(handshake_timeout=2.0)
    stream = await open_stream(server.port)
    await stream.send_all(sent)
    # Dropped without an answer: there was never a request to answer.
    assert await read_to_eof(stream) == b""
    await still_serving(chat)


async def test_a_handshake_trickled_byte_by_byte_is_dropped_all_the_same(chat):
    # The timeout covers the whole request, so a slow drip cannot extend it
    # (2 s: the drip would take over 25 s; see the test above for why not less).
    server = await chat.start(handshake_timeout=2.0)
    stream = await open_stream(server.port)
    request = HALF_REQUEST + b"X-Padding: " + b"a" * 5000 + b"\r\n\r\n"
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        try:
            for byte in request:
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(0.005)  # the attacker's pace, not synchronisation
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        assert await read_to_eof(stream) == b""
        nursery.cancel_scope.cancel()
    assert sent < len(request)
    await still_serving(chat)


async def test_many_stalled_handshakes_do_not_keep_new_clients_out(chat):
    server = await chat.start(handshake_timeout=60)
    stalled = []
    for _ in range(150):
        stream = await open_stream(server.port)
        await stream.send_all(HALF_REQUEST)
        stalled.append(stream)
    await still_serving(chat)
    for stream in stalled:
        await stream.aclose()


async def test_shutdown_does_not_wait_for_a_stalled_handshake(chat):
    server = await chat.start(handshake_timeout=60, shutdown_timeout=60)
    stream = await open_stream(server.port)
    await stream.send_all(HALF_REQUEST)
    peer = await chat.multichat("bystander")
    server.shutdown()
    try:
        assert await peer.closed() == 1012
        with trio.fail_after(2):  # a hang guard: nothing is left to wait for
            await server.stopped.wait()
    finally:
        await stream.aclose()


# --- auth-stage stalls ---------------------------------------------------------------


def _auth_frames() -> dict[str, tuple[str, str | None]]:
    """Per endpoint: its auth frame, and a frame that is answered but does
    not finish the auth stage (multichat has none: it closes at once)."""
    token = mint(JWT_SECRET, "mallory")
    return {
        "/multichat": (register("mallory"), None),
        "/socialvp": (json.dumps({"command": "identify", "name": "mallory"}),
                      json.dumps({"command": "broadcast", "message": "hi"})),
        "/wcp": (json.dumps({"type": "user_joined", "user_id": "mallory", "display_name": "M"}),
                 json.dumps({"type": "message", "data": "hi"})),
        "/gradagenda": (
            json.dumps({"type": "authenticate", "cdid": "a", "user-id": "mallory",
                        "device-id": "d", "token": token}),
            json.dumps({"type": "authenticate", "cdid": "a", "user-id": "mallory",
                        "device-id": "d", "token": "not a token"})),
    }


STALLS = ["silent", "half-a-message", "pings", "refused-attempt"]


# multichat has no refused attempt to stall with: it closes a refused first
# frame at once (test_multichat.py).
@pytest.mark.parametrize("path, stall", [
    (path, stall) for path in ("/multichat", "/socialvp", "/wcp", "/gradagenda")
    for stall in STALLS if not (path == "/multichat" and stall == "refused-attempt")])
async def test_a_client_stalling_in_the_auth_stage_is_closed_1008(chat, path, stall):
    auth, refused = _auth_frames()[path]
    # Long enough for the clients of ``still_serving`` below to register
    # on a loaded machine (the suite runs on four workers): they live under
    # the same auth-timeout.
    server = await chat.start(auth_timeout=2.0)
    raw = await RawClient.connect(server.port, path)
    if stall == "half-a-message":
        # The auth frame's first fragment; the rest never comes.
        await raw.send_bytes(text(auth[:10], fin=False))
    elif stall == "refused-attempt":
        await raw.send_text(refused)
    elif stall == "pings":
        # Busy but never authenticating: pings are answered, the clock runs on.
        with trio.fail_after(GUARD):
            while True:
                await raw.send(Ping(b"still here"))
                event = await raw.next_message()
                while not isinstance(event, (Pong, CloseConnection)):
                    event = await raw.next_message()
                if isinstance(event, CloseConnection):
                    break
        assert event.code == 1008
        await still_serving(chat)
        return
    close = await raw.until_close()
    assert close is not None and close.code == 1008
    await still_serving(chat)


# --- clients that vanish ------------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("cut", ["header", "payload"])
async def test_a_client_vanishing_mid_frame_is_announced_and_logged(chat, caplog, cut, how):
    caplog.set_level("INFO", logger="chatd")
    server = await chat.start()
    watcher = await wcp(chat, "watcher")
    ghost = await RawClient.connect(server.port, "/wcp")
    await ghost.send_text(json.dumps({"type": "user_joined", "user_id": "ghost",
                                      "display_name": "Ghost"}))
    assert (await watcher.recv())["user_id"] == "ghost"
    whole = text(json.dumps({"type": "message", "data": "never finished " * 20}))
    await ghost.send_bytes(whole[:1] if cut == "header" else whole[:len(whole) // 2])
    await (ghost.aclose() if how == "fin" else ghost.reset())
    assert await watcher.recv() == {"type": "user_left", "user_id": "ghost"}
    await still_serving(chat)
    await trio.testing.wait_all_tasks_blocked()  # the server has finished with the ghost
    assert any("disconnected" in r.getMessage() and "ghost" in r.getMessage()
               for r in caplog.records)


async def test_a_client_resetting_mid_handshake_does_not_disturb_the_server(chat):
    server = await chat.start()
    raw = await open_stream(server.port)
    await raw.send_all(HALF_REQUEST)
    await RawClient(raw).reset()
    await still_serving(chat)


# --- pings at awkward moments -------------------------------------------------------


@pytest.mark.parametrize("burst", [
    [close_frame(), frame(PING, b"late")],
    [frame(PING, b"early"), close_frame()],
    [close_frame(), frame(PING, b"a"), frame(PING, b"b"), close_frame()],
], ids=["close-then-ping", "ping-then-close", "close-ping-ping-close"])
async def test_a_client_that_closes_and_pings_at_once_is_closed_cleanly(chat, burst):
    server = await chat.start()
    raw = await raw_multichat(server.port, "closer")
    await raw.send_bytes(b"".join(burst))
    close = await raw.until_close()
    assert close is None or close.code == 1000
    await still_serving(chat)


async def test_a_client_pinging_while_the_server_closes_it_is_closed_cleanly(chat):
    # The server is closing (wrong secret) while the client pings and closes too.
    server = await chat.start()
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send_bytes(text(register("x", "wrong")) + frame(PING, b"1") + close_frame()
                         + frame(PING, b"2"))
    close = await raw.until_close()
    # Whichever close the server handles first wins: it echoes the client's
    # 1000 (first on the wire) or sends its own 1008.
    assert close is None or close.code in (1000, 1008)
    await still_serving(chat)


async def test_pings_between_fragments_are_answered_and_the_message_delivered(chat):
    server = await chat.start()
    sender = await raw_multichat(server.port, "sender")
    receiver = await chat.multichat("receiver")
    message = chat_message("pieced together around two pings").encode()
    await sender.send_bytes(
        text(message[:10], fin=False) + frame(PING, b"one")
        + frame(CONTINUATION, message[10:30], fin=False) + frame(PING, b"two")
        + frame(CONTINUATION, message[30:]))
    pongs = [await sender.next_message(), await sender.next_message()]
    assert [(type(p), p.payload) for p in pongs] == [(Pong, b"one"), (Pong, b"two")]
    assert (await receiver.recv())["content"] == "pieced together around two pings"
