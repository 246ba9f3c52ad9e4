"""Behind a TCP proxy a client cannot pick its address (issue 19, item 5).

- With ``proxy-protocol`` the PROXY header alone names the client: one
  naming nobody (v1 UNKNOWN, v2 LOCAL / UNSPEC) leaves the proxy's own
  address, never ``X-Forwarded-For`` (which a TCP proxy passes on as the
  client wrote it).
- A PROXY header is read as the specification writes it: a v1 number in
  any other spelling (``+80``), a v2 TLV claiming more bytes than remain,
  a wrong CRC32C: the connection is dropped.
- The 16 KB request-head cap holds however the head is split.
"""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest
import trio
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.handshake import MAX_HEAD_BYTES, BadRequest, HeadReader
from chatd import proxy
from chatd.proxy import ProxyHeaderError, in_networks, parse_networks, parse_proxy_header
from tests.conftest import GUARD
from tests.rawws import open_stream
from tests.test_http import http, peer_of, register_raw, upgrade

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ADDRESSES = (ipaddress.ip_address("203.0.113.9").packed + ipaddress.ip_address("127.0.0.1").packed
             + struct.pack("!HH", 40000, 8765))


def v2(block: bytes, command: int = 0x21, family: int = 0x11) -> bytes:
    return SIGNATURE + bytes((command, family)) + struct.pack("!H", len(block)) + block


def with_crc(header: bytes, offset: int) -> bytes:
    """``header`` with the CRC32C at ``offset`` set right (section 2.2.5)."""
    value = crc32c(header[:offset] + bytes(4) + header[offset + 4:])
    return header[:offset] + struct.pack("!I", value) + header[offset + 4:]


# --- the address: the PROXY header alone --------------------------------------------


FORGED = "X-Forwarded-For: 198.51.100.66\r\nX-Real-IP: 198.51.100.67\r\n"


@pytest.mark.parametrize("header, seen", [
    (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", "127.0.0.1"),
    (v2(b"", command=0x20, family=0x00), "127.0.0.1"),  # LOCAL
    (v2(b"", family=0x00), "127.0.0.1"),  # PROXY, UNSPEC
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8765\r\n", "203.0.113.7:40000"),
])
async def test_behind_a_tcp_proxy_forwarded_headers_name_nobody(chat, caplog, header, seen):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    stream = await register_raw(server.port, FORGED, "hap", header)
    await stream.aclose()
    with trio.fail_after(GUARD):
        while not any("disconnected" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)  # the server logs the close in its own time
    assert (await peer_of(caplog, "hap")).startswith(seen)
    assert "198.51.100" not in caplog.text


async def test_forged_headers_after_proxy_unknown_do_not_escape_the_per_address_cap(chat):
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True,
                              limits_exempt=[], max_connections_per_ip=1)
    first = await register_raw(server.port, "X-Forwarded-For: 198.51.100.1\r\n", "a",
                               b"PROXY UNKNOWN\r\n")
    # Another forged address each time: still the proxy's one address.
    for n in range(2, 5):
        status, _, body = await http(server.port, b"PROXY UNKNOWN\r\n" + upgrade(
            extra=f"X-Forwarded-For: 198.51.100.{n}\r\n").encode())
        assert status == 429 and b"too many connections" in body
    await first.aclose()


# --- PROXY v1 as written -----------------------------------------------------------------


number_text = st.text(st.sampled_from("0123456789+- _x\u0668\u0660\uff18"), min_size=1,
                      max_size=7) | st.integers(-5, 70000).map(str)


def canonical_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and str(int(text)) == text and int(text) <= 65535


@settings(max_examples=400, deadline=None)
@given(number_text, number_text)
def test_a_v1_port_is_read_only_in_canonical_decimal(source, dest):
    line = f"PROXY TCP4 203.0.113.7 127.0.0.1 {source} {dest}\r\n".encode()
    if canonical_port(source) and canonical_port(dest):
        assert str(parse_proxy_header(line)) == f"203.0.113.7:{int(source)}"
    else:
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(line)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 203.0.113.7 127.0.0.1 +80 8765\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 080 8765\r\n",
    b"PROXY TCP4 203.0.113.07 127.0.0.1 80 8765\r\n",  # a leading zero: octal to some
    b"PROXY TCP4 203.0.113.7  127.0.0.1 80 8765\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 80 8765 \r\n",
    b"PROXY TCP4 2001:db8::1 127.0.0.1 80 8765\r\n",
    b"PROXY TCP6 203.0.113.7 ::1 80 8765\r\n",
    b"PROXY TCP6 2001:db8::1%eth0 ::1 80 8765\r\n",
    b"PROXY tcp4 203.0.113.7 127.0.0.1 80 8765\r\n",
    b"PROXY UNKNOWN\n\r\n",
])
def test_a_v1_line_not_as_the_specification_writes_it_is_refused(line):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line)


# --- PROXY v2: TLVs and CRC32C --------------------------------------------------------------


tlv = st.tuples(st.integers(0, 255).filter(lambda t: t not in (0x03, 0x20)),
                st.binary(max_size=20))


