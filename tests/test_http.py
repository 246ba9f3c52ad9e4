"""The HTTP side of the listener: handshakes checked field by field, plain
GETs (health, readiness, metrics), routing, and who the client is behind
a proxy. Raw TCP, so every byte of the request is the test's choice."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from chatd.config import Config
from tests.conftest import GUARD, SECRET
from tests.rawws import open_stream

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's sample key


async def http(port: int, request: bytes | str) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; (status, headers, body) of the answer."""
    if isinstance(request, str):
        request = request.encode()
    with trio.fail_after(GUARD):
        stream = await open_stream(port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 101"):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def upgrade(path: str = "/multichat", *, host: str = "127.0.0.1", key: str = KEY,
            version: str = "13", method: str = "GET", extra: str = "",
            connection: str = "Upgrade") -> str:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: {connection}\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n")


def get(path: str, extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n"


# --- the opening handshake (RFC 6455 section 4.2.1) ---------------------------


@pytest.mark.parametrize("request_, status, reason", [
    (upgrade(key="x"), 400, "Sec-WebSocket-Key must be 16 bytes in base64"),
    (upgrade(key="dG9vIHNob3J0"), 400, "Sec-WebSocket-Key must be 16 bytes in base64"),
    (upgrade(key="!!!!notbase64!!!!!!!!!=="), 400, "Sec-WebSocket-Key"),
    (upgrade(key=KEY, extra=f"Sec-WebSocket-Key: {KEY}\r\n"), 400, "Sec-WebSocket-Key"),
    (upgrade(version="8"), 426, "version 13"),
    (upgrade(version=""), 426, "version 13"),
    (upgrade(method="POST"), 405, "GET"),
    (upgrade(connection="keep-alive"), 400, "Connection: Upgrade"),
    (upgrade().replace("HTTP/1.1", "HTTP/1.0"), 400, "HTTP/1.1"),
    ("GET /multichat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400,
     "Host"),
    ("\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "malformed HTTP request"),
    ("GET /multichat HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed HTTP request"),
    ("GET / HTTP/1.1\r\nHost: x\r\n" + "X-Long: " + "a" * 40_000 + "\r\n\r\n", 431, "malformed"),
    # A GET handshake has no body (RFC 6455 section 4.1): bytes after the
    # head would be read as frames.
    (upgrade(extra="Content-Length: 5\r\n") + "hello", 400, "has no body"),
    (upgrade(extra="Transfer-Encoding: chunked\r\n") + "5\r\nhello\r\n0\r\n\r\n", 400,
     "has no body"),
    (upgrade(extra="Sec-WebSocket-Version: 13\r\n"), 400, "Sec-WebSocket-Version must be sent once"),
    # Not an upgrade, but a method an endpoint does not take.
    ("POST /wcp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "GET only"),
])
async def test_a_malformed_handshake_gets_a_4xx_with_a_reason_and_one_info_line(
        chat, caplog, request_, status, reason):
    server = await chat.start()
    caplog.set_level(logging.INFO)
    got, headers, body = await http(server.port, request_)
    assert got == status
    assert reason in body.decode()
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    lines = [r for r in caplog.records if f"refused with {status}" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert server.metrics.refused[status] == 1


SECRET_TEXT = "sk-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("line", [
    f"Authorization: Bearer {SECRET_TEXT}\x00",
    f"Authorization : Bearer {SECRET_TEXT}",
    f"X-API-Key: {SECRET_TEXT}\x00tail",
    f"Cookie {SECRET_TEXT}",
    f"Bad Header: {SECRET_TEXT}",
])
@pytest.mark.parametrize("path", ["/api/info", "/wcp"])
async def test_a_malformed_header_line_is_named_but_never_quoted(chat, caplog, line, path):
    """h11's error text quotes the illegal header line, and the log line and
    the 400 quoted it: an API key or any credential sent with one bad byte
    (or a space before the colon) was written to the log."""
    from tests.api_helpers import KEY

    server = await chat.start(api_key=KEY)
    caplog.set_level(logging.DEBUG)
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{line}\r\n"
               "Content-Length: 2\r\n\r\n{}")
    got, _, body = await http(server.port, request)
    assert got == 400 and "malformed HTTP request" in body.decode()
    assert SECRET_TEXT[:8] not in body.decode()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused with 400" in logged
    assert SECRET_TEXT[:8] not in logged, logged


@pytest.mark.parametrize("host", ["xn--", "xn--zz", "..", "a" * 300, "[::1]:8765", "", "h:"])
async def test_a_host_that_is_not_idna_is_just_text(chat, caplog, host):
    # A Host that is not valid IDNA once made the old server drop the socket
    # after 35 lines of traceback. Any host[:port] is fine (RFC 3986).
    server = await chat.start()
    status, headers, _ = await http(server.port, upgrade(host=host))
    assert status == 101
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("host", ["ex ample", "a b", "[::1", "[::1]x", "127.0.0.1:99999",
                                  "caf\u00e9", "a:b:c", "host:port", "h:" + "9" * 5000])
async def test_a_malformed_host_gets_400(chat, caplog, host):
    # RFC 9112 section 3.2: 400 for a Host with an invalid value.
    server = await chat.start()
    status, _, body = await http(server.port, upgrade(host=host).encode("latin-1"))
    assert status == 400 and b"is not host[:port]" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("target", ["http://[::1/multichat", "http:///multichat",
                                    "ftp://x/multichat", "http://a:bad/multichat",
                                    "http://u@x/multichat", "multichat", "*"])
async def test_a_malformed_request_target_gets_400(chat, caplog, target):
    server = await chat.start()
    status, _, body = await http(server.port, upgrade(target))
    assert status == 400 and (b"bad request target" in body or b"malformed" in body), body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_valid_handshake_gets_the_rfc_accept_value(chat):
    server = await chat.start()
    status, headers, _ = await http(server.port, upgrade())
    assert status == 101
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3


async def test_a_plain_get_on_a_websocket_endpoint_says_upgrade_required(chat):
    server = await chat.start()
    status, headers, body = await http(server.port, get("/wcp"))
    assert status == 426 and headers["upgrade"] == "websocket"
    assert b"WebSocket endpoint" in body


@pytest.mark.parametrize("target", ["http://127.0.0.1/multichat", "http://chat.example:8080/multichat?x=1"])
async def test_an_absolute_form_target_is_routed_by_its_path(chat, target):
    # RFC 9112 section 3.2.2: a server must accept the absolute form, which
    # some forward proxies send on.
    server = await chat.start()
    status, _, _ = await http(server.port, upgrade(target))
    assert status == 101
    status, _, body = await http(server.port, get("http://127.0.0.1/healthz"))
    assert status == 200


@pytest.mark.parametrize("target, path", [
    # Only a target not starting with "/" is absolute-form; its path ends
    # at "?" (found by a review: both were routed to another endpoint).
    ("/nosuch/http://x", "/nosuch/http://x"),
    ("http://127.0.0.1?next=/gradagenda", "/"),
    ("http://h/wcp?x=1/2", "/wcp"),
    ("/multichat?back=http://x/gradagenda", "/multichat"),
])
def test_a_target_is_routed_by_its_path_alone(target, path):
    from chatd.handshake import HttpRequest
    assert HttpRequest("GET", target, "1.1").path == path


async def test_an_http2_preface_is_told_http2_is_not_spoken(chat, caplog):
    server = await chat.start()
    status, _, body = await http(server.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert status == 505 and b"HTTP/1.1" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_path_containing_a_uri_is_not_read_as_one(chat):
    server = await chat.start()
    assert (await http(server.port, upgrade("/nosuch/http://x")))[0] == 404


async def test_a_post_to_a_websocket_endpoint_says_which_method(chat):
    server = await chat.start()
    status, headers, body = await http(
        server.port, "POST /multichat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert status == 405 and headers["allow"] == "GET"


async def test_an_unknown_path_gets_404_for_plain_get_and_for_upgrade(chat):
    server = await chat.start()
    assert (await http(server.port, get("/nope")))[0] == 404
    status, _, body = await http(server.port, upgrade("/nope"))
    assert status == 404 and b"no chat endpoint" in body


# --- ws-path as the original multichat server matched it -------------------------


@pytest.mark.parametrize("ws_path, path, served", [
    ("/", "/", True), ("/", "/chat/", True), ("/", "/anything/at/all", True),
    ("/chat/", "/chat/", True), ("/chat/", "/chat/room", True), ("/chat/", "/other", False),
    ("/chat", "/chat", True), ("/chat", "/chat/", False),
])
async def test_ws_path_matches_as_go_servemux_does(chat, ws_path, path, served):
    # A config without endpoints, as written for the original Go server:
    # a pattern ending in "/" is a subtree (Go's net/http ServeMux).
    await chat.start(Config(secret_key=SECRET, ws_path=ws_path))
    status, _, _ = await http(chat.server.port, upgrade(path))
    assert status == (101 if served else 404)


# --- health, readiness, metrics ---------------------------------------------------


async def test_healthz_readyz_and_404_for_other_plain_gets(chat):
    server = await chat.start()
    assert (await http(server.port, get("/healthz")))[:3:2] == (200, b"ok\n")
    assert (await http(server.port, get("/readyz")))[:3:2] == (200, b"ready\n")
    status, _, body = await http(server.port, get("/favicon.ico"))
    assert status == 404 and body == b"not found\n"
    status, headers, body = await http(server.port, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and body == b"" and headers["content-length"] == "3"
    status, headers, _ = await http(server.port, "POST /healthz HTTP/1.1\r\nHost: x\r\n"
                                                 "Content-Length: 0\r\n\r\n")
    assert status == 405 and "GET" in headers["allow"]


async def test_readyz_says_why_when_the_store_has_failed(chat, caplog):
    from tests.test_gradagenda import direct, login, message
    server = await chat.start()
    alice = await login(chat, "alice")
    session_id = (await direct(alice, "bob"))["session-id"]
    server.store.db.execute("PRAGMA query_only=ON")  # the database stops taking writes
    await alice.send(message(session_id, "lost?", cdid="m1"))
    assert (await alice.recv())["status"] == "failed"
    status, _, body = await http(server.port, get("/readyz"))
    assert status == 503 and body.startswith(b"not ready: store")
    caplog.clear()  # the store's logged cause is expected here


async def test_metrics_count_connections_messages_deliveries_refusals_and_closes(chat):
    server = await chat.start()
    a = await chat.multichat("a")
    b = await chat.multichat("b")
    await a.send({"action": "client-message", "content": "hi"})
    assert (await b.recv())["content"] == "hi"
    await http(server.port, upgrade(key="x"))
    await a.close()
    with trio.fail_after(GUARD):
        while server.metrics.closes[1000] < 1:
            await trio.sleep(0.01)  # the server records the close in its own time
    status, headers, body = await http(server.port, get("/metrics"))
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'chatd_connections{protocol="multichat"} 1.0' in text
    assert 'chatd_messages_received_total{protocol="multichat"} 3.0' in text  # 2 registers, 1 message
    assert 'chatd_deliveries_total{protocol="multichat"}' in text
    assert 'chatd_handshakes_refused_total{status="400"} 1.0' in text
    assert 'chatd_closes_total{code="1000"} 1.0' in text
    assert "chatd_router_queue_depth" in text
    assert "chatd_store_commit_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text


async def test_metrics_time_every_store_commit(chat):
    from tests.test_gradagenda import direct, login, message

    server = await chat.start()
    alice = await login(chat, "alice")
    session_id = (await direct(alice, "bob"))["session-id"]
    await alice.send(message(session_id, "timed", cdid="m1"))
    assert (await alice.recv())["cdid"] == "m1"
    _, _, body = await http(server.port, get("/metrics"))
    count = next(float(line.split()[-1]) for line in body.decode().splitlines()
                 if line.startswith("chatd_store_commit_seconds_count"))
    # The direct session's creation and the message: each committed, each timed.
    assert count >= 2


async def test_admin_host_moves_health_and_metrics_off_the_public_port(chat):
    server = await chat.start(admin_host="127.0.0.1:0")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http(server.port, get(path)))[0] == 404
        assert (await http(server.admin_ports[0], get(path)))[0] == 200
    # The admin listener speaks no WebSocket.
    assert (await http(server.admin_ports[0], upgrade()))[0] == 404


# --- behind a reverse proxy ----------------------------------------------------------


async def peer_of(caplog, name: str) -> str:
    for record in caplog.records:
        message = record.getMessage()
        if f"({name})" in message and "disconnected" in message or \
                f"authenticated on /multichat as {name}" in message:
            return message.split()[0]
    raise AssertionError(f"no log line for {name}")


async def register_raw(port: int, extra: str, name: str, header: bytes = b"") -> trio.SocketStream:
    from tests.rawws import text
    stream = await open_stream(port)
    await stream.send_all(header + upgrade(extra=extra).encode())
    data = b""
    with trio.fail_after(GUARD):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
    assert data.startswith(b"HTTP/1.1 101"), data
    await stream.send_all(text(json.dumps({"action": "register", "client-name": name,
                                           "secret-key": SECRET})))
    with trio.fail_after(GUARD):
        assert b"register-ack" in await stream.receive_some(4096)
    return stream


@pytest.mark.parametrize("trusted, extra, seen", [
    (["127.0.0.1"], "X-Forwarded-For: 203.0.113.7\r\n", "203.0.113.7"),
    (["127.0.0.0/8"], "X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n", "203.0.113.7"),
    # Right-most untrusted: a client cannot pick its address by prepending one.
    (["127.0.0.1", "10.0.0.0/8"], "X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.1.2.3\r\n",
     "203.0.113.7"),
    (["127.0.0.1"], "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.9\r\n",
     "198.51.100.9"),
    (["127.0.0.1"], "X-Real-IP: 2001:db8::1\r\n", "[2001:db8::1]"),
    # An untrusted peer's headers are ignored.
    ([], "X-Forwarded-For: 203.0.113.7\r\n", "127.0.0.1"),
    (["10.0.0.0/8"], "X-Real-IP: 203.0.113.7\r\n", "127.0.0.1"),
    # Garbage where an address should be: trusted, but names nobody.
    (["127.0.0.1"], "X-Forwarded-For: not-an-address\r\n", "127.0.0.1"),
])
async def test_the_client_address_comes_from_trusted_proxies_only(chat, caplog, trusted, extra,
                                                                   seen):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=trusted)
    stream = await register_raw(server.port, extra, "bridge")
    await stream.aclose()
    with trio.fail_after(GUARD):
        while not any("disconnected" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)  # the server logs the close in its own time
    assert (await peer_of(caplog, "bridge")).startswith(seen)


async def test_limits_apply_to_the_forwarded_address(chat):
    server = await chat.start(trusted_proxies=["127.0.0.1"], max_connections_per_ip=1)
    first = await register_raw(server.port, "X-Forwarded-For: 203.0.113.7\r\n", "a")
    second = await register_raw(server.port, "X-Forwarded-For: 203.0.113.8\r\n", "b")
    status, _, body = await http(server.port, upgrade(extra="X-Forwarded-For: 203.0.113.7\r\n"))
    assert status == 429 and b"too many connections" in body
    await first.aclose()
    await second.aclose()


def proxy_v2(src: str, sport: int) -> bytes:
    import ipaddress
    import struct
    addresses = (ipaddress.ip_address(src).packed + ipaddress.ip_address("127.0.0.1").packed
                 + struct.pack("!HH", sport, 8765))
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, 0x11)) + struct.pack("!H", len(addresses)) \
        + addresses


