"""The handshake's decision, sans-IO (``chatd.handshake.decide``): a
request head in, a refusal or a route out, in the order the function's
docstring gives."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.handshake import (
    MAX_HEAD_BYTES, BadRequest, HeadReader, HttpRequest, Refusal, Route, decide, plain_head,
)

UPGRADE = {"host": ["chat.example"], "upgrade": ["websocket"], "connection": ["Upgrade"],
           "sec-websocket-key": ["dGhlIHNhbXBsZSBub25jZQ=="], "sec-websocket-version": ["13"]}


def request(method: str = "GET", target: str = "/wcp", **headers: list[str]) -> HttpRequest:
    return HttpRequest(method, target, "1.1", {"host": ["chat.example"], **headers})


def upgrade(target: str = "/wcp", **headers: list[str]) -> HttpRequest:
    return HttpRequest("GET", target, "1.1", {**UPGRADE, **headers})


def status(outcome: Refusal | Route) -> int | Route:
    return outcome.status if isinstance(outcome, Refusal) else outcome


def test_a_good_upgrade_to_an_endpoint_is_accepted():
    assert decide(upgrade(), endpoint="wcp") is Route.UPGRADE


@pytest.mark.parametrize(("req", "endpoint", "expected"), [
    (upgrade("/nowhere"), None, 404),
    (upgrade(**{"sec-websocket-version": ["8"]}), "wcp", 426),  # RFC 6455 section 4.4
    (upgrade(**{"sec-websocket-key": ["short"]}), "wcp", 400),
    (request(), "wcp", 426),                   # a plain GET to a WebSocket endpoint
    (request("POST"), "wcp", 405),
    (request(target="/healthz"), None, Route.PAGE),
    (request(target="/", host=["bad host"]), None, 400),  # RFC 9112 section 3.2
])
def test_each_kind_of_request_gets_its_answer(req, endpoint, expected):
    assert status(decide(req, endpoint=endpoint)) == expected


def test_the_api_and_media_are_served_before_endpoints_and_pages():
    assert decide(request(target="/api/info"), endpoint=None, api=True) is Route.API
    assert decide(request("POST", "/media"), endpoint=None, media=True) is Route.MEDIA


def test_a_malformed_host_is_refused_even_on_the_api():
    assert status(decide(request(host=["a b"]), endpoint=None, api=True)) == 400


def test_an_origin_not_allowed_and_a_banned_address_are_refused_403_after_the_upgrade_checks():
    refused = decide(upgrade(), endpoint="wcp", origin_allowed=False)
    assert isinstance(refused, Refusal) and (refused.status, refused.reason) == (
        403, "origin not allowed")
    banned = decide(upgrade(), endpoint="wcp", banned="banned: spam")
    assert isinstance(banned, Refusal) and (banned.status, banned.reason) == (403, "banned: spam")
    # A malformed upgrade is named first, whatever the origin or address.
    bad = decide(upgrade(**{"sec-websocket-version": ["8"]}), endpoint="wcp",
                 origin_allowed=False, banned="banned")
    assert status(bad) == 426


# --- the plain-head shortcut (``chatd.handshake.plain_head``) against h11 ------------------

def _with_h11(data: bytes) -> tuple[HttpRequest | str, bytes]:
    """What h11 alone makes of ``data``: the request (or the refusal's
    reason, or "more" when it wants more bytes) and the bytes after it."""
    reader = HeadReader()
    reader._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        request = reader.feed(data)
    except BadRequest as exc:
        return str(exc), b""
    return (request if request is not None else "more"), reader.trailing


def _mostly(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
    """Mostly one of ``good``, now and then one of ``bad``."""
    return st.sampled_from(good * (len(bad) * 5) + bad) if bad else st.sampled_from(good)


_NAMES = _mostly(["Host", "host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Origin",
                  "X-A!#$%&'*+.^_`|~"],
                 ["HOST", "Content-Length", "Transfer-Encoding", "", "Bad Name", "Na\u00efve"])
_VALUES = _mostly(["websocket", "Upgrade", "keep-alive, Upgrade", "13", "127.0.0.1:1", "",
                   "\tpadded\t ", "a \t b", "dGhlIHNhbXBsZSBub25jZQ=="],
                  ["0", "chunked", "caf\u00e9", "x\x00y", "x\ry", "x\ny", "\x7f"])
_SEPARATORS = _mostly([":", ": ", ":\t", ":  "], [" : ", " :"])
_ENDS = _mostly(["\r\n"], ["\n", " \r\n", "\r"])


@st.composite
def _heads(draw) -> bytes:
    """Request heads, most of them plain, some with one thing or more that
    h11 reads differently or refuses."""
    method = draw(_mostly(["GET", "HEAD", "POST", "OPTIONS"], ["G@T", "", "get", "GET "]))
    target = draw(_mostly(["/multichat", "/", "/a?b=c#d", "http://h/p", "*"],
                          ["/a b", "/caf\u00e9", ""]))
    version = draw(_mostly(["HTTP/1.1"], ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 "]))
    lines = [f"{method} {target} {version}"]
    if draw(st.integers(0, 9)):
        lines.append("Host: " + draw(_VALUES))
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(_mostly([""], [" ", "\t"])) + draw(_NAMES) + draw(_SEPARATORS)
                     + draw(_VALUES))
    ends = [draw(_ENDS) for _ in lines]
    head = "".join(line + end for line, end in zip(lines, ends)) + draw(_ENDS)
    return head.encode("latin-1") + draw(st.sampled_from([b"", b"\x81\x85", b"GET / HTTP/1.1"]))


@settings(max_examples=2000, deadline=None)
@given(_heads())
def test_a_head_the_shortcut_reads_is_read_the_same_by_h11(data):
    plain = plain_head(data)
    if plain is not None:
        assert plain == _with_h11(data)
    reader = HeadReader()
    try:
        got = reader.feed(data), reader.trailing
    except BadRequest as exc:
        got = str(exc), b""
    assert got == _with_h11(data) or (got[0] is None and _with_h11(data)[0] == "more")


def test_a_websocket_client_s_head_takes_the_shortcut():
    head = (b"GET /multichat?x=1 HTTP/1.1\r\nHost: chat.example:8080\r\nUpgrade: websocket\r\n"
            b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nOrigin: https://chat.example\r\nX-Empty:\r\n\r\n")
    request, trailing = plain_head(head + b"\x81\x80")
    assert trailing == b"\x81\x80"
    assert request.path == "/multichat" and request.header("x-empty") == ""
    assert decide(request, endpoint="multichat") is Route.UPGRADE
    assert (request, trailing) == _with_h11(head + b"\x81\x80")


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n\r\n",                                    # no Host: h11's 400
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",               # two: h11's 400
    b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",  # a body: h11 frames it
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",  # h11's 501
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",                # obs-fold
    b"GET / HTTP/1.1\nHost: a\n\n",                                 # bare LF
    b"GET / HTTP/1.1\r\nHost: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",  # 431
    b"GET / HTTP/1.1\r\nHost: a\r\n",                               # not whole yet
])
def test_anything_else_is_left_to_h11(head):
    assert plain_head(head) is None


@pytest.mark.parametrize("head", [
    # Empty values between runs of spaces, then a byte no head may hold: a
    # pattern that could split each line's spaces two ways tried (m+1)^k
    # splits before failing (12 lines took 2.5 s; these 60 would take
    # longer than the suite may run), holding the event loop meanwhile.
    b"GET / HTTP/1.1\r\n" + b"X:   \r\n" * 60 + b"\x00",
    b"GET / HTTP/1.1\r\n" + b"X: \t \r\n" * 60 + b"\r\n\x00",
    b"GET / HTTP/1.1\r\nX:" + b" " * 16_000 + b"\x00",
    b"GET / HTTP/1.1\r\nX: a" + b" a" * 8_000 + b" \x00",
])
def test_a_head_that_is_not_plain_fails_at_once_and_goes_to_h11(head):
    assert plain_head(head) is None
    reader = HeadReader()
    if b"\r\n\r\n" in head:  # whole, without a Host: h11's 400
        with pytest.raises(BadRequest) as refused:
            reader.feed(head)
        assert refused.value.refusal is not None and refused.value.refusal.status == 400
    else:  # h11 waits for the rest of the head (the handshake deadline bounds it)
        assert reader.feed(head) is None
