"""wss terminated by chatd: TLS through memory buffers on the plain write path.

chatd encrypts each write synchronously (``chatd.transport``) and sends
the records like plain bytes, keeping what the kernel does not take; these
tests read the bytes back through a real TLS client (the standard
library's, via trio's SSLStream) and check what a user would notice:
every frame arrives whole and in order however the records were split,
a message larger than a TLS record arrives intact, the end of a
connection carries TLS close_notify, and a peer that breaks TLS or
vanishes ends only its own connection.
"""

from __future__ import annotations

import json
import socket
import ssl

import pytest
import trio
import trustme
from wsproto.events import CloseConnection, Request, TextMessage

from chatd.config import Config, Wss
from tests.conftest import GUARD, SECRET
from tests.rawws import RawClient, _open_streams, close_frame, open_stream


@pytest.fixture
def ca():
    return trustme.CA()


async def _start_wss(chat, ca, tmp_path, **overrides):
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    config = Config(secret_key=SECRET, **overrides)
    config.wss = Wss(keyfile=str(tmp_path / "key.pem"), certfile=str(tmp_path / "cert.pem"))
    return await chat.start(config)


class TlsClient(RawClient):
    """A raw WebSocket client over TLS that sees how the stream ends: with
    ``https_compatible=False`` a TCP close without close_notify is an error
    (trio.BrokenResourceError), a close_notify a clean b""."""

    @classmethod
    async def open(cls, port: int, ca: trustme.CA, *, rcvbuf: int | None = None) -> "TlsClient":
        tcp = await open_stream(port, rcvbuf=rcvbuf)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = cls(trio.SSLStream(tcp, context, server_hostname="127.0.0.1"))
        _open_streams.discard(client.stream)  # close_leftovers closes the TCP stream
        client.tcp = tcp
        return client

    @classmethod
    async def register(cls, port: int, ca: trustme.CA, name: str, **kwargs) -> "TlsClient":
        client = await cls.open(port, ca, **kwargs)
        await client.send(Request(host="127.0.0.1", target="/multichat"))
        await client.next_event()  # the 101
        await client.send(TextMessage(json.dumps({"action": "register", "client-name": name,
                                                  "secret-key": SECRET})))
        assert json.loads(await client.next_message()) == {"action": "register-ack"}
        return client

    async def end_of_stream(self) -> str:
        """Read to the end: "close_notify" or "no close_notify"."""
        with trio.fail_after(GUARD):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return "no close_notify"
                if not data:
                    return "close_notify"


def _message(text: str) -> str:
    return json.dumps({"action": "client-message", "content": text})


async def test_a_message_larger_than_a_tls_record_arrives_whole(chat, ca, tmp_path):
    # A TLS record carries at most 16 KiB: a 60 KB frame is four records,
    # written in one go, maybe in pieces.
    server = await _start_wss(chat, ca, tmp_path, max_frame_bytes=65536)
    a = await TlsClient.register(server.port, ca, "a")
    b = await TlsClient.register(server.port, ca, "b")
    big = "".join(chr(0x41 + i % 26) for i in range(60_000))
    await a.send(TextMessage(_message(big)))
    assert json.loads(await b.next_message())["content"] == big


async def test_records_the_kernel_did_not_take_follow_in_order(chat, ca, tmp_path):
    # The reader's window is tiny and it does not read while 300 messages
    # of ~3.9 KB (1.2 MB of records) are written to it: most of the
    # ciphertext waits in chatd's backlog and leaves in pieces cut anywhere
    # in a record. Once it reads, it gets every message, whole and in order.
    server = await _start_wss(chat, ca, tmp_path, outbox_size=4096, message_rate=1e6,
                              message_burst=10**6)
    slow = await TlsClient.register(server.port, ca, "slow", rcvbuf=4096)
    sender = await TlsClient.register(server.port, ca, "sender")
    payload = "y" * 3900
    for i in range(300):
        await sender.send(TextMessage(_message(f"{i} {payload}")))
    received = [json.loads(await slow.next_message())["content"] for _ in range(300)]
    assert received == [f"{i} {payload}" for i in range(300)]
    assert server.metrics.connections["multichat"] == 2  # nobody was cut off


async def test_the_close_handshake_ends_with_close_notify(chat, ca, tmp_path):
    server = await _start_wss(chat, ca, tmp_path)
    client = await TlsClient.register(server.port, ca, "c")
    await client.send_bytes(close_frame(1000, "bye"))
    event = await client.next_event()
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert await client.end_of_stream() == "close_notify"


async def test_a_connection_chatd_closes_ends_with_close_notify(chat, ca, tmp_path):
    server = await _start_wss(chat, ca, tmp_path)
    client = await TlsClient.register(server.port, ca, "c")
    server.shutdown()
    assert (await client.until_close()).code == 1012
    await client.send_bytes(close_frame(1012))  # the close handshake's answer
    assert await client.end_of_stream() == "close_notify"


async def test_an_http_answer_over_tls_ends_with_close_notify(chat, ca, tmp_path):
    server = await _start_wss(chat, ca, tmp_path)
    client = await TlsClient.open(server.port, ca)
    await client.stream.send_all(b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    with trio.fail_after(GUARD):
        while True:
            try:
                chunk = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                pytest.fail(f"no close_notify after {answer!r}")
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 426 ")  # every path is the multichat endpoint


async def test_a_peer_gone_without_close_notify_ends_only_its_connection(chat, ca, tmp_path):
    server = await _start_wss(chat, ca, tmp_path)
    gone = await TlsClient.register(server.port, ca, "gone")
    a = await TlsClient.register(server.port, ca, "a")
    b = await TlsClient.register(server.port, ca, "b")
    gone.tcp.socket.shutdown(socket.SHUT_RDWR)  # TCP ends, TLS never said so
    await a.send(TextMessage(_message("still here")))
    assert json.loads(await b.next_message())["content"] == "still here"
    with trio.fail_after(GUARD):
        while server.metrics.connections["multichat"] != 2:
            await trio.sleep(0.01)


async def test_bytes_that_are_not_tls_end_only_that_connection(chat, ca, tmp_path):
    server = await _start_wss(chat, ca, tmp_path)
    stream = await open_stream(server.port)
    await stream.send_all(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)) * 4)
    with trio.fail_after(GUARD):
        while True:
            try:
                if not await stream.receive_some(4096):
                    break
            except trio.BrokenResourceError:
                break
    a = await TlsClient.register(server.port, ca, "a")
    b = await TlsClient.register(server.port, ca, "b")
    await a.send(TextMessage(_message("after the garbage")))
    assert json.loads(await b.next_message())["content"] == "after the garbage"