@pytest.mark.parametrize("spellings", [
    # One client, however its proxy writes the address (RFC 4291 section
    # 2.5.5.2's IPv4-mapped form, RFC 6874's zone), counts once.
    ["203.0.113.7", "::ffff:203.0.113.7"],
    ["203.0.113.7", "[::ffff:203.0.113.7]:5555"],
    ["2001:db8::7", "2001:DB8:0:0::7"],
    ["fe80::1", "fe80::1%eth0"],
])
async def test_one_client_counts_once_whatever_the_spelling(chat, spellings):
    server = await chat.start(trusted_proxies=["127.0.0.1"], max_connections_per_ip=1)
    first = await register_raw(server.port, f"X-Forwarded-For: {spellings[0]}\r\n", "a")
    status, _, body = await http(server.port,
                                 upgrade(extra=f"X-Forwarded-For: {spellings[1]}\r\n"))
    assert status == 429 and b"too many connections" in body
    await first.aclose()


@pytest.mark.parametrize("extra", ["", "X-Forwarded-For: not-an-address\r\n",
                                   "X-Real-IP: 999.1.1.1\r\n"])
async def test_a_proxied_request_naming_nobody_counts_against_the_proxy(chat, extra):
    # Otherwise a client behind a trusted proxy could escape every
    # per-address limit by sending garbage where its address goes.
    server = await chat.start(trusted_proxies=["127.0.0.1"], limits_exempt=[],
                              max_connections_per_ip=1)
    first = await register_raw(server.port, "", "a")
    status, _, body = await http(server.port, upgrade(extra=extra))
    assert status == 429 and b"too many connections" in body
    await first.aclose()


