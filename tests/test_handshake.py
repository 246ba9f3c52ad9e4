"""The handshake's decision, sans-IO (``chatd.handshake.decide``): a
request head in, a refusal or a route out, in the order the function's
docstring gives."""

from __future__ import annotations

import pytest

from chatd.handshake import HttpRequest, Refusal, Route, decide

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
