"""The web client in real Chromium, against a real chatd on 127.0.0.1.

Pages are driven with Playwright (tests/browser.py) and wait with its
auto-waiting assertions; the other protocols' clients are the suite's own
WebSocket peers. Every page is also checked for script errors, dialogs,
requests off its own origin and Content-Security-Policy violations.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import trio

from chatd.config import Config
from chatd.http import CONTENT_SECURITY_POLICY
from chatd.tokens import mint
from tests.browser import Browser, Context
from tests.conftest import GUARD, JWT_SECRET, SECRET, Peer, free_port
from tests.lobby_peers import signed, socialvp, wcp, wschat
from tests.test_gradagenda import login as ga_login
from tests.test_gradagenda import message
from tests.test_http import get, http

class MarksAside(Peer):
    """A GradAgenda peer that sets aside the delivery and read marks the
    pages send (issue 23): ``recv`` answers the next other frame, and
    ``marks`` holds what was set aside."""

    def __init__(self, ws) -> None:
        super().__init__(ws)
        self.marks: list[dict] = []

    async def recv(self):
        while True:
            frame = await super().recv()
            if frame.get("type") != "providing-marks":
                return frame
            self.marks.append(frame)


async def login(chat, user: str, device: str = "phone") -> MarksAside:
    peer = await ga_login(chat, user, device)
    return MarksAside(peer.ws)


XSS = "<img src=x onerror=alert(1)>"
LAST = "#lobby-log .msg >> nth=-1"
GA_LAST = "#ga-log .msg >> nth=-1"


@pytest.fixture(scope="session")
def browser():
    chromium = Browser()
    yield chromium
    chromium.close()


@pytest.fixture
def pages(browser):
    """A fresh browser profile; fails the test if any of its pages showed a
    script error or a dialog, left its origin, or broke its CSP."""
    context = Context(browser)
    yield context
    troubles = [trouble for tab in context.tabs for trouble in tab.troubles()]
    context.close()
    assert not troubles


def app_url(chat, fragment: str = "") -> str:
    return f"http://127.0.0.1:{chat.server.port}/app/{fragment}"


async def until(peer: Peer, wanted) -> dict:
    """The next frame ``wanted(frame)`` accepts, skipping presence frames."""
    while True:
        frame = await peer.recv()
        if wanted(frame):
            return frame
        assert frame.get("type") in ("user_joined", "user_left"), frame


async def join(pages, chat, name: str, viewport: dict | None = None):
    tab = await pages.open(app_url(chat, "#lobby"), viewport)
    await tab.fill("#lobby-name", name)
    await tab.press("#lobby-name", "Enter")
    await tab.expect("#lobby-state", "to_have_text", f"Connected as {name}")
    return tab


async def shows(tab, sender: str, body: str, selector: str = LAST) -> None:
    """The last message shown is ``body`` from ``sender``, as text."""
    await tab.expect(f"{selector} >> .body", "to_have_text", body)
    await tab.expect(f"{selector} >> .name", "to_have_text", sender)


async def sign_in(pages, chat, user: str, device: str = "browser", token: str | None = None,
                  viewport: dict | None = None):
    tab = await pages.open(app_url(chat, "#gradagenda"), viewport)
    await tab.fill("#ga-user", user)
    await tab.fill("#ga-token", token if token is not None else mint(JWT_SECRET, user))
    await tab.fill("#ga-device", device)
    await tab.click("#ga-signin button[type=submit]")
    return tab


# --- serving the page (plain HTTP; no browser needed) ------------------------------


WEB = Path(__file__).parent.parent / "chatd" / "web"


async def test_the_page_and_every_file_it_names_are_served_with_the_policy(chat):
    await chat.start()
    status, headers, body = await http(chat.server.port, get("/app/"))
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert body == (WEB / "index.html").read_bytes()
    # Everything index.html loads, and every module those import.
    names = set(re.findall(r'(?:src|href)="([\w.-]+)"', body.decode()))
    for script in WEB.glob("*.js"):
        names |= set(re.findall(r'from "\./([\w.-]+)"', script.read_text()))
    assert {"app.js", "style.css", "lobby.js", "gradagenda.js", "link.js", "dom.js"} <= names
    for name in sorted(names):
        status, headers, body = await http(chat.server.port, get(f"/app/{name}"))
        assert status == 200, name
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert body == (WEB / name).read_bytes()
    status, headers, _ = await http(chat.server.port, get("/app"))
    assert (status, headers["location"]) == (301, "/app/")
    for missing in ("/app/nothing.js", "/app/../http.py", "/app/%2e%2e/http.py"):
        assert (await http(chat.server.port, get(missing)))[0] == 404


@pytest.mark.parametrize("web_client, served, absent", [
    ("/chat/", "/chat/", "/app/"),
    (None, None, "/app/"),
])
async def test_web_client_moves_the_page_or_turns_it_off(chat, caplog, web_client, served,
                                                         absent):
    caplog.set_level(logging.INFO, "chatd")
    await chat.start(web_client=web_client)
    if served is not None:
        assert (await http(chat.server.port, get(served)))[0] == 200
        assert f"web client: http://127.0.0.1:{chat.server.port}{served}" in caplog.text
    else:
        assert "web client:" not in caplog.text
    assert (await http(chat.server.port, get(absent)))[0] == 404


async def test_the_start_up_log_names_the_page_and_a_config_without_endpoints_has_none(
        chat, caplog):
    caplog.set_level(logging.INFO, "chatd")
    await chat.start()
    assert f"web client: http://127.0.0.1:{chat.server.port}/app/" in caplog.text
    caplog.clear()
    # Written for the original multichat server: no endpoints, no page.
    await chat.start(Config(secret_key=SECRET, store=":memory:"))
    assert "web client:" not in caplog.text
    # Its ws-path "/" matches every path, as the Go server's did: /app/ is
    # the multichat endpoint there, not a page.
    assert (await http(chat.server.port, get("/app/")))[0] == 426


# --- the page itself -----------------------------------------------------------


async def test_the_page_loads_only_from_chatd_and_starts_on_the_lobby(chat, pages):
    await chat.start()
    tab = await pages.open(app_url(chat))
    await tab.expect("#lobby-state", "to_have_text", "Not joined")
    await tab.expect("#lobby-name", "to_be_visible")
    await tab.expect("#gradagenda", "to_be_hidden")
    # The stylesheet applied: a CSP that refused it would leave this default.
    await tab.expect("#lobby-join", "to_have_css", "border-top-style", "solid")
    await tab.click("#tab-gradagenda")
    await tab.expect("#ga-user", "to_be_visible")
    await tab.expect("#tab-gradagenda", "to_have_attribute", "aria-current", "page")
    # (pages checks: no request off the origin, no script error, no CSP report)


# --- lobby -------------------------------------------------------------------------


async def test_two_pages_chat_with_each_other_and_with_wcp_and_multichat_clients(chat, pages):
    await chat.start()
    alice = await join(pages, chat, "alice")
    wendy = await wcp(chat, "wendy")
    await alice.expect("#lobby-roster", "to_contain_text", "Wendy")
    bob = await join(pages, chat, "bob")
    await alice.expect("#lobby-roster", "to_contain_text", "bob")
    await alice.expect("#lobby-count", "to_have_text", "3")
    await alice.expect("#lobby-roster li", "to_have_text", ["alice (you)", "bob", "Wendy (wendy)"])
    bridge = await chat.multichat("bridge")

    await alice.fill("#lobby-text", "hello from alice")
    await alice.press("#lobby-text", "Enter")
    await shows(alice, "alice", "hello from alice")
    await shows(bob, "alice", "hello from alice")
    assert (await until(wendy, lambda f: f["type"] == "message"))["data"] == "hello from alice"
    assert await bridge.recv() == {"action": "forwarding-message",
                                   "source-client-name": "alice", "content": "hello from alice"}

    await bob.fill("#lobby-text", "hi alice\nsecond line")
    await bob.click("#lobby-send button")
    await shows(alice, "bob", "hi alice\nsecond line")
    assert (await until(wendy, lambda f: f["type"] == "message"))["user_id"] == "bob"

    await wendy.send({"type": "message", "data": "hello from wcp", "timestamp": 1700000000})
    for tab in (alice, bob):
        await shows(tab, "wendy", "hello from wcp")
        await tab.expect(f"{LAST} >> time", "to_have_attribute", "datetime",
                         "2023-11-14T22:13:20.000Z")

    await bridge.send({"action": "client-message", "content": "hello from multichat"})
    for tab in (alice, bob):
        await shows(tab, "bridge", "hello from multichat")
    assert (await until(wendy, lambda f: f["type"] == "message"))["user_id"] == "bridge"

    await bob.click("#lobby-leave")
    await bob.expect("#lobby-name", "to_be_visible")
    await alice.expect("#lobby-log .notice >> nth=-1", "to_have_text", "bob left")
    await alice.expect("#lobby-roster", "not_to_contain_text", "bob")
    assert await until(wendy, lambda f: f["type"] == "user_left") == {"type": "user_left",
                                                                     "user_id": "bob"}


async def test_a_page_that_joins_late_sees_who_is_already_in_the_room(chat, pages):
    await chat.start()
    await wcp(chat, "wendy")
    await socialvp(chat, "sam")
    tab = await join(pages, chat, "late")
    await tab.expect("#lobby-roster li", "to_have_text", ["late (you)", "sam", "Wendy (wendy)"])
    await tab.expect("#lobby-count", "to_have_text", "3")
    # Those already there are listed, not announced as joining.
    await tab.expect("#lobby-log .notice", "to_have_text", ["You joined as late."])


@pytest.mark.parametrize("holder", ["page", "wcp", "socialvp", "multichat", "look-alike"])
async def test_a_taken_name_is_refused_with_the_servers_message_and_another_works(
        chat, pages, holder):
    await chat.start()
    if holder == "page":
        await join(pages, chat, "carol")
    elif holder == "wcp":
        await wcp(chat, "carol")
    elif holder == "socialvp":
        await socialvp(chat, "carol")
    elif holder == "multichat":
        await chat.multichat("carol")
    else:  # a name that looks the same is the same name (chatd.names)
        await wcp(chat, "CAROL")
    tab = await pages.open(app_url(chat))
    await tab.fill("#lobby-name", "carol")
    await tab.click("#lobby-join button")
    await tab.expect("#lobby-join-error", "to_have_text",
                     "Cannot join as “carol”: user_id already in use")
    await tab.expect("#lobby-state", "to_have_text", "Not joined")
    await tab.expect("#lobby-room", "to_be_hidden")
    # The name field keeps focus, for another try.
    await tab.expect("#lobby-name", "to_be_focused")
    await tab.fill("#lobby-name", "carol2")
    await tab.press("#lobby-name", "Enter")
    await tab.expect("#lobby-state", "to_have_text", "Connected as carol2")
    await tab.expect("#lobby-join-error", "to_be_hidden")


async def test_markup_from_any_protocol_is_shown_as_text(chat, pages):
    await chat.start()
    tab = await join(pages, chat, "alice")
    wendy = await wcp(chat, "wendy")
    bridge = await chat.multichat(XSS)
    sam = await socialvp(chat, "sam")
    listener = await wschat(chat)

    await wendy.send({"type": "message", "data": XSS})
    await shows(tab, "wendy", XSS)
    await bridge.send({"action": "client-message", "content": f"<b>bold</b>{XSS}"})
    await shows(tab, XSS, f"<b>bold</b>{XSS}")
    await sam.send({"command": "broadcast", "message": {"html": XSS}})
    await shows(tab, "sam", '{"html":"<img src=x onerror=alert(1)>"}')
    await listener.send(signed("<script>alert(2)</script>", "<svg onload=alert(3)>"))
    await shows(tab, "<script>alert(2)</script>", "<svg onload=alert(3)>")
    # Nothing became an element: no image, script, svg or bold in the log.
    await tab.expect("#lobby-log img, #lobby-log script, #lobby-log svg, #lobby-log b",
                     "to_have_count", 0)
    # (pages checks that no dialog opened)


# --- GradAgenda -------------------------------------------------------------------


@pytest.mark.parametrize("token", [mint(JWT_SECRET, "mallory"), "not-a-token",
                                   mint(JWT_SECRET, "alice", ttl=-3600)],
                         ids=["someone-elses", "garbage", "expired"])
async def test_a_refused_token_is_explained_on_the_sign_in_form(chat, pages, token):
    await chat.start()
    tab = await sign_in(pages, chat, "alice", token=token)
    await tab.expect("#ga-signin-error", "to_contain_text", "Cannot sign in: ")
    await tab.expect("#ga-signin-error", "to_contain_text", "token")
    await tab.expect("#ga-state", "to_have_text", "Signed out")
    await tab.expect("#ga-app", "to_be_hidden")
    await tab.expect("#ga-token", "to_be_focused")


async def test_sign_in_create_a_group_and_chat_with_members_and_other_devices(chat, pages):
    await chat.start()
    bob = await login(chat, "bob")
    tab = await sign_in(pages, chat, "alice", device="laptop")
    await tab.expect("#ga-state", "to_have_text", "Connected as alice (laptop)")
    await tab.expect("#ga-sessions-empty", "to_be_visible")

    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob, carol")
    await tab.press("#ga-members", "Enter")
    await tab.expect("#ga-session-title", "to_have_text", "Group: bob, carol")
    await tab.expect("#ga-session-members", "to_have_text",
                     "Group members: alice (you), bob, carol")
    created = await bob.recv()
    assert created["status"] == "created" and created["user-id"] == ["alice", "bob", "carol"]
    session = created["session-id"]
    await tab.expect("#ga-sessions button", "to_have_text", ["Group: bob, carol"])

    await bob.send(message(session, "hello alice", cdid="b1"))
    await shows(tab, "bob", "hello alice", GA_LAST)
    await bob.send(message(session, XSS, cdid="b2"))
    await shows(tab, "bob", XSS, GA_LAST)
    await tab.expect("#ga-log img", "to_have_count", 0)

    await tab.fill("#ga-text", "hi bob")
    await tab.press("#ga-text", "Enter")
    await shows(tab, "alice", "hi bob", GA_LAST)
    await tab.expect("#ga-log .pending", "to_have_count", 0)
    for cdid in ("b1", "b2"):
        assert (await bob.recv())["cdid"] == cdid
    got = await bob.recv()
    assert (got["sender-id"], got["message"], got["seq"]) == ("alice", {"type": "text",
                                                                       "body": "hi bob"}, 3)

    phone = await login(chat, "alice", device="phone")
    await phone.send(message(session, "sent from my phone", cdid="p1"))
    await shows(tab, "alice", "sent from my phone", GA_LAST)
    await tab.expect(f"{GA_LAST} >> .tag", "to_have_text", "(you)")
    await tab.expect("#ga-log .msg", "to_have_count", 4)
    assert (await bob.recv())["message"]["body"] == "sent from my phone"

    # A direct chat with bob, opened from the page.
    await tab.click("text=Direct chat")
    await tab.fill("#ga-peer", "bob")
    await tab.press("#ga-peer", "Enter")
    await tab.expect("#ga-session-title", "to_have_text", "Direct: bob")
    await tab.fill("#ga-text", "just us")
    await tab.press("#ga-text", "Enter")
    got = await bob.recv()
    assert got["message"]["body"] == "just us" and got["session-id"].startswith("direct-")
    # A new message in the group, now in the background, is counted as unread.
    await bob.send(message(session, "are you there?", cdid="b3"))
    await tab.expect("#ga-sessions button:has-text('Group: bob, carol')", "to_contain_text", "1 new")


async def test_a_reload_stays_signed_in_until_sign_out(chat, pages):
    await chat.start()
    tab = await sign_in(pages, chat, "alice")
    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob")
    await tab.press("#ga-members", "Enter")
    await tab.expect("#ga-sessions button", "to_have_text", ["Group: bob"])
    await tab.do(lambda page: page.reload())
    await tab.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    await tab.expect("#ga-sessions button", "to_have_text", ["Group: bob"])
    await tab.click("#ga-signout")
    await tab.expect("#ga-state", "to_have_text", "Signed out")
    await tab.expect("#ga-user", "to_be_focused")
    await tab.do(lambda page: page.reload())
    await tab.expect("#ga-signin", "to_be_visible")
    await tab.expect("#ga-token", "to_have_value", "")


async def test_history_pages_back_as_one_scrolls_up(chat, pages):
    await chat.start()
    alice = await login(chat, "alice")
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c",
                      "user-id": ["bob"]})
    session = (await alice.recv())["session-id"]
    for n in range(1, 121):
        await alice.send(message(session, f"message {n}", cdid=str(n)))
        assert (await alice.recv())["seq"] == n

    tab = await sign_in(pages, chat, "bob")
    await tab.click("#ga-sessions button >> text=Group: alice")
    await tab.expect("#ga-log .msg", "to_have_count", 50)
    await tab.expect("#ga-log .msg >> nth=0 >> .body", "to_have_text", "message 71")
    await tab.expect(GA_LAST + " >> .body", "to_have_text", "message 120")
    await tab.expect("#ga-start", "to_be_hidden")

    # Scrolling to the top loads the page before.
    await tab.do(lambda page: page.locator("#ga-scroller").evaluate("e => { e.scrollTop = 0; }"))
    await tab.expect("#ga-log .msg", "to_have_count", 100)
    await tab.expect("#ga-log .msg >> nth=0 >> .body", "to_have_text", "message 21")
    # The button does the same from the keyboard; the last page says so.
    await tab.do(lambda page: page.focus("#ga-earlier"))
    await tab.do(lambda page: page.keyboard.press("Enter"))
    await tab.expect("#ga-log .msg", "to_have_count", 120)
    await tab.expect("#ga-start", "to_be_visible")
    assert await tab.texts("#ga-log .msg .body") == [f"message {n}" for n in range(1, 121)]


# --- connection state and reconnection ---------------------------------------------


async def test_pages_reconnect_after_a_server_restart_and_lose_nothing(chat, pages):
    port = free_port()
    host = f"127.0.0.1:{port}"
    server = await chat.start(host=host)
    lobby = await join(pages, chat, "alice")
    bob = await login(chat, "bob")
    await bob.send({"type": "request-mutable-session-creation", "cdid": "c", "user-id": ["carol"]})
    session = (await bob.recv())["session-id"]
    await bob.send(message(session, "before the restart", cdid="m1"))
    await bob.recv()
    carol = await sign_in(pages, chat, "carol")
    await carol.click("#ga-sessions button >> text=Group: bob")
    await shows(carol, "bob", "before the restart", GA_LAST)

    server.shutdown()
    with trio.fail_after(GUARD):
        await server.stopped.wait()
    for tab, state in ((lobby, "#lobby-state"), (carol, "#ga-state")):
        await tab.expect(state, "to_contain_text", "Reconnecting in")
    await lobby.expect("#lobby-log .notice >> nth=-1", "to_have_text",
                       "Disconnected: the server is restarting.")
    await lobby.expect("#lobby-text", "to_be_disabled")
    # Written while the server is down: kept, and sent once it is back.
    await carol.fill("#ga-text", "written while offline")
    await carol.press("#ga-text", "Enter")
    await carol.expect("#ga-log .pending .status", "to_have_text", "waiting for the connection")

    await chat.start(host=host)
    bob = await login(chat, "bob")
    await bob.send(message(session, "while carol was away", cdid="m2"))
    assert (await bob.recv())["seq"] == 2
    # The client's own backoff decides when: wait for it, not for a clock.
    reconnect = {"timeout": 4 * 10_000}
    await lobby.expect("#lobby-state", "to_have_text", "Connected as alice", **reconnect)
    await carol.expect("#ga-state", "to_have_text", "Connected as carol (browser)", **reconnect)

    # The lobby rejoined by itself: others see and reach alice.
    wendy = await wcp(chat, "wendy")
    await lobby.expect("#lobby-roster", "to_contain_text", "Wendy")
    await wendy.send({"type": "message", "data": "welcome back"})
    await shows(lobby, "wendy", "welcome back")
    await lobby.fill("#lobby-text", "thanks")
    await lobby.press("#lobby-text", "Enter")
    assert (await until(wendy, lambda f: f["type"] == "message"))["data"] == "thanks"

    # GradAgenda caught up after its last seq, and sent what was waiting, once.
    got = await bob.recv()
    assert (got["sender-id"], got["message"]["body"], got["seq"]) == (
        "carol", "written while offline", 3)
    await carol.expect("#ga-log .pending", "to_have_count", 0)
    assert await carol.texts("#ga-log .msg .body") == [
        "before the restart", "while carol was away", "written while offline"]


async def test_pages_wait_while_the_network_is_offline_and_come_back(chat, pages):
    await chat.start()
    lobby = await join(pages, chat, "alice")
    ga = await sign_in(pages, chat, "alice")
    await ga.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    wendy = await wcp(chat, "wendy")
    await lobby.expect("#lobby-roster", "to_contain_text", "Wendy")

    await pages.set_offline(True)
    await lobby.expect("#lobby-state", "to_have_text", "Offline: waiting for the network")
    await ga.expect("#ga-state", "to_have_text", "Offline: waiting for the network")
    await lobby.expect("#lobby-log .notice >> nth=-1", "to_have_text",
                       "Disconnected: the network is offline.")
    await lobby.expect("#lobby-retry", "to_be_visible")
    # The server sees alice go.
    assert await until(wendy, lambda f: f["type"] == "user_left") == {"type": "user_left",
                                                                     "user_id": "alice"}

    await pages.set_offline(False)
    await lobby.expect("#lobby-state", "to_have_text", "Connected as alice")
    await ga.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    await lobby.expect("#lobby-retry", "to_be_hidden")
    assert (await until(wendy, lambda f: f["type"] == "user_joined"))["user_id"] == "alice"
    await wendy.send({"type": "message", "data": "there you are"})
    await shows(lobby, "wendy", "there you are")


async def test_a_message_over_the_servers_size_limit_is_marked_and_not_resent(chat, pages):
    await chat.start()
    too_long = "x" * 5000  # max-frame-bytes is 4096
    lobby = await join(pages, chat, "alice")
    await lobby.fill("#lobby-text", too_long)
    await lobby.press("#lobby-text", "Enter")
    await lobby.expect(f"{LAST} >> .status", "to_have_text",
                       "not delivered: too long for this server (message exceeds 4096 bytes)")
    await lobby.expect("#lobby-text", "to_have_value", too_long)
    await lobby.expect("#lobby-state", "to_have_text", "Connected as alice", timeout=4 * 10_000)

    bob = await login(chat, "bob")
    ga = await sign_in(pages, chat, "alice")
    await ga.click("text=Direct chat")
    await ga.fill("#ga-peer", "bob")
    await ga.press("#ga-peer", "Enter")
    await ga.expect("#ga-session-title", "to_have_text", "Direct: bob")
    await ga.fill("#ga-text", too_long)
    await ga.press("#ga-text", "Enter")
    await ga.expect("#ga-log .pending .status", "to_have_text",
                    "not sent: too long for this server (message exceeds 4096 bytes)")
    await ga.expect("#ga-state", "to_have_text", "Connected as alice (browser)",
                    timeout=4 * 10_000)
    # Signed in again, it sends what follows, and not the long one again.
    await ga.fill("#ga-text", "shorter")
    await ga.press("#ga-text", "Enter")
    got = await bob.recv()
    assert (got["message"]["body"], got["seq"]) == ("shorter", 1)
    await ga.expect("#ga-log .pending", "to_have_count", 1)


async def test_reconnect_delays_double_with_jitter_up_to_a_cap(chat, pages):
    await chat.start()
    tab = await pages.open(app_url(chat))
    # link.js's own schedule, with the random draw at its two extremes.
    bounds = await tab.do(lambda page: page.evaluate("""async () => {
        const { backoff } = await import("./link.js");
        return [0, 1, 2, 3, 4, 5, 10, 100].map((n) => [backoff(n, () => 0), backoff(n, () => 1)]);
    }"""))
    assert bounds == [[500, 1000], [1000, 2000], [2000, 4000], [4000, 8000], [8000, 16000],
                      [15000, 30000], [15000, 30000], [15000, 30000]]


# --- phones and keyboards --------------------------------------------------------


PHONE = {"width": 360, "height": 740}


async def overflow(tab) -> int:
    """How far the page is wider than its window (0: no sideways scrolling)."""
    return await tab.do(lambda page: page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"))


async def test_a_phone_sized_page_works_by_keyboard_alone(chat, pages):
    await chat.start()
    await login(chat, "bob")
    tab = await pages.open(app_url(chat), viewport=PHONE)
    # From the top of the page, Tab reaches the name field; Enter joins.
    for _ in range(6):
        await tab.do(lambda page: page.keyboard.press("Tab"))
        if await tab.do(lambda page: page.evaluate("document.activeElement.id")) == "lobby-name":
            break
    else:
        pytest.fail("Tab never reached the name field")
    await tab.do(lambda page: page.keyboard.type("alice"))
    await tab.do(lambda page: page.keyboard.press("Enter"))
    await tab.expect("#lobby-state", "to_have_text", "Connected as alice")
    # Joined, the message box has the focus; Enter sends.
    await tab.expect("#lobby-text", "to_be_focused")
    await tab.do(lambda page: page.keyboard.type("typed on a phone " + "x" * 80))
    await tab.do(lambda page: page.keyboard.press("Enter"))
    await shows(tab, "alice", "typed on a phone " + "x" * 80)
    await tab.expect("#lobby-roster", "to_contain_text", "alice")
    assert await overflow(tab) == 0

    ga = await sign_in(pages, chat, "alice", viewport=PHONE)
    await ga.click("text=New group")
    await ga.fill("#ga-members", "bob")
    await ga.press("#ga-members", "Enter")
    # One column: the open session replaces the list, and Back returns to it.
    await ga.expect("#ga-session-title", "to_have_text", "Group: bob")
    await ga.expect("#ga-sessions", "to_be_hidden")
    await ga.expect("#ga-text", "to_be_focused")
    assert await overflow(ga) == 0
    await ga.press("#ga-back", "Enter")
    await ga.expect("#ga-sessions", "to_be_visible")
    await ga.expect("#ga-sessions button", "to_be_focused")
    assert await overflow(ga) == 0


# --- screenshots for the docs ------------------------------------------------------


async def test_screenshots_of_the_two_main_views(chat, pages, tmp_path):
    """Renders the lobby and a GradAgenda session as a user would see them.
    With CHATD_SCREENSHOTS=DIR the pictures are written there (the docs keep
    them as docs/web-client-lobby.png and docs/web-client-gradagenda.png)."""
    out = Path(os.environ.get("CHATD_SCREENSHOTS") or tmp_path)
    size = {"width": 1100, "height": 620}
    await chat.start()
    alice = await join(pages, chat, "alice", viewport=size)
    wendy = await wcp(chat, "wendy", display_name="Wendy Wu")
    sam = await socialvp(chat, "sam")
    bridge = await chat.multichat("irc-bridge")
    await alice.expect("#lobby-roster li", "to_have_text",
                       ["alice (you)", "irc-bridge", "sam", "Wendy Wu (wendy)"])
    await wendy.send({"type": "message", "data": "Morning all! Build is green again."})
    await shows(alice, "wendy", "Morning all! Build is green again.")
    await bridge.send({"action": "client-message", "content": "<dave> forwarded from #ops on IRC"})
    await shows(alice, "irc-bridge", "<dave> forwarded from #ops on IRC")
    await sam.send({"command": "broadcast", "message": "I'm on the SocialVP page"})
    await shows(alice, "sam", "I'm on the SocialVP page")
    await alice.fill("#lobby-text", "Hi everyone, this is the browser client.")
    await alice.press("#lobby-text", "Enter")
    await shows(alice, "alice", "Hi everyone, this is the browser client.")
    await alice.do(lambda page: page.screenshot(path=str(out / "web-client-lobby.png")))

    bob = await login(chat, "bob")
    await bob.send({"type": "request-mutable-session-creation", "cdid": "c",
                     "user-id": ["alice", "carol"]})
    session = (await bob.recv())["session-id"]
    lines = ["Agenda for Thursday's review is up.", "Can we move it to 3pm?",
             "Works for me.", "Moved. See you then!"]
    for n, body in enumerate(lines):
        await bob.send(message(session, body, cdid=str(n)))
        await bob.recv()
    ga = await sign_in(pages, chat, "alice", device="laptop", viewport=size)
    await ga.click("#ga-sessions button")
    await shows(ga, "bob", lines[-1], GA_LAST)
    await ga.fill("#ga-text", "Thanks, bob.")
    await ga.press("#ga-text", "Enter")
    await shows(ga, "alice", "Thanks, bob.", GA_LAST)
    await ga.expect("#ga-log .pending", "to_have_count", 0)
    await ga.do(lambda page: page.screenshot(path=str(out / "web-client-gradagenda.png")))
    for name in ("web-client-lobby.png", "web-client-gradagenda.png"):
        assert (out / name).stat().st_size > 10_000


# --- what chatd refuses for its encoding, and closes that are not a refusal -----------


async def _group_with_bob(chat, pages):
    bob = await login(chat, "bob")
    tab = await sign_in(pages, chat, "alice")
    await tab.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob")
    await tab.press("#ga-members", "Enter")
    await tab.expect("#ga-session-title", "to_have_text", "Group: bob")
    created = await bob.recv()
    return tab, bob, created["session-id"]


async def _saved_sign_in(tab) -> str | None:
    return await tab.do(lambda page: page.evaluate(
        "() => sessionStorage.getItem('chatd.gradagenda')"))


@pytest.mark.parametrize("typed, sent", [
    # Half an emoji (a cut paste): JavaScript strings may hold one; JSON
    # text sent as UTF-8 may not (chatd closes 1007). U+FFFD goes instead.
    ("half \\ud83d emoji", "half \ufffd emoji"),
    ("\\ude00 tail, whole \\ud83d\\ude00", "\ufffd tail, whole \U0001f600"),
])
async def test_half_an_emoji_is_sent_as_a_replacement_character_and_keeps_the_sign_in(
        chat, pages, typed, sent):
    await chat.start()
    tab, bob, session = await _group_with_bob(chat, pages)
    saved = await _saved_sign_in(tab)
    assert saved is not None
    await tab.do(lambda page: page.evaluate(f"() => {{ document.querySelector('#ga-text').value "
                                            f"= '{typed}'; }}"))
    await tab.press("#ga-text", "Enter")
    await shows(tab, "alice", sent, GA_LAST)
    await tab.expect("#ga-log .pending", "to_have_count", 0)
    got = await bob.recv()
    assert (got["session-id"], got["message"]["body"]) == (session, sent)
    # A group name (the members' ids) goes the same way.
    await tab.click("text=New group")
    await tab.do(lambda page: page.evaluate(
        "() => { document.querySelector('#ga-members').value = 'bob, carol\\ud83d'; }"))
    await tab.press("#ga-members", "Enter")
    await tab.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    assert await _saved_sign_in(tab) == saved
    await tab.expect("#ga-signin", "to_be_hidden")


async def test_a_close_for_a_bad_frame_is_not_a_refused_token(chat, pages):
    await chat.start()
    tab, bob, session = await _group_with_bob(chat, pages)
    saved = await _saved_sign_in(tab)
    # The next frame the page sends is one chatd cannot read (as a bug
    # would send): chatd closes 1007.
    await tab.do(lambda page: page.evaluate("""() => {
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function () {
            WebSocket.prototype.send = send;
            return send.call(this, '{"type": "request-sending-a-message", "cdid": "\\\\ud83d"}');
        };
    }"""))
    await tab.fill("#ga-text", "this one breaks")
    await tab.press("#ga-text", "Enter")
    # Said on the message, which is not sent again; the page signs in again
    # by itself with the saved sign-in, which it keeps.
    await tab.expect(f"{GA_LAST} >> .status", "to_contain_text",
                     "not sent: the server could not read what this page sent (1007")
    await tab.expect("#ga-log .notice >> nth=-1", "to_contain_text",
                     "Disconnected: the server could not read what this page sent")
    await tab.expect("#ga-state", "to_have_text", "Connected as alice (browser)")
    await tab.expect("#ga-signin", "to_be_hidden")
    await tab.expect("#ga-signin-error", "to_have_text", "")
    assert await _saved_sign_in(tab) == saved
    await tab.expect(f"{GA_LAST}", "to_have_attribute", "data-state", "failed")
    # The page works on: the next message goes through, the broken one never.
    await tab.fill("#ga-text", "after")
    await tab.press("#ga-text", "Enter")
    got = await bob.recv()
    assert got["message"]["body"] == "after"


async def test_the_lobby_sends_half_an_emoji_as_a_replacement_character_too(chat, pages):
    await chat.start()
    wendy = await wcp(chat, "wendy")
    alice = await join(pages, chat, "alice")
    await alice.do(lambda page: page.evaluate(
        "() => { document.querySelector('#lobby-text').value = 'half \\ud83d emoji'; }"))
    await alice.press("#lobby-text", "Enter")
    got = await until(wendy, lambda f: f["type"] == "message")
    assert (got["user_id"], got["data"]) == ("alice", "half \ufffd emoji")
    # A name, too: joined as what was sent, not refused for its encoding.
    bob = await pages.open(app_url(chat, "#lobby"))
    await bob.do(lambda page: page.evaluate(
        "() => { document.querySelector('#lobby-name').value = 'bob\\ud83d'; }"))
    await bob.press("#lobby-name", "Enter")
    joined = await until(wendy, lambda f: f["type"] == "user_joined")
    assert joined["user_id"] == "bob\ufffd"
    await bob.expect("#lobby-roster li", "to_have_text",
                     ["alice", "bob\ufffd (you)", "Wendy (wendy)"])


# --- GradAgenda beyond 2014 (issue 23): marks, roles, images and voice clips ------------


async def test_the_page_reports_and_shows_delivery_and_read_marks(chat, pages):
    await chat.start()
    bob = await login(chat, "bob")
    tab = await sign_in(pages, chat, "alice")
    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob")
    await tab.press("#ga-members", "Enter")
    session = (await bob.recv())["session-id"]
    await bob.send(message(session, "read me", cdid="b1"))
    assert (await bob.recv())["cdid"] == "b1"
    await shows(tab, "bob", "read me", GA_LAST)
    # The page, open on the session, says alice got and read it.
    with trio.fail_after(GUARD):
        while not any(m["user-id"] == "alice" and m.get("read-seq") == 1
                      for frame in bob.marks for m in frame["marks"]):
            await _next_marks(bob)
    await bob.send({"type": "request-marking-messages", "cdid": "k1", "session-id": session,
                    "read-seq": 1})
    assert (await bob.recv())["cdid"] == "k1"
    await tab.expect("#ga-session-marks", "to_have_text", "bob has read up to #1")
    # Read marks off: the page still reports delivery only.
    await tab.click("#ga-read-marks")
    await tab.expect("#ga-read-marks", "not_to_be_checked")
    await bob.send(message(session, "and this?", cdid="b2"))
    assert (await bob.recv())["cdid"] == "b2"
    with trio.fail_after(GUARD):
        while not any(m["user-id"] == "alice" and m["delivered-seq"] == 2
                      for frame in bob.marks for m in frame["marks"]):
            await _next_marks(bob)
    latest = [m for frame in bob.marks for m in frame["marks"] if m["user-id"] == "alice"][-1]
    assert "read-seq" not in latest


async def _next_marks(peer: MarksAside) -> None:
    """Wait for the next frame; marks are set aside, anything else is unexpected."""
    frame = json.loads(await peer.ws.get_message())
    assert frame["type"] == "providing-marks", frame
    peer.marks.append(frame)


async def test_owners_and_admins_manage_members_and_anyone_leaves_from_the_page(chat, pages):
    await chat.start()
    bob = await login(chat, "bob")
    tab = await sign_in(pages, chat, "alice")
    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob, carol")
    await tab.press("#ga-members", "Enter")
    await tab.expect("#ga-session-roles", "to_have_text", "Owner: alice")
    session = (await bob.recv())["session-id"]
    await tab.click("text=Manage the group")
    await tab.fill("#ga-manage-admins", "bob")
    await tab.click("#ga-manage button[type=submit]")
    got = await bob.recv()
    assert (got["user-id"], got["admin-id"]) == (["alice", "bob", "carol"], ["bob"])
    await tab.expect("#ga-session-roles", "to_have_text", "Owner: alice · Admins: bob")
    # carol, a member, has no managing form, only "Leave".
    carol = await sign_in(pages, chat, "carol")
    await carol.click("#ga-sessions button")
    await carol.expect("#ga-session-roles", "to_have_text", "Owner: alice · Admins: bob")
    await carol.expect("#ga-manage-box", "to_be_hidden")
    await carol.click("#ga-leave")
    got = await bob.recv()
    assert (got["session-id"], got["user-id"]) == (session, ["alice", "bob"])
    await carol.expect("#ga-sessions button", "to_have_count", 0)
    await tab.expect("#ga-session-members", "to_have_text", "Group members: alice (you), bob")
    # A refusal is shown: bob (admin, on his raw client) is fine, the page's
    # owner removes bob's admin role; then the member list form refuses nonsense.
    await tab.fill("#ga-manage-members", "alice, bob")
    await tab.fill("#ga-manage-admins", "dave")
    await tab.click("#ga-manage button[type=submit]")
    await tab.expect("#ga-manage-error", "to_contain_text", "dave")


async def test_the_page_sends_and_shows_images_and_voice_clips(chat, pages):
    from tests.test_gradagenda_media import download, ogg_opus, png, upload
    server = await chat.start()
    bob = await login(chat, "bob")
    tab = await sign_in(pages, chat, "alice")
    await tab.click("text=New group")
    await tab.fill("#ga-members", "bob")
    await tab.press("#ga-members", "Enter")
    session = (await bob.recv())["session-id"]
    await tab.expect("#ga-file", "to_be_enabled")
    await tab.do(lambda page: page.set_input_files("#ga-file", files=[
        {"name": "dot.png", "mimeType": "image/png", "buffer": png()}]))
    got = await bob.recv()
    sent = got["message"]
    assert (sent["type"], sent["body"], sent["width"], sent["height"]) == ("image", "dot.png", 1, 1)
    assert (await download(server.port, "bob", sent["media-id"]))[2] == png()
    await tab.expect("#ga-log img", "to_have_count", 1)
    await tab.expect("#ga-log img", "to_have_attribute", "src", re.compile(r"^blob:"))
    # bob's voice clip, uploaded over HTTP, plays on the page.
    status, answer, _ = await upload(server.port, "bob", session, ogg_opus())
    assert status == 201
    await bob.send({"type": "request-sending-a-message", "cdid": "v", "session-id": session,
                    "message": {"type": "voice", "body": "listen", "media-id": answer["media-id"],
                                "duration": 20}, "sender-timestamp": 1})
    assert (await bob.recv())["cdid"] == "v"
    await tab.expect("#ga-log audio", "to_have_count", 1)
    await tab.expect("#ga-log audio", "to_have_attribute", "src", re.compile(r"^blob:"))
