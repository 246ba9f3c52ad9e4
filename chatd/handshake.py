"""The HTTP/1.1 side of a connection: the opening handshake and plain GETs.

Sans-IO. ``h11`` parses the request head; this module decides what it is
and builds the answer:

- a WebSocket upgrade (RFC 6455 section 4.2.1): checked field by field,
  each failure a 4xx with a reason in the body — 400 for a malformed
  request (Connection, Upgrade or a ``Sec-WebSocket-Key`` that is not 16
  bytes of base64), 405 for a method other than GET, 426 with
  ``Sec-WebSocket-Version: 13`` for another version (section 4.4) —
  else the 101 answer with ``Sec-WebSocket-Accept`` (section 4.2.2);
- anything else is a plain HTTP request, answered once and closed
  (``Connection: close``): the server decides the route.

Responses are written here rather than with h11, because a request h11
could not parse still gets its 400.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

#: RFC 6455 section 1.3: appended to the key before hashing.
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Longest request head (request line and headers) read, in bytes.
MAX_HEAD_BYTES = 16 * 1024


@dataclass(slots=True)
class HttpRequest:
    """A parsed request head. Header names are lower-case; values text."""

    method: str
    target: str
    http_version: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The target's path: origin-form as sent, absolute-form
        (``http://host/path``, RFC 9112 section 3.2.2) reduced to its path."""
        target = self.target.partition("#")[0].partition("?")[0]
        if target.startswith("/"):
            return target
        # Absolute-form: the authority ends at the first "/"; no path is "/".
        rest = target.partition("://")[2]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"

    def header(self, name: str) -> str | None:
        """The header's values joined with ", " (RFC 9110 section 5.3), or None."""
        values = self.headers.get(name)
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header's tokens, lower-cased."""
        value = self.header(name) or ""
        return {token.strip().lower() for token in value.split(",") if token.strip()}

    @property
    def wants_websocket(self) -> bool:
        """True if the client asks to upgrade to a WebSocket."""
        return "websocket" in self.tokens("upgrade") or "sec-websocket-key" in self.headers


def request_from_h11(event: h11.Request) -> HttpRequest:
    headers: dict[str, list[str]] = {}
    for name, value in event.headers:
        headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    return HttpRequest(event.method.decode("latin-1"), event.target.decode("latin-1"),
                   event.http_version.decode("latin-1"), headers)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A handshake answered with an HTTP error: ``status`` and a one-line reason."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


#: RFC 3986 section 3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims ).
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_PORT = re.compile(r"[0-9]*")


def check_request(request: HttpRequest) -> Refusal | None:
    """Why this request's target or ``Host`` is malformed, or None.

    RFC 9112 section 3.2: a server must answer 400 to a ``Host`` whose
    value is not ``host [":" port]`` (RFC 3986 section 3.2.2: an IP
    literal in brackets, an IPv4 address or a reg-name); the target is
    origin-form (``/path``) or absolute-form with an ``http``/``https``
    (or ``ws``/``wss``) URI naming a host (section 3.2.2; RFC 9110 section
    4.2.1 forbids an empty host). A ``Host`` that is valid but not IDNA is
    just text. HTTP/2's prior-knowledge preface (``PRI * HTTP/2.0``, RFC
    9113 section 3.4) gets 505: chatd speaks HTTP/1.1 only."""
    if not request.http_version.startswith("1."):
        return Refusal(505, f"HTTP/{request.http_version} is not supported: chatd speaks "
                            "HTTP/1.1 (a WebSocket handshake is HTTP/1.1, RFC 6455 section 4.1)")
    hosts = request.headers.get("host", [])
    if len(hosts) > 1:
        return Refusal(400, "Host must be sent once")
    if hosts and hosts[0] and not _valid_authority(hosts[0]):
        return Refusal(400, f"Host {hosts[0][:80]!r} is not host[:port] (RFC 3986 section 3.2.2)")
    target = request.target
    if target.startswith("/"):
        return None
    scheme, sep, rest = target.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if not sep or scheme.lower() not in ("http", "https", "ws", "wss") or not authority \
            or "@" in authority or not _valid_authority(authority):
        return Refusal(400, f"bad request target {target[:80]!r}: an absolute path or an "
                            "http:// URI with a host")
    return None


def _valid_authority(text: str) -> bool:
    """``host [":" port]`` with a non-empty host and a port up to 65535."""
    if text.startswith("["):
        literal, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return False
        try:
            ipaddress.IPv6Address(literal.split("%25", 1)[0])  # a zone is %25 in a URI
        except ValueError:
            return False
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
        if not host or _REG_NAME.fullmatch(host) is None:
            return False
    return _PORT.fullmatch(port) is not None and len(port) <= 5 and (not port or int(port) <= 65535)