@pytest.mark.parametrize("header, seen", [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8765\r\n", "203.0.113.7:40000"),
    (b"PROXY TCP6 2001:db8::7 ::1 40001 8765\r\n", "[2001:db8::7]:40001"),
    (proxy_v2("203.0.113.9", 40002), "203.0.113.9:40002"),
    (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
])
async def test_the_proxy_protocol_names_the_client(chat, caplog, header, seen):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    stream = await register_raw(server.port, "", "hap", header)
    await stream.aclose()
    with trio.fail_after(GUARD):
        while not any("disconnected" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)  # the server logs the close in its own time
    assert (await peer_of(caplog, "hap")).startswith(seen)


def proxy_v2_block(family: int, block: bytes) -> bytes:
    import struct
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, family)) + struct.pack("!H", len(block)) \
        + block


@pytest.mark.parametrize("header", [
    b"", b"PROXY TCP4 1.2.3.4\r\n", b"PROXY " + b"x" * 200,
    # v2 whose address block is shorter than its family needs, or whose
    # family the spec does not define (section 2.2).
    proxy_v2_block(0x11, b"\x01\x02\x03"),
    proxy_v2_block(0x21, bytes(12)),
    proxy_v2_block(0x41, bytes(12)),
    proxy_v2_block(0xF1, bytes(36)),
])
async def test_a_missing_or_bad_proxy_header_drops_the_connection(chat, caplog, header):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    with trio.fail_after(GUARD):
        stream = await open_stream(server.port)
        await stream.send_all(header + upgrade().encode())
        assert await stream.receive_some(4096) == b""
    assert any("dropped" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- logs for shippers -----------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_connection_fields():
    import io

    from chatd.logs import configure
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        logging.getLogger("chatd.connection").info(
            "%s disconnected from %s", "203.0.113.7:4", "/wcp",
            extra={"peer": "203.0.113.7:4", "path": "/wcp", "code": 1000})
        logging.getLogger("chatd").warning("plain line with \"quotes\"\nand a newline")
    finally:
        logging.getLogger().handlers.clear()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "chatd.connection"
    assert first["message"] == "203.0.113.7:4 disconnected from /wcp"
    assert (first["peer"], first["path"], first["code"]) == ("203.0.113.7:4", "/wcp", 1000)
    assert first["time"].endswith("Z") and "T" in first["time"]
    # A line break is escaped: one record, one line (chatd.logs).
    assert second["message"] == "plain line with \"quotes\"\\nand a newline"