@settings(max_examples=400, deadline=None)
@given(st.lists(tlv, min_size=1, max_size=5), st.integers(0, 70000), st.sampled_from([0, 1, 2]))
def test_v2_tlvs_must_fill_the_header_exactly(tlvs, over, tail):
    """Well-formed TLVs are read; the last one claiming ``over`` bytes more
    than remain, or a TLV header cut short (``tail`` bytes), is refused."""
    if over:
        tail = 0  # (the bytes of a tail could be the ones claimed)
    block = ADDRESSES
    for index, (kind, value) in enumerate(tlvs):
        claimed = len(value) + (over if index == len(tlvs) - 1 else 0)
        block += struct.pack("!BH", kind, min(claimed, 0xFFFF)) + value
    block += b"\x04" * tail
    if over == 0 and tail == 0:
        assert str(parse_proxy_header(v2(block))) == "203.0.113.9:40000"
    else:
        with pytest.raises(ProxyHeaderError, match="claims|cut short"):
            parse_proxy_header(v2(block))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30), st.integers(0, 2**32 - 1), st.booleans())
def test_a_v2_crc32c_is_checked(extra, wrong, right):
    block = ADDRESSES + b"\x03\x00\x04" + bytes(4) + b"\xe0" + struct.pack("!H", len(extra)) + extra
    offset = 16 + len(ADDRESSES) + 3
    header = with_crc(v2(block), offset)
    if not right:
        value = struct.unpack("!I", header[offset:offset + 4])[0]
        if value == wrong:
            wrong ^= 1
        header = header[:offset] + struct.pack("!I", wrong) + header[offset + 4:]
        with pytest.raises(ProxyHeaderError, match="CRC32C"):
            parse_proxy_header(header)
    else:
        assert str(parse_proxy_header(header)) == "203.0.113.9:40000"


def test_a_v2_ssl_tlv_is_framed_too():
    inner = b"\x21\x00\x07TLSv1.3"
    ssl = b"\x20" + struct.pack("!H", 5 + len(inner)) + b"\x01" + bytes(4) + inner
    assert str(parse_proxy_header(v2(ADDRESSES + ssl))) == "203.0.113.9:40000"
    overlong = b"\x20" + struct.pack("!H", 5 + len(inner)) + b"\x01" + bytes(4) \
        + b"\x21\x00\x09TLSv1.3"
    with pytest.raises(ProxyHeaderError, match="claims 9 bytes"):
        parse_proxy_header(v2(ADDRESSES + overlong))


@pytest.mark.parametrize("header", [
    v2(ADDRESSES + b"\x04\x00\x09ab"),  # claims 9, 2 remain
    v2(ADDRESSES + b"\x03\x00\x04\x00\x00\x00\x01"),  # a wrong CRC32C
    v2(ADDRESSES, command=0x11),  # version 1 in a v2 header
    v2(ADDRESSES, command=0x22),  # an undefined command
    b"PROXY TCP4 203.0.113.7 127.0.0.1 +80 8765\r\n",
])
async def test_a_bad_proxy_header_drops_the_connection(chat, caplog, header):
    caplog.set_level(logging.INFO)
    server = await chat.start(trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    with trio.fail_after(GUARD):
        stream = await open_stream(server.port)
        await stream.send_all(header + upgrade().encode())
        assert await stream.receive_some(4096) == b""
    assert any("dropped: bad PROXY header" in r.getMessage() for r in caplog.records)


# --- the request head cap, however split -------------------------------------------------------


def head_of(size: int) -> bytes:
    """A GET whose head is exactly ``size`` bytes."""
    start, end = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


@settings(max_examples=300, deadline=None)
@given(st.integers(MAX_HEAD_BYTES - 64, 3 * MAX_HEAD_BYTES),
       st.lists(st.integers(1, 3 * MAX_HEAD_BYTES), max_size=6), st.binary(max_size=10))
def test_the_head_cap_holds_however_the_head_is_split(size, cuts, after):
    data = head_of(size) + after
    points = sorted({cut % len(data) for cut in cuts} - {0})
    reader = HeadReader()
    request = refused = None
    try:
        for a, b in zip([0, *points], [*points, len(data)]):
            request = reader.feed(data[a:b])
            if request is not None:
                break
    except BadRequest as exc:
        refused = exc.refusal
    if size <= MAX_HEAD_BYTES:
        assert request is not None and refused is None
    else:
        assert request is None and refused is not None and refused.status == 431


async def test_a_32_kb_head_in_two_reads_gets_431(chat):
    server = await chat.start()
    data = head_of(2 * MAX_HEAD_BYTES)
    with trio.fail_after(GUARD):
        stream = await open_stream(server.port)
        # chatd reads at most 16 KB at a time: this head takes two reads or more.
        await stream.send_all(data)
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert (await http(server.port, head_of(MAX_HEAD_BYTES)))[0] == 404  # the cap itself passes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.ip_addresses().map(str), st.sampled_from(
    ["::ffff:10.1.2.3", "::ffff:127.0.0.1", "not an address", "", "10.1.2.3%eth0"])),
    min_size=1, max_size=20))
def test_a_networks_answer_is_the_same_asked_once_or_again(ips):
    # Answers are kept per address text (chatd.proxy.Networks): asked again,
    # every address gets what the networks themselves say.
    networks = parse_networks(["10.0.0.0/8", "127.0.0.0/8", "::1/128", "2001:db8::/32"])
    for _ in range(2):
        for ip in ips:
            assert in_networks(ip, networks) is in_networks(ip, tuple(networks))
    assert in_networks("::ffff:10.9.9.9", networks) and not in_networks("11.0.0.1", networks)


def test_the_kept_answers_stay_bounded(monkeypatch):
    monkeypatch.setattr(proxy, "CACHED_ADDRESSES", 100)
    networks = parse_networks(["10.0.0.0/8"])
    for n in range(1000):
        assert in_networks(f"10.0.{n // 256}.{n % 256}", networks)
        assert len(networks.answers) <= 100
    assert not in_networks("192.0.2.1", networks)
