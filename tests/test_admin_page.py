"""The admin page (chatd/web/admin.*) in real Chromium against a real server
(issue 22): sign in with the key, see who is in a room, ban, mute,
disconnect and lift, all through the server API."""

from __future__ import annotations

import pytest

from chatd.http import CONTENT_SECURITY_POLICY
from tests.api_helpers import KEY, api
from tests.browser import Browser, Context
from tests.lobby_peers import socialvp, wcp
from tests.test_api import config
from tests.test_http import get, http


@pytest.fixture(scope="module")
def browser():
    chromium = Browser()
    yield chromium
    chromium.close()


@pytest.fixture
def pages(browser):
    """A fresh profile; fails the test on a script error, a dialog, a
    request off the origin or a CSP violation (tests/browser.py)."""
    context = Context(browser)
    yield context
    troubles = [trouble for tab in context.tabs for trouble in tab.troubles()]
    context.close()
    assert not troubles


async def test_the_page_is_served_with_the_web_clients_policy(chat, tmp_path):
    server = await chat.start(config(tmp_path))
    for name in ("", "admin.js", "admin.css"):
        status, headers, _ = await http(server.port, get(f"/admin/{name}"))
        assert status == 200, name
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert (await http(server.port, get("/admin/../chatd.db")))[0] == 404


async def test_an_operator_bans_mutes_and_disconnects_from_the_page(chat, tmp_path, pages):
    server = await chat.start(config(tmp_path))
    wendy = await wcp(chat, "wendy")
    await socialvp(chat, "sam")
    assert (await wendy.recv())["user_id"] == "sam"
    tab = await pages.open(f"http://127.0.0.1:{server.port}/admin/")
    await tab.fill("#key", "wrong")
    await tab.click("#signin button[type=submit]")
    await tab.expect("#status", "to_have_text", "wrong API key")
    await tab.fill("#key", KEY)
    await tab.click("#signin button[type=submit]")
    await tab.expect("#presence tbody tr", "to_have_count", 2)
    await tab.expect("#rooms", "to_contain_text", "lobby (2)")
    # Mute wendy in the lobby from her row; her message gets wcp's error.
    await tab.click('#presence tr[data-name="wendy"] >> text=Mute')
    await tab.expect("#rules tbody tr", "to_have_count", 1)
    await tab.expect("#rules tbody tr", "to_contain_text", "name wendy")
    await wendy.send({"type": "message", "data": "hi"})
    assert await wendy.recv() == {"type": "error", "message": "muted"}
    await tab.click("#rules tbody tr >> text=Unmute")
    await tab.expect("#rules tbody tr", "to_have_count", 0)
    # Ban sam: disconnected, listed, and shown in the activity.
    await tab.click('#presence tr[data-name="sam"] >> text=Ban')
    assert await wendy.recv() == {"type": "user_left", "user_id": "sam"}
    await tab.expect("#presence tbody tr", "to_have_count", 1)
    await tab.expect("#rules tbody tr", "to_contain_text", "name sam")
    await tab.expect("#activity", "to_contain_text", "ban name 'sam'")
    # Disconnect wendy from her row.
    await tab.click('#presence tr[data-name="wendy"] >> text=Disconnect')
    assert await wendy.closed() == 1008
    await tab.expect("#presence tbody tr", "to_have_count", 0)
    # A ban typed in the form, by address, with a duration.
    await tab.do(lambda page: page.select_option("#rule-target", "address"))
    await tab.fill("#rule-value", "203.0.113.0/24")
    await tab.fill("#rule-duration", "600")
    await tab.fill("#rule-reason", "flood")
    await tab.click("#rule button[type=submit]")
    await tab.expect("#rules tbody tr", "to_have_count", 2)
    await tab.expect("#rules tbody tr >> nth=1", "to_contain_text", "address 203.0.113.0/24")
    bans = (await api(server.port, "bans", {}))["bans"]
    assert {b.get("address") for b in bans} == {None, "203.0.113.0/24"}
    # A notice from the page reaches the room.
    listener = await socialvp(chat, "lara")
    await tab.fill("#notice", "be nice")
    await tab.click("#publish button[type=submit]")
    assert await listener.recv() == {"type": "broadcast", "from": "chatd", "message": "be nice"}
