"""chatd behind a real nginx, with the example configs of docs/examples/
as the README shows them: the client address comes through, limits
apply per client, WebSockets and health checks pass."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from tests.conftest import GUARD, SECRET, free_port
from tests.nginx import EXAMPLES, Nginx
from tests.rawws import text



@pytest.fixture
def nginx(tmp_path):
    """Start nginx with an example config (ports filled in); yields a function
    (example name, chatd port) -> nginx's port."""
    runner = Nginx(tmp_path)

    def start(example: str, chatd_port: int) -> int:
        port = free_port()
        site = (EXAMPLES / example).read_text()
        site = site.replace("127.0.0.1:8765", f"127.0.0.1:{chatd_port}")
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        site = site.replace("listen 8443;", f"listen 127.0.0.1:{port};")
        runner.start(site)
        return port

    yield start
    runner.stop()


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection from the loopback address ``source``, retried while
    nginx is still starting."""
    with trio.fail_after(GUARD):
        while True:
            sock = trio.socket.socket()
            await sock.bind((source, 0))
            try:
                await sock.connect(("127.0.0.1", port))
                return trio.SocketStream(sock)
            except OSError:
                sock.close()
                await trio.sleep(0.05)  # nginx is still binding its port


async def register_via(source: str, port: int, name: str) -> trio.SocketStream:
    stream = await connect_from(source, port)
    await stream.send_all(b"GET /multichat HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    data = b""
    with trio.fail_after(GUARD):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 101"), data
        await stream.send_all(text(json.dumps({"action": "register", "client-name": name,
                                               "secret-key": SECRET})))
        answer = b""
        while b"register-ack" not in answer:
            answer += await stream.receive_some(4096)
    return stream


async def test_three_hundred_clients_through_nginx_keep_their_own_addresses(chat, nginx, caplog):
    # The field report: through nginx every client had the proxy's address,
    # so a third of them were refused 429. Three client addresses, 100 each,
    # a per-address cap of 200: all are accepted, each counted as itself.
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], limits_exempt=[],
                              max_connections_per_ip=200)
    port = nginx("nginx-websocket.conf", server.port)
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    streams = [await register_via(sources[i % 3], port, f"c{i}") for i in range(300)]
    assert server.ledger.per_ip == {source: 100 for source in sources}
    peers = {r.getMessage().split()[0] for r in caplog.records if "connected to" in r.getMessage()}
    assert peers == set(sources)
    # Plain GETs pass too: health checks and the web client.
    health = await connect_from("127.0.0.2", port)
    await health.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(GUARD):
        assert (await health.receive_some(4096)).startswith(b"HTTP/1.1 200")
    for stream in streams + [health]:
        await stream.aclose()


async def test_the_per_address_limit_applies_to_each_client_behind_nginx(chat, nginx):
    server = await chat.start(trusted_proxies=["127.0.0.1"], limits_exempt=[],
                              max_connections_per_ip=2)
    port = nginx("nginx-websocket.conf", server.port)
    kept = [await register_via("127.0.0.2", port, f"a{i}") for i in range(2)]
    kept.append(await register_via("127.0.0.3", port, "b"))  # another client: its own count
    stream = await connect_from("127.0.0.2", port)
    await stream.send_all(b"GET /multichat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    with trio.fail_after(GUARD):
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 429")
    for s in kept + [stream]:
        await s.aclose()


async def test_the_proxy_protocol_through_nginx_stream_names_the_client(chat, nginx, caplog):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    port = nginx("nginx-stream-proxy-protocol.conf", server.port)
    stream = await register_via("127.0.0.5", port, "streamed")
    source_port = stream.socket.getsockname()[1]
    lines = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
    assert lines[-1].startswith(f"127.0.0.5:{source_port} connected to /multichat")
    await stream.aclose()
