"""The server's shape: isolation of failures, slow consumers, TLS, shutdown."""

from __future__ import annotations

import json
import ssl

import trio
import trustme
from wsproto.events import CloseConnection, Ping, TextMessage

from chatd.config import Config, EndpointConfig, Wss
from chatd.protocols.multichat import Multichat
from chatd.server import Mount
from tests.conftest import SECRET
from tests.rawws import RawClient, open_stream


def chat_message(text: str) -> dict:
    return {"action": "client-message", "content": text}


async def test_a_crashing_handler_ends_only_its_own_connection(chat):
    server = await chat.start()

    class Crashing(Multichat):
        def receive(self, text):
            if self.authenticated and "boom" in text:
                raise RuntimeError("protocol bug")
            return super().receive(text)

    default = server.mounts["/multichat"]
    server.mounts["/crash"] = Mount("/crash", Crashing, default.room, default.ctx)
    victim = await chat.multichat("victim", "/crash")
    bystander = await chat.multichat("bystander")
    await victim.send(chat_message("boom"))
    assert await victim.closed() == 1011
    newcomer = await chat.multichat("newcomer")
    await newcomer.send(chat_message("still serving"))
    assert (await bystander.recv())["content"] == "still serving"


async def test_ping_after_the_servers_close_frame_does_not_stop_the_server(chat):
    # trio-websocket issue #184: a pong sent after the close frame raised
    # LocalProtocolError from the reader task and killed serve_websocket.
    server = await chat.start()
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send(TextMessage(json.dumps({"action": "register", "client-name": "x",
                                           "secret-key": "wrong"})))
    close = await raw.next_event()
    assert isinstance(close, CloseConnection) and close.code == 1008
    # wsproto won't send a ping after receiving a close: frame it by hand.
    await raw.send_bytes(b"\x89\x84abcd" + bytes(a ^ b for a, b in zip(b"ping", b"abcd")))
    await raw.aclose()
    alice = await chat.multichat("alice")
    bob = await chat.multichat("bob")
    await alice.send(chat_message("after the race"))
    assert (await bob.recv())["content"] == "after the race"


async def test_pings_are_answered_while_open(chat):
    server = await chat.start()
    raw = await RawClient.connect(server.port, "/multichat")
    await raw.send(Ping(b"hello"))
    pong = await raw.next_event()
    assert pong.payload == b"hello"


async def flood_past_a_slow_consumer(chat, server, payload: str, total: int) -> None:
    """A client with a tiny receive window registers and never reads while
    ``total`` messages of ``payload`` go to the lobby: another client gets
    every one, in order, and the slow one is cut off. What is left for it
    to read ends in a close frame saying why, or (if even that could not be
    written) in EOF."""
    slow = await RawClient.connect(server.port, "/multichat", rcvbuf=4096)
    await slow.send(TextMessage(json.dumps({"action": "register", "client-name": "slow",
                                            "secret-key": SECRET})))
    fast = await chat.multichat("fast")
    sender = await chat.multichat("sender")

    async def read_all():
        for i in range(total):
            assert (await fast.recv())["content"] == f"{i} {payload}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for i in range(total):
            await sender.send(chat_message(f"{i} {payload}"))
    close = await slow.until_close()
    assert close is None or (close.code, close.reason) == (1008, "slow consumer")


async def test_a_slow_consumer_is_cut_off_and_the_others_keep_receiving(chat):
    server = await chat.start(outbox_size=16, close_timeout=0.5, message_rate=1e6,
                              message_burst=10**6)
    await flood_past_a_slow_consumer(chat, server, "x" * 3000, 2000)


async def test_a_slow_consumer_of_large_frames_is_cut_off_by_bytes_not_only_frames(chat):
    # 200 frames of ~3.9 KB stay under the outbox's 256 frames but hold
    # ~780 KB for one client that never reads: the byte bound (outbox-size
    # x 512 bytes, here 128 KiB) cuts it off before it costs the server more.
    server = await chat.start(outbox_size=256, message_rate=1e6, message_burst=10**6)
    await flood_past_a_slow_consumer(chat, server, "y" * 3900, 200)


async def test_shutdown_closes_every_client_with_1012_so_they_reconnect(chat):
    # 1012 "Service Restart" (RFC 6455 registry): clients built on the
    # websockets library treat 1000/1001 as final and never come back.
    server = await chat.start()
    peers = [await chat.multichat(f"p{i}") for i in range(3)]
    server.shutdown()
    for peer in peers:
        assert await peer.closed() == 1012
    with trio.fail_after(10):
        await server.stopped.wait()


async def test_the_shutdown_close_code_is_configurable(chat):
    server = await chat.start(shutdown_close_code=1001)
    peer = await chat.multichat("p")
    server.shutdown()
    assert await peer.closed() == 1001


async def test_wss_only_when_configured(chat, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    config = Config(secret_key=SECRET)
    config.wss = Wss(keyfile=str(tmp_path / "key.pem"), certfile=str(tmp_path / "cert.pem"))
    await chat.start(config)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a = await chat.connect("/", ssl_context=client_ctx)
    b = await chat.connect("/", ssl_context=client_ctx)
    for peer, name in ((a, "a"), (b, "b")):
        await peer.send({"action": "register", "client-name": name, "secret-key": SECRET})
        assert await peer.recv() == {"action": "register-ack"}
    await a.send(chat_message("over tls"))
    assert (await b.recv())["content"] == "over tls"
    # A plain ws:// upgrade to the same port gets no WebSocket: the server
    # drops the connection instead of answering 101.
    stream = await open_stream(chat.server.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    answer = b""
    with trio.fail_after(10):
        while chunk := await _receive_or_eof(stream):
            answer += chunk
    assert b"101" not in answer


async def _receive_or_eof(stream: trio.abc.Stream) -> bytes:
    try:
        return await stream.receive_some(4096)
    except trio.BrokenResourceError:
        return b""


async def test_rooms_are_per_endpoint(chat):
    config = Config(secret_key=SECRET, endpoints=[
        EndpointConfig(path="/a", protocol="multichat", room="one"),
        EndpointConfig(path="/a2", protocol="multichat", room="one"),
        EndpointConfig(path="/b", protocol="multichat", room="two"),
    ])
    await chat.start(config)
    a, a2, b = (await chat.multichat("a", "/a"), await chat.multichat("a2", "/a2"),
                await chat.multichat("b", "/b"))
    b2 = await chat.multichat("b2", "/b")
    await a.send(chat_message("room one"))
    await b.send(chat_message("room two"))
    assert (await a2.recv())["content"] == "room one"
    assert (await b2.recv())["content"] == "room two"


async def test_a_protocol_close_behind_a_stuck_write_still_ends_the_connection(chat):
    # A wcp client that stopped reading leaves: its close (1000 after
    # user_left) queues behind frames the kernel cannot take. It must still
    # end within close-timeout, not hold its socket for ever.
    server = await chat.start(close_timeout=0.3, ping_interval=0, outbox_size=10_000,
                              message_rate=1e6, message_burst=10**6)
    raw = await RawClient.connect(server.port, "/wcp", rcvbuf=4096)
    await raw.send(TextMessage(json.dumps({"type": "user_joined", "user_id": "sleepy",
                                           "display_name": "Sleepy"})))
    sender = await chat.multichat("sender")
    for i in range(100):
        await sender.send(chat_message(f"{i} " + "x" * 3500))
    await raw.send(TextMessage(json.dumps({"type": "user_left", "user_id": "sleepy"})))
    with trio.fail_after(10):
        while any(c.name == "sleepy" for c in server.connections):
            await trio.sleep(0.01)  # no event to wait on: watch the server let go