def check_upgrade(request: HttpRequest) -> Refusal | None:
    """Why this upgrade request breaks RFC 6455 section 4.2.1, or None."""
    if request.method != "GET":
        return Refusal(405, "a WebSocket handshake must be a GET request", (("Allow", "GET"),))
    if request.http_version not in ("1.1",):
        return Refusal(400, "a WebSocket handshake needs HTTP/1.1")
    if "websocket" not in request.tokens("upgrade"):
        return Refusal(400, "Upgrade: websocket is missing")
    if "upgrade" not in request.tokens("connection"):
        return Refusal(400, "Connection: Upgrade is missing")
    if "transfer-encoding" in request.headers or request.header("content-length") not in (None, "0"):
        # A GET handshake has no body: bytes after the head are frames.
        return Refusal(400, "a WebSocket handshake has no body")
    key = request.headers.get("sec-websocket-key", [])
    if len(key) != 1 or not _valid_key(key[0]):
        return Refusal(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    if len(request.headers.get("sec-websocket-version", [])) > 1:
        return Refusal(400, "Sec-WebSocket-Version must be sent once")
    if request.header("sec-websocket-version") != "13":
        return Refusal(426, "only WebSocket version 13 is supported",
                       (("Sec-WebSocket-Version", "13"),))
    return None


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip().encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


class Route(enum.Enum):
    """Where ``decide`` sends a request that passed its checks."""

    API = "api"          # the server API (chatd.api)
    MEDIA = "media"      # GradAgenda images and voice clips (chatd.media)
    PAGE = "page"        # /healthz, /metrics, the web client (chatd.http)
    UPGRADE = "upgrade"  # accepted: 101, then a WebSocket connection


def decide(request: HttpRequest, *, endpoint: str | None, api: bool = False,
           media: bool = False, origin_allowed: bool = True,
           banned: str | None = None) -> Refusal | Route:
    """What a request read on the main listener gets: a ``Refusal`` or a
    ``Route``. In order: a malformed target or ``Host``: 400
    (``check_request``); a path the server API serves (``api``) or media
    (``media``); a plain request to a WebSocket endpoint: 405 unless GET
    or HEAD, else 426 Upgrade Required (RFC 9110 section 15.5.22); any
    other plain request: a page; an upgrade where no endpoint is mounted:
    404; a malformed upgrade (``check_upgrade``, RFC 6455 section 4.2.1);
    an ``Origin`` not allowed: 403 (RFC 6455 section 10.2); an address an
    operator banned: 403 with ``banned``, the reason; else the upgrade.
    ``endpoint``: the protocol mounted at the request's path, if any."""
    refusal = check_request(request)
    if refusal is not None:
        return refusal
    if api:
        return Route.API
    if media:
        return Route.MEDIA
    path = request.path
    if not request.wants_websocket:
        if endpoint is None:
            return Route.PAGE
        if request.method not in ("GET", "HEAD"):
            return Refusal(405, f"{path} is a WebSocket endpoint: GET only", (("Allow", "GET"),))
        return Refusal(426, f"{path} is a WebSocket endpoint ({endpoint})",
                       (("Upgrade", "websocket"),))
    if endpoint is None:
        return Refusal(404, "no chat endpoint at this path")
    refusal = check_upgrade(request)
    if refusal is not None:
        return refusal
    if not origin_allowed:
        return Refusal(403, "origin not allowed")
    if banned is not None:
        return Refusal(403, banned)
    return Route.UPGRADE


def accept_response(request: HttpRequest) -> bytes:
    """The 101 Switching Protocols answer (RFC 6455 section 4.2.2); no
    extension or subprotocol is negotiated."""
    key = request.header("sec-websocket-key").strip().encode("ascii")
    accept = base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest()).decode("ascii")
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode("ascii")


def response(status: int, body: bytes | str = b"", *, content_type: str = "text/plain; charset=utf-8",
             headers: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"HTTP/1.1 {status} {_phrase(status)}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Connection: close",
             "Cache-Control: no-store" if status >= 300 else None,
             *(f"{name}: {value}" for name, value in headers)]
    head = "\r\n".join(line for line in lines if line is not None) + "\r\n\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


