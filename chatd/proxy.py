"""The real client address behind a reverse proxy.

Only a peer listed in ``trusted-proxies`` may say who the client is; for
any other peer the headers below are ignored (a client cannot forge its
address past the limits):

- the PROXY protocol header (HAProxy's v1 text line or v2 binary header,
  as HAProxy and nginx ``stream`` send it) when ``proxy-protocol`` is on;
  parsed by the ``proxy-protocol`` library, framed and checked here
  against the PROXY protocol specification (haproxy's
  doc/proxy-protocol.txt): v1 up to CRLF, at most 107 bytes, single
  spaces, addresses and ports in canonical decimal (no sign, no leading
  zero, no other digits: ``+80`` and ``080`` are refused); v2 16 bytes
  plus the length in bytes 15-16, version 2, a defined command and
  family, an address block as long as its family needs, TLVs that fill
  the rest exactly (one claiming more bytes than remain is refused, also
  inside ``PP2_TYPE_SSL``), and a ``PP2_TYPE_CRC32C`` that matches
  (section 2.2.5: CRC32C of the whole header, its own value zeroed).
  With the PROXY protocol the proxy is a TCP one and passes HTTP headers
  on as the client wrote them: the header alone names the client, and
  one that names none (v1 ``UNKNOWN``, v2 ``LOCAL`` or ``UNSPEC``) leaves
  the proxy's own address;
- without it, ``X-Forwarded-For``: the right-most address that is not
  itself a trusted proxy (each proxy appends the address it saw, so
  everything to the left of that could be the client's own invention);
- ``X-Real-IP``, when there is no ``X-Forwarded-For``.

Sans-IO: bytes and header values in, addresses out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from crc32c import crc32c
from proxyprotocol.result import ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_SIGNATURE = b"PROXY "
_V1_MAX = 107  # the longest v1 line, CRLF included (the PROXY protocol spec, 2.1)
_v1 = ProxyProtocolV1()
_v2 = ProxyProtocolV2()
#: v2 address family and protocol bytes the spec defines (section 2.2):
#: UNSPEC, and TCP or UDP over INET, INET6 and UNIX.
_V2_FAMILIES = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}
#: Address block bytes per v2 address family (high nibble; section 2.2).
_V2_ADDRESS_BYTES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_PP2_TYPE_CRC32C, _PP2_TYPE_SSL = 0x03, 0x20
#: v1 (section 2.1): IPv4 as four decimal numbers 0-255 without leading
#: zeros, IPv6 in hex digits and colons (checked by ipaddress after), ports
#: decimal 0-65535 without leading zeros; single spaces; CRLF.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = rb"(?:" + _OCTET + rb"\.){3}" + _OCTET
_PORT_TEXT = rb"(?:0|[1-9][0-9]{0,4})"
_V1_LINE = re.compile(
    rb"PROXY (?:UNKNOWN(?: [^\r\n]*)?"
    rb"|TCP4 (" + _IPV4 + rb") (" + _IPV4 + rb") (" + _PORT_TEXT + rb") (" + _PORT_TEXT + rb")"
    rb"|TCP6 ([0-9A-Fa-f:.]{2,45}) ([0-9A-Fa-f:.]{2,45}) (" + _PORT_TEXT + rb") ("
    + _PORT_TEXT + rb"))\r\n")


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class Address:
    """A client address: ``ip`` as text, ``port`` or None if unknown."""

    ip: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return host if self.port is None else f"{host}:{self.port}"


class Networks(tuple):
    """The networks of a config list (``trusted-proxies``,
    ``limits-exempt``): a tuple of ``IPv4Network``/``IPv6Network`` that
    remembers which addresses it holds (``answers``, by address text).
    Parsing an address and testing it against each network costs a few
    µs, and chatd asks several times per connection (``in_networks``); the
    answers for up to ``CACHED_ADDRESSES`` address texts are kept (all
    forgotten at once when full). The networks never change, so a kept
    answer is always right."""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.answers: dict[str, bool] = {}


#: Most address texts whose answer a ``Networks`` keeps (``in_networks``).
CACHED_ADDRESSES = 4096


def parse_networks(cidrs: Iterable[str]) -> Networks:
    return Networks(ipaddress.ip_network(c, strict=False) for c in cidrs)


def in_networks(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """True if ``ip`` (text) lies in one of ``networks``; False if it is not an IP.
    An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) is tested as its IPv4 one."""
    if not networks:
        return False
    answers = networks.answers if type(networks) is Networks else None
    if answers is not None:
        known = answers.get(ip)
        if known is not None:
            return known
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        member = False
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        member = any(address in network for network in networks)
    if answers is not None:
        if len(answers) >= CACHED_ADDRESSES:
            answers.clear()
        answers[ip] = member
    return member


def proxy_header_length(data: bytes) -> int | None:
    """How many bytes the PROXY header at the start of ``data`` takes, or
    None if more bytes are needed to tell. Raises ProxyHeaderError if the
    data cannot start with one."""
    if data[:len(_V2_SIGNATURE)] == _V2_SIGNATURE[:len(data)] and len(data) < 16:
        return None
    if data.startswith(_V2_SIGNATURE):
        return 16 + int.from_bytes(data[14:16], "big")
    if data[:len(_V1_SIGNATURE)] == _V1_SIGNATURE[:len(data)] and len(data) < len(_V1_SIGNATURE):
        return None
    if data.startswith(_V1_SIGNATURE):
        end = data.find(b"\r\n", 0, _V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    raise ProxyHeaderError("no PROXY protocol header")


def parse_proxy_header(header: bytes) -> Address | None:
    """The client address a complete PROXY header names; None for v2 LOCAL
    or v1 UNKNOWN (a health check by the proxy itself: use the peer)."""
    v2 = header.startswith(_V2_SIGNATURE)
    if v2:
        if _check_v2(header):
            return None  # LOCAL: the proxy speaking for itself
    else:
        _check_v1(header)
    try:
        result = (_v2 if v2 else _v1).unpack(header)
    except Exception as exc:  # the library's errors, and struct's on short blocks
        raise ProxyHeaderError(f"bad PROXY header: {exc}") from None
    if isinstance(result, ProxyResultLocal) or not result.proxied:
        return None
    peer = result.peername
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None  # UNKNOWN or a unix socket: nothing to say
    ip = _plain_ip(str(peer[0]))
    return Address(ip, int(peer[1])) if ip is not None else None


def _check_v1(header: bytes) -> None:
    """Raise ProxyHeaderError unless ``header`` is a v1 line as section 2.1
    writes it (the library would read ``+80``, `` 80`` or ``٨٠`` as 80)."""
    match = _V1_LINE.fullmatch(header)
    if match is None:
        raise ProxyHeaderError(f"bad PROXY header: not a PROXY v1 line: {header[:60]!r}")
    ports = match.group(3, 4) if match.group(1) else match.group(7, 8)
    if any(port is not None and int(port) > 65535 for port in ports):
        raise ProxyHeaderError("bad PROXY header: a port over 65535")
    for text in match.group(5, 6):
        if text is not None:
            try:
                ipaddress.IPv6Address(text.decode("ascii"))
            except ValueError:
                raise ProxyHeaderError(f"bad PROXY header: {text[:45]!r} is not an IPv6 address") \
                    from None


def _check_v2(header: bytes) -> bool:
    """Raise ProxyHeaderError unless ``header`` (complete) is a v2 header as
    section 2.2 writes it; True if it is a LOCAL one (whose address block
    the receiver ignores)."""
    command, family = header[12], header[13]
    if command >> 4 != 2:
        raise ProxyHeaderError(f"bad PROXY header: version {command >> 4}, not 2")
    if command & 0xF not in (0, 1):
        raise ProxyHeaderError(f"bad PROXY header: unknown command {command & 0xF:#x}")
    if command & 0xF == 0:
        return True
    if family not in _V2_FAMILIES:
        raise ProxyHeaderError(f"bad PROXY header: unknown address family {family:#04x}")
    start = 16 + _V2_ADDRESS_BYTES[family >> 4]
    if len(header) < start:
        raise ProxyHeaderError("bad PROXY header: the address block is shorter than its family's")
    for kind, offset, length in _tlvs(header, start, len(header)):
        if kind == _PP2_TYPE_SSL:
            if length < 5:
                raise ProxyHeaderError("bad PROXY header: PP2_TYPE_SSL shorter than 5 bytes")
            for _ in _tlvs(header, offset + 5, offset + length):
                pass
        elif kind == _PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyHeaderError("bad PROXY header: PP2_TYPE_CRC32C is not 4 bytes")
            zeroed = header[:offset] + bytes(4) + header[offset + 4:]
            if crc32c(zeroed) != int.from_bytes(header[offset:offset + 4], "big"):
                raise ProxyHeaderError("bad PROXY header: its CRC32C does not match")
    return False


def _tlvs(data: bytes, start: int, end: int):
    """(type, value offset, value length) of each TLV in ``data[start:end]``;
    ProxyHeaderError if they do not fill it exactly (section 2.2.7)."""
    while start < end:
        if end - start < 3:
            raise ProxyHeaderError("bad PROXY header: a TLV cut short")
        kind, length = data[start], int.from_bytes(data[start + 1:start + 3], "big")
        if start + 3 + length > end:
            raise ProxyHeaderError(f"bad PROXY header: TLV {kind:#04x} claims {length} bytes, "
                                   f"{end - start - 3} remain")
        yield kind, start + 3, length
        start += 3 + length


def forwarded_address(forwarded_for: list[str], real_ip: str | None,
                      trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client IP named by ``X-Forwarded-For`` values (every header's,
    in order) or else ``X-Real-IP``; None if neither names a valid one.

    The right-most entry that is not a trusted proxy is the client: every
    entry left of it may be the client's own invention.
    """
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        ip = _plain_ip(hop)
        if ip is None:
            return None  # garbage where an address should be: trust none of it
        if not in_networks(ip, trusted):
            return ip
    if hops:
        return _plain_ip(hops[0])  # every hop is a trusted proxy: the first one
    if real_ip:
        return _plain_ip(real_ip.strip())
    return None


def _plain_ip(text: str) -> str | None:
    """An address as a proxy may write it ("1.2.3.4", "[::1]", "1.2.3.4:5"),
    normalised; None if it is not one."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return normal_ip(text)


def normal_ip(text: str) -> str | None:
    """One spelling per address, so a client counts once whatever its proxy
    wrote: IPv4-mapped IPv6 as IPv4, no IPv6 zone (``fe80::1%0``); None if
    ``text`` is not an address."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)