def refusal_response(refusal: Refusal, head_only: bool = False) -> bytes:
    return response(refusal.status, refusal.reason + "\n", headers=refusal.headers,
                    head_only=head_only)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HeadReader:
    """Feeds bytes to h11 until a request head is complete.

    ``feed(data)`` returns the ``HttpRequest`` once complete (the bytes after
    it are then in ``trailing``), None if more bytes are needed, and raises
    ``Refusal``-carrying ``BadRequest`` if the bytes are not HTTP.
    ``data=b""`` means the peer closed: ``BadRequest`` if mid-request.

    A head over ``MAX_HEAD_BYTES`` is refused with 431 however its bytes
    are split between reads: h11 checks only a head still incomplete, so
    the bytes fed are counted here too.
    """

    __slots__ = ("_h11", "trailing", "_fed")

    def __init__(self) -> None:
        #: h11's parser, made only if the first bytes are not a whole
        #: plain head (``plain_head``).
        self._h11: h11.Connection | None = None
        self.trailing = b""
        self._fed = 0

    def feed(self, data: bytes) -> HttpRequest | None:
        conn = self._h11
        if conn is None:
            if not self._fed:
                plain = plain_head(data)
                if plain is not None:
                    self._fed = len(data)
                    request, self.trailing = plain
                    return request
            conn = self._h11 = h11.Connection(h11.SERVER,
                                              max_incomplete_event_size=MAX_HEAD_BYTES)
        self._fed += len(data)
        conn.receive_data(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            # h11's text quotes the offending bytes (a whole header line:
            # "illegal header line: bytearray(b'Authorization: Bearer KEY\x00')"):
            # say what is wrong, never what was sent, since a header line may
            # carry a credential (an API key, a cookie, a token).
            detail = _QUOTED.split(str(exc), maxsplit=1)[0].rstrip(" :") or "unreadable"
            if len(detail) > 100:  # never echo a client's garbage at length
                detail = detail[:97] + "..."
            raise BadRequest(Refusal(status, f"malformed HTTP request: {detail}")) from None
        if event is h11.NEED_DATA:
            if not data:
                raise BadRequest(None)
            return None
        if isinstance(event, h11.Request):
            # The bytes after the head (a client may send frames right
            # after its upgrade request, before the 101).
            trailing = conn.trailing_data[0]
            if self._fed - len(trailing) > MAX_HEAD_BYTES:
                raise BadRequest(_HEAD_TOO_LARGE)
            self.trailing = trailing
            return request_from_h11(event)
        raise BadRequest(None)  # ConnectionClosed, or an event a server cannot get first


_HEAD_TOO_LARGE = Refusal(431, f"the request head is over {MAX_HEAD_BYTES} bytes")

#: A plain HTTP/1.1 request head, as a WebSocket client sends it: the
#: request line (a token method, an ASCII target, ``HTTP/1.1``), then header
#: lines (a token name, a colon, optional spaces or tabs, a value of visible
#: ASCII words separated by spaces or tabs, optional spaces or tabs), each
#: ending in CRLF, then an empty line. Every such head is one h11 parses
#: without error into the same request (h11/_abnf.py is the same grammar
#: with more allowed); ``plain_head`` also leaves to h11 what h11 treats
#: specially: a missing or repeated ``Host``, ``Content-Length``,
#: ``Transfer-Encoding``, a head over ``MAX_HEAD_BYTES``.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
#: Each header line is an atomic group and its leading spaces possessive:
#: a line matches in one way only, so a head that fails to match fails in
#: time linear in its length (without them, spaces around an empty value
#: split two ways per line, and a failing head of k such lines cost 2^k or
#: more tries: a client's 100 bytes held the event loop for seconds).
_PLAIN_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n"
    rb"(?:(?>" + _TOKEN + rb":[ \t]*+(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*+)?[ \t]*\r\n))*\r\n")


def plain_head(data: bytes) -> tuple[HttpRequest, bytes] | None:
    """The request a whole plain head at the start of ``data`` (``_PLAIN_HEAD``)
    makes, and the bytes after it; None for anything else, which h11
    parses (``HeadReader``). A shortcut: h11 takes ~40 µs for a WebSocket
    upgrade head, this ~5 µs; tests hold it to h11's results."""
    head = _PLAIN_HEAD.match(data)
    if head is None or head.end() > MAX_HEAD_BYTES:
        return None
    fields: dict[str, list[str]] = {}
    # The grammar is checked: each line between the request line and the
    # empty one is ``name:value``, spaces or tabs around the value.
    block = data[data.index(b"\n") + 1:head.end() - 2]
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower().decode("ascii"), []).append(
            value.strip(b" \t").decode("ascii"))
    if len(fields.get("host", ())) != 1 or "content-length" in fields \
            or "transfer-encoding" in fields:
        return None
    return (HttpRequest(head[1].decode("ascii"), head[2].decode("ascii"), "1.1", fields),
            data[head.end():])


#: Where a quotation of the client's bytes begins in h11's error texts
#: (``b'...'``, ``bytearray(b'...')``; h11 quotes them with ``{!r}``), but
#: not an apostrophe in its own words ("Can't receive data...").
_QUOTED = re.compile(r"""bytearray\(|(?<!\w)b['"]""")


class BadRequest(Exception):
    """Not an HTTP request: answer ``refusal`` (if any) and close."""

    def __init__(self, refusal: Refusal | None) -> None:
        super().__init__(refusal.reason if refusal else "connection closed")
        self.refusal = refusal
