"""The server API and moderation (issue 22) against a real server and real
clients of every protocol."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionRejected

from chatd.config import default_config
from tests.api_helpers import KEY, api, post
from tests.conftest import GUARD, JWT_SECRET, SECRET
from tests.lobby_peers import INIT, signed, socialvp, wcp, wschat
from tests.test_gradagenda import auth, create, login, message


def config(tmp_path, **extra):
    config = default_config()
    config.secret_key = SECRET
    config.jwt_secret = JWT_SECRET
    config.api_key = KEY
    config.store = str(tmp_path / "chatd.db")
    for key, value in extra.items():
        setattr(config, key, value)
    return config


async def start(chat, tmp_path, **extra):
    server = await chat.start(config(tmp_path, **extra))
    return server.port


async def refused_handshake(chat, path: str) -> int:
    try:
        await chat.connect(path)
    except ConnectionRejected as exc:
        return exc.status_code
    raise AssertionError("the handshake was accepted")


# --- the key ---------------------------------------------------------------------


async def test_missing_and_wrong_keys_get_401_then_429_and_are_counted(chat, tmp_path, caplog):
    port = await start(chat, tmp_path)
    answer = await api(port, "info", {}, key=None, status=401)
    assert "API key" in answer["error"]
    got, answer, headers = await trio.to_thread.run_sync(lambda: post(port, "info", {},
                                                                      key="wrong"))
    assert got == 401 and answer == {"error": "wrong API key"}
    assert headers["WWW-Authenticate"].startswith("Bearer")
    # The right key still works, in either header.
    assert (await api(port, "info", {}))["node"]
    await api(port, "info", {}, key=None, headers={"X-API-Key": KEY})
    statuses = [(await api(port, "info", {}, key=f"wrong{i}", status=None)) for i in range(12)]
    got, answer, headers = await trio.to_thread.run_sync(lambda: post(port, "info", {}))
    assert got == 429 and "Retry-After" in headers, answer  # even the right key, now
    assert any("too many" in s["error"] for s in statuses)
    metrics = chat.server.metrics.exposition().decode()
    assert 'chatd_api_auth_failures_total{reason="missing"} 1.0' in metrics
    assert 'chatd_api_auth_failures_total{reason="wrong"}' in metrics
    assert 'chatd_api_auth_failures_total{reason="limited"}' in metrics
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "wrong API key from 127.0.0.1" in logged
    assert KEY not in logged and "wrong1" not in logged  # keys, right or wrong, are never logged


async def test_wrong_keys_are_limited_per_ipv6_64_not_per_address(chat, tmp_path, caplog):
    """One IPv6 host is commonly given a whole /64: counted per address,
    it had 2**64 fresh buckets of wrong keys (and could push every other
    address's bucket out of the bounded table). The logs' per-address
    bound already counts IPv6 by /64 (chatd.logs.address_key). A client
    named without a port (behind a proxy: ``[2001:db8::1:1]``) was read as
    the text before its last colon, ``2001:db8::1``: another address."""
    port = await start(chat, tmp_path, trusted_proxies=["127.0.0.1"])

    def wrong(address: str) -> int:
        return post(port, "info", {}, key="wrong", headers={"X-Forwarded-For": address})[0]

    statuses = [await trio.to_thread.run_sync(wrong, f"2001:db8::{i:x}:1") for i in range(1, 12)]
    assert statuses[:10] == [401] * 10 and statuses[10] == 429, statuses
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "wrong API key from 2001:db8::1:1\n" in logged + "\n", logged
    # Another /64, and an IPv4 client, have their own.
    assert await trio.to_thread.run_sync(wrong, "2001:db8:0:1::1") == 401
    assert await trio.to_thread.run_sync(wrong, "203.0.113.7") == 401
    # The mapped spelling of that IPv4 client is the same client.
    for _ in range(9):
        await trio.to_thread.run_sync(wrong, "::ffff:203.0.113.7")
    assert await trio.to_thread.run_sync(wrong, "203.0.113.7") == 429


async def test_the_api_is_off_without_a_key_and_generated_on_the_default(chat, tmp_path):
    port = await start(chat, tmp_path, api_key=False)
    got, _, _ = await trio.to_thread.run_sync(lambda: post(port, "info", {}))
    assert got == 405  # no API: the listener serves GET only
    chat.server.shutdown()
    await chat.server.stopped.wait()
    server = await chat.start(config(tmp_path, api_key=None))
    from chatd.store import read_setting
    key = read_setting(server.config.store, "api-key")
    assert key and (await api(server.port, "info", {}, key=key))["connections"]["total"] == 0


async def test_bad_requests_get_conventional_statuses(chat, tmp_path):
    port = await start(chat, tmp_path)
    assert (await api(port, "nope", {}, status=404))["error"].startswith("no API method")
    await api(port, "info", None, verb="GET", status=405)
    assert "not JSON" in (await api(port, "ban", raw=b"{nope", status=400))["error"]
    assert "exactly one" in (await api(port, "ban", {"name": "a", "user": "b"},
                                       status=400))["error"]
    assert "unknown field" in (await api(port, "ban", {"nam": "a"}, status=400))["error"]
    assert (await api(port, "ban", {"address": "300.1.1.1"}, status=400))["error"]
    await api(port, "ban", raw=b"x" * 70_000, status=413)
    assert (await api(port, "unban", {"name": "nobody"}, status=404))["error"]


# Numbers past what the store's INTEGER holds (2**63 - 1) used to reach it:
# the store job raised, and the store refused every write until a restart.
_TOO_BIG = [("history", "before", 2**63), ("history", "after", 2**64 - 1),
            ("history", "before", -1), ("delete-message", "seq", 2**63),
            ("retention", "count", 2**63), ("retention", "age", 1e300),
            ("retention", "age", 1e16)]


@pytest.mark.parametrize("method, field, value", _TOO_BIG)
async def test_a_number_the_store_cannot_hold_is_400_and_the_store_keeps_working(
        chat, tmp_path, method, field, value):
    port = await start(chat, tmp_path)
    alice = await login(chat, "alice")
    session = (await create(alice, "bob"))["session-id"]
    body = {"session": session, "seq": 1} if method == "delete-message" else {"session": session}
    answer = await api(port, method, {**body, field: value}, status=400)
    assert field in answer["error"], answer
    await send_all(alice, session, "still stored")
    assert (await api(port, "ban", {"name": "mallory"}))["name"] == "mallory"


@pytest.mark.parametrize("key, value", [("retention-count", 2**63), ("retention-age", 1e300)])
def test_a_retention_the_store_cannot_hold_is_refused_naming_the_key(key, value):
    import json as _json

    from chatd.config import ConfigError, decode_config

    with pytest.raises(ConfigError, match=key):
        decode_config(_json.dumps({key: value}))


# --- publish ---------------------------------------------------------------------


async def test_a_notice_reaches_all_five_protocols_from_a_name_nobody_can_hold(chat, tmp_path):
    port = await start(chat, tmp_path)
    ws = await wschat(chat)
    w = await wcp(chat, "wendy")
    mc = await chat.multichat("bridge")
    svp = await socialvp(chat, "sam")
    assert (await w.recv())["user_id"] == "bridge"
    assert (await w.recv())["user_id"] == "sam"
    ga = await login(chat, "alice")
    bob = await login(chat, "bob", "laptop")
    info = await create(ga, "bob")
    assert (await bob.recv())["session-id"] == info["session-id"]
    answer = await api(port, "publish", {"room": "lobby", "text": "maintenance at 10"})
    assert answer == {"room": "lobby", "sender": "chatd", "delivered": 4}
    assert await mc.recv() == {"action": "forwarding-message", "source-client-name": "chatd",
                               "content": "maintenance at 10"}
    assert await svp.recv() == {"type": "broadcast", "from": "chatd",
                                "message": "maintenance at 10"}
    frame = await ws.recv()
    assert (frame["usr"], frame["msg"]) == ("chatd", "maintenance at 10")
    frame = await w.recv()
    assert (frame["type"], frame["user_id"], frame["data"]) == ("message", "chatd",
                                                                "maintenance at 10")
    session = info["session-id"]
    stored = await api(port, "publish", {"session": session, "text": "hello members"})
    assert stored["seq"] == 1 and stored["sender"] == "chatd"
    for peer in (ga, bob):
        frame = await peer.recv()
        assert frame["type"] == "message-broadcast" and frame["sender-id"] == "chatd"
        assert frame["message"] == {"type": "text", "body": "hello members"}
        assert frame["seq"] == 1
    history = await api(port, "history", {"session": session})
    assert [m["message"]["body"] for m in history["messages"]] == ["hello members"]
    # Nobody can take the notice sender's name, or one like it.
    other = await chat.connect("/socialvp")
    assert await other.recv() == INIT
    await other.send({"command": "identify", "name": "ChatD"})
    assert (await other.recv())["code"] == 305
    await api(port, "publish", {"session": "mutable-nope", "text": "x"}, status=404)


# --- ban -------------------------------------------------------------------------


async def test_a_name_ban_refuses_the_name_and_its_look_alikes_in_every_protocol(chat, tmp_path):
    port = await start(chat, tmp_path)
    held = await socialvp(chat, "mallory")
    bystander = await wcp(chat, "wendy")
    answer = await api(port, "ban", {"name": "Mallory", "reason": "spam", "duration": 3600})
    assert answer["name"] == "Mallory" and answer["disconnected"] == 1
    assert answer["reason"] == "spam" and answer["expires"] > answer["created"]
    # The connected holder gets socialvp's refusal and a close 1008.
    assert await held.recv() == {"type": "outcome", "success": False, "code": 403,
                                 "message": "Banned: spam!"}
    assert await held.closed() == 1008
    for name in ("mallory", "MALLORY", "mаllory"):  # the last with a Cyrillic a
        peer = await chat.connect("/socialvp")
        assert await peer.recv() == INIT
        await peer.send({"command": "identify", "name": name})
        assert await peer.recv() == {"type": "outcome", "success": False, "code": 403,
                                     "message": "Banned: spam!"}
        assert await peer.closed() == 1008
    peer = await chat.connect("/wcp")
    await peer.send({"type": "user_joined", "user_id": "ma11ory", "display_name": "M"})
    assert await peer.recv() == {"type": "error", "message": "banned: spam"}
    assert await peer.closed() == 1008
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": "Mallory", "secret-key": SECRET})
    assert await peer.closed() == 1008
    peer = await chat.connect("/wschat")
    await peer.send(signed("mallory", "hi"))
    assert await peer.closed() == 1008
    peer = await chat.connect("/gradagenda")
    await peer.send(auth("mallory"))
    assert await peer.recv() == {"type": "status-response", "cdid": "auth", "status": "failed",
                                 "message": "banned: spam"}
    assert await peer.closed() == 1008
    # Nothing of theirs reached the room; others are unaffected.
    await socialvp(chat, "sam")
    assert await bystander.recv() == {"type": "user_left", "user_id": "mallory"}
    assert (await bystander.recv())["user_id"] == "sam"
    bans = await api(port, "bans", {})
    assert [b["name"] for b in bans["bans"]] == ["Mallory"]
    metrics = chat.server.metrics.exposition().decode()
    assert 'chatd_moderation_actions_total{method="ban"} 1.0' in metrics
    assert 'chatd_moderation_refused_total{protocol="socialvp",rule="ban"} 3.0' in metrics
    await api(port, "unban", {"name": "mallory"})
    await socialvp(chat, "mаllory")
    assert (await api(port, "bans", {}))["bans"] == []


async def test_an_address_ban_refuses_the_handshake_and_closes_its_connections(chat, tmp_path):
    port = await start(chat, tmp_path)
    w = await wcp(chat, "wendy")
    ws = await wschat(chat)
    answer = await api(port, "ban", {"address": "127.0.0.0/8", "reason": "flood"})
    assert answer["address"] == "127.0.0.0/8" and answer["disconnected"] == 2
    assert await w.closed() == 1008
    assert await ws.closed() == 1008
    for path in ("/wcp", "/wschat", "/multichat", "/socialvp", "/gradagenda"):
        assert await refused_handshake(chat, path) == 403
    # The API itself still answers (the operator is not locked out).
    lifted = await api(port, "unban", {"id": answer["id"]})
    assert lifted["lifted"][0]["address"] == "127.0.0.0/8"
    await wcp(chat, "wendy")


@pytest.mark.parametrize("written, stored", [
    ("::ffff:127.0.0.1", "127.0.0.1/32"),
    ("::ffff:7f00:1", "127.0.0.1/32"),
    ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
    ("0:0:0:0:0:ffff:127.0.0.1/128", "127.0.0.1/32"),
])
async def test_an_ipv4_mapped_address_ban_is_the_ipv4_ban(chat, tmp_path, written, stored):
    """A dual-stack listener shows an IPv4 client as ::ffff:a.b.c.d; a ban
    written that way was kept as an IPv6 network that no client (read as
    IPv4) ever matched."""
    port = await start(chat, tmp_path)
    w = await wcp(chat, "wendy")
    answer = await api(port, "ban", {"address": written, "reason": "flood"})
    assert answer["address"] == stored and answer["disconnected"] == 1
    assert await w.closed() == 1008
    assert await refused_handshake(chat, "/wcp") == 403
    await api(port, "disconnect", {"address": written})
    assert (await api(port, "unban", {"address": written}))["lifted"][0]["id"] == answer["id"]
    await wcp(chat, "wendy")


async def test_a_user_ban_refuses_a_gradagenda_login_and_survives_a_restart(chat, tmp_path):
    port = await start(chat, tmp_path)
    alice = await login(chat, "alice")
    answer = await api(port, "ban", {"user": "alice", "reason": "abuse"})
    assert answer["disconnected"] == 1
    assert await alice.closed() == 1008
    chat.server.shutdown()
    await chat.server.stopped.wait()
    server = await chat.start(config(tmp_path))
    peer = await chat.connect("/gradagenda")
    await peer.send(auth("alice", cdid="again"))
    assert await peer.recv() == {"type": "status-response", "cdid": "again", "status": "failed",
                                 "message": "banned: abuse"}
    assert await peer.closed() == 1008
    assert [b["user"] for b in (await api(server.port, "bans", {}))["bans"]] == ["alice"]
    await login(chat, "bob")


async def test_a_ban_with_a_duration_ends_by_itself(chat, tmp_path):
    port = await start(chat, tmp_path)
    answer = await api(port, "ban", {"name": "eve", "duration": 0.2})
    with trio.fail_after(GUARD):
        while (await api(port, "bans", {}))["bans"]:
            await trio.sleep(0.05)  # waiting for the expiry itself, not a stand-in
    assert round(answer["expires"] - answer["created"], 3) == 0.2
    await socialvp(chat, "eve")


# --- mute ------------------------------------------------------------------------


async def test_a_muted_client_reads_but_gets_its_error_and_nothing_reaches_the_room(
        chat, tmp_path):
    port = await start(chat, tmp_path)
    listener = await socialvp(chat, "sam")
    w = await wcp(chat, "wendy")
    mc = await chat.multichat("bridge")
    assert (await w.recv())["user_id"] == "bridge"
    await api(port, "mute", {"name": "wendy", "room": "lobby", "reason": "calm down"})
    await api(port, "mute", {"name": "bridge", "room": "lobby"})
    await api(port, "mute", {"name": "sam"})
    await w.send({"type": "message", "data": "spam"})
    assert await w.recv() == {"type": "error", "message": "muted: calm down"}
    await listener.send({"command": "broadcast", "message": "spam"})
    assert await listener.recv() == {"type": "outcome", "success": False, "code": 403,
                                     "message": "You are muted in this room!"}
    await mc.send({"action": "client-message", "content": "spam"})  # dropped, counted
    ws = await wschat(chat)
    await api(port, "mute", {"name": "wes", "room": "lobby"})
    await ws.send(signed("wes", "spam"))  # dropped, counted: no echo, nobody gets it
    # Muted clients still read: a notice reaches them; no spam came before it.
    await api(port, "publish", {"room": "lobby", "text": "calm"})
    assert (await w.recv())["data"] == "calm"
    assert (await listener.recv())["message"] == "calm"
    assert (await mc.recv())["content"] == "calm"
    assert (await ws.recv())["msg"] == "calm"  # the notice, and no echo of "spam" before it
    metrics = chat.server.metrics.exposition().decode()
    assert 'chatd_moderation_refused_total{protocol="multichat",rule="mute"} 1.0' in metrics
    assert 'chatd_moderation_refused_total{protocol="wschat",rule="mute"} 1.0' in metrics
    mutes = await api(port, "mutes", {})
    assert sorted(m["name"] for m in mutes["mutes"]) == ["bridge", "sam", "wendy", "wes"]
    await api(port, "unmute", {"name": "wendy", "room": "lobby"})
    await w.send({"type": "message", "data": "sorry"})
    assert (await mc.recv())["content"] == "sorry"


async def test_a_muted_gradagenda_user_gets_a_failed_status_and_members_get_nothing(
        chat, tmp_path):
    port = await start(chat, tmp_path)
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    await api(port, "mute", {"user": "alice", "room": session, "reason": "off-topic"})
    await alice.send(message(session, "noise", cdid="m1"))
    assert await alice.recv() == {"type": "status-response", "cdid": "m1", "status": "failed",
                                  "message": "muted: off-topic"}
    await bob.send(message(session, "fine", cdid="m2"))
    frame = await alice.recv()
    assert frame["message"]["body"] == "fine" and frame["seq"] == 1


# --- disconnect, presence, info ---------------------------------------------------


async def test_disconnect_presence_and_info(chat, tmp_path):
    port = await start(chat, tmp_path)
    w = await wcp(chat, "wendy")
    svp = await socialvp(chat, "sam")
    phone = await login(chat, "alice", "phone")
    presence = await api(port, "presence", {"room": "lobby"})
    who = {c["name"]: c for c in presence["clients"]}
    assert set(who) == {"wendy", "sam"}
    assert who["wendy"]["protocol"] == "wcp" and who["wendy"]["address"].startswith("127.0.0.1:")
    assert who["wendy"]["since"] > 0 and who["wendy"]["node"]
    info = await api(port, "info", {})
    assert info["connections"]["protocols"] == {"gradagenda": 1, "socialvp": 1, "wcp": 1}
    assert info["connections"]["endpoints"]["/wcp"] == 1
    assert info["store"]["state"] == "ok" and info["broker"]["kind"] == "local"
    answer = await api(port, "disconnect", {"name": "Wendy", "code": 4001, "reason": "bye"})
    assert answer == {"disconnected": 1}
    assert await w.closed() == 4001
    assert await svp.recv() == {"type": "quit", "who": "wendy"}
    assert await api(port, "disconnect", {"device": "phone"}) == {"disconnected": 1}
    assert await phone.closed() == 1008
    await api(port, "disconnect", {"name": "sam", "code": 1006}, status=400)
    mc = await chat.multichat("bridge")
    ws = await wschat(chat)
    answer = await api(port, "disconnect", {"address": "127.0.0.1", "reason": "maintenance"})
    assert answer == {"disconnected": 3}
    for peer in (svp, mc, ws):
        assert await peer.closed() == 1008


# --- GradAgenda history, deletion, erasure, retention ------------------------------


async def send_all(peer, session: str, *bodies: str) -> None:
    for index, body in enumerate(bodies):
        await peer.send(message(session, body, cdid=f"s{index}"))
        assert (await peer.recv())["message"]["body"] == body


async def test_history_delete_message_and_erase_user(chat, tmp_path):
    port = await start(chat, tmp_path)
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    shared = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    alone = (await create(bob, cdid="c2"))["session-id"]
    await send_all(bob, shared, "b1", "b2")
    for _ in range(2):
        await alice.recv()
    await send_all(alice, shared, "a1")
    await bob.recv()
    await send_all(bob, alone, "note")
    history = await api(port, "history", {"session": shared})
    assert [(m["seq"], m["sender-id"]) for m in history["messages"]] == [
        (1, "bob"), (2, "bob"), (3, "alice")]
    await api(port, "delete-message", {"session": shared, "seq": 1})
    await api(port, "delete-message", {"session": shared, "seq": 1}, status=404)
    answer = await api(port, "erase-user", {"user": "bob"})
    # b1 was deleted already; "note" went with the session bob alone was in.
    assert answer == {"user": "bob", "messages": 1, "sessions-left": 1, "sessions-deleted": 1,
                      "direct-sessions-emptied": 0}
    info = await alice.recv()
    assert info["type"] == "providing-session-info" and info["user-id"] == ["alice"]
    history = await api(port, "history", {"session": shared})
    assert [(m["seq"], m["sender-id"]) for m in history["messages"]] == [(3, "alice")]
    await api(port, "history", {"session": alone}, status=404)
    # The newest message is blanked, never removed: its seq is not reused.
    await api(port, "delete-message", {"session": shared, "seq": 3})
    history = await api(port, "history", {"session": shared})
    assert history["messages"][0]["message"] == {"type": "deleted", "body": ""}
    await alice.send(message(shared, "next", cdid="n"))
    assert (await alice.recv())["seq"] == 4


async def test_erase_user_empties_a_direct_session_and_its_seq_goes_on(chat, tmp_path):
    """erase-user said a direct session was deleted, but a direct session
    cannot be deleted (its id is made of the pair, so a new one would hand
    out its seqs again): it stayed, with the other side's messages the
    docs say go with it. Now both sides' messages go, the newest blanked,
    and the session's seq goes on."""
    from tests.test_gradagenda import direct

    port = await start(chat, tmp_path)
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session = (await direct(alice, "bob"))["session-id"]
    await send_all(alice, session, "a1", "a2")
    for _ in range(2):
        await bob.recv()
    await send_all(bob, session, "b1", "b2")
    answer = await api(port, "erase-user", {"user": "alice"})
    assert answer == {"user": "alice", "messages": 2, "sessions-left": 0, "sessions-deleted": 0,
                      "direct-sessions-emptied": 1}
    history = await api(port, "history", {"session": session})
    assert [(m["seq"], m["sender-id"], m["message"]) for m in history["messages"]] == [
        (4, "chatd", {"type": "deleted", "body": ""})]
    await bob.send(message(session, "after", cdid="n"))
    assert (await bob.recv())["seq"] == 5


@pytest.mark.parametrize("remove", ["delete-message", "retention"])
async def test_messages_the_operator_removes_no_longer_count_against_the_sender(
        chat, tmp_path, remove):
    """max-messages-per-user-per-session counts what a user has stored; the
    count kept in memory was not told of the operator's removals, so the
    user stayed refused until a restart recounted (and then was not)."""
    port = await start(chat, tmp_path, max_messages_per_user_per_session=2)
    alice = await login(chat, "alice")
    session = (await create(alice, "bob"))["session-id"]
    await send_all(alice, session, "a1", "a2")
    await alice.send(message(session, "a3", cdid="over"))
    refused = await alice.recv()
    assert refused["status"] == "failed" and "max-messages" in refused["message"], refused
    if remove == "delete-message":
        await api(port, "delete-message", {"session": session, "seq": 1})
    else:
        await api(port, "retention", {"session": session, "count": 1, "prune": True})
    await alice.send(message(session, "again", cdid="again"))
    answer = await alice.recv()
    assert answer["type"] == "message-broadcast" and answer["message"]["body"] == "again", \
        answer


async def test_retention_prunes_by_count_and_age(chat, tmp_path):
    port = await start(chat, tmp_path, retention_count=3)
    alice = await login(chat, "alice")
    kept = (await create(alice))["session-id"]
    short = (await create(alice, cdid="c2"))["session-id"]
    await send_all(alice, kept, *[f"k{i}" for i in range(5)])
    await send_all(alice, short, *[f"s{i}" for i in range(5)])
    answer = await api(port, "retention", {"session": short, "count": 1})
    assert answer == {"session": short, "count": 1, "age": None}
    pruned = await api(port, "retention", {"prune": True})
    assert pruned["pruned"] == 2 + 4
    kept_history = await api(port, "history", {"session": kept})
    assert [m["message"]["body"] for m in kept_history["messages"]] == ["k2", "k3", "k4"]
    short_history = await api(port, "history", {"session": short})
    assert [m["seq"] for m in short_history["messages"]] == [5]
    metrics = chat.server.metrics.exposition().decode()
    assert "chatd_retention_pruned_messages_total 6.0" in metrics


async def test_retention_by_age_is_pruned_in_the_background(chat, tmp_path):
    port = await start(chat, tmp_path, retention_age=0.001, retention_interval=0.1)
    alice = await login(chat, "alice")
    session = (await create(alice))["session-id"]
    await send_all(alice, session, "old", "older", "newest")
    with trio.fail_after(GUARD):  # the background pruner (retention-interval)
        while len((await api(port, "history", {"session": session}))["messages"]) > 1:
            await trio.sleep(0.05)  # waiting for the pruner's pass itself
    history = await api(port, "history", {"session": session})
    assert [m["message"]["body"] for m in history["messages"]] == ["newest"]


# --- chatd admin -------------------------------------------------------------------


def test_chatd_admin_reads_address_and_key_from_the_config(process, tmp_path):
    import json as _json

    from tests.test_cli import chatd

    config = tmp_path / "config.json"
    config.write_text(_json.dumps({
        "host": "127.0.0.1:0", "store": str(tmp_path / "chatd.db"), "api-key": None,
        "endpoints": [{"path": "/socialvp", "protocol": "socialvp"}]}))
    server = process("serve", "--config", str(config)).start()
    assert KEY not in server.output()
    config.write_text(_json.dumps({
        "host": f"127.0.0.1:{server.port}", "store": str(tmp_path / "chatd.db"), "api-key": None,
        "endpoints": [{"path": "/socialvp", "protocol": "socialvp"}]}))
    key = chatd("admin", "key", "--config", str(config), cwd=tmp_path)
    assert key.returncode == 0 and key.stdout.strip()
    assert key.stdout.strip() not in server.output()  # the key is never logged
    done = chatd("admin", "ban", "name=12345", "duration=60", "reason=spam", "--config",
                 str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answer = _json.loads(done.stdout)
    assert answer["name"] == "12345" and answer["reason"] == "spam"
    listed = chatd("admin", "bans", "--config", str(config), cwd=tmp_path)
    assert [b["name"] for b in _json.loads(listed.stdout)["bans"]] == ["12345"]
    wrong = chatd("admin", "unban", "name=nobody", "--config", str(config), cwd=tmp_path)
    assert wrong.returncode == 1
    assert wrong.stderr == "chatd: admin unban: 404 unban: no such ban\n"
    bad = chatd("admin", "ban", "oops", "--config", str(config), cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr == "chatd: admin ban: 'oops' is not FIELD=VALUE\n"
    # The audit trail: once per action, with whom, why and from where.
    audit = [line for line in server.output().splitlines() if "chatd.audit" in line
             or "ban name" in line]
    assert len(audit) == 1 and "'12345'" in audit[0] and "spam" in audit[0]
    assert "127.0.0.1" in audit[0]
    server.stop()
    down = chatd("admin", "info", "--config", str(config), cwd=tmp_path)
    assert down.returncode == 1 and "cannot reach the server API" in down.stderr
    assert len(down.stderr.splitlines()) == 1


# --- the config keys, and the decode boundary --------------------------------------


@pytest.mark.parametrize("value, says", [
    (True, "api-key true is not a key"),
    ("", "api-key is empty"),
    ("change me", "placeholder"),
    ("********", "mask"),
    # A key no HTTP header carries as it is: never matched (h11 strips the
    # spaces round a value, a newline cannot be sent, a client's UTF-8 is
    # read as Latin-1), and chatd admin died with a traceback quoting it.
    ("k-0123456789abcdef\n", "printable ASCII"),
    ("k-0123456789abcdef ", "printable ASCII"),
    (" k-0123456789abcdef", "printable ASCII"),
    ("k-0123456789abcdéf", "printable ASCII"),
])
def test_an_unusable_api_key_is_refused_naming_the_key(value, says):
    import json as _json

    from chatd.config import ConfigError, decode_config

    with pytest.raises(ConfigError, match=says):
        decode_config(_json.dumps({"api-key": value}))


def test_check_config_hides_the_api_key_and_shows_off_and_generated():
    from chatd.config import REDACTED, decode_config, effective_config

    assert effective_config(decode_config('{"api-key": "k-0123456789abcdef"}'))["api-key"] \
        == REDACTED
    assert effective_config(decode_config("{}"))["api-key"] is False
    assert effective_config(decode_config('{"api-key": null}'))["api-key"] is None
    with pytest.raises(Exception, match="retention-count"):
        decode_config('{"retention-count": 0}')


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_fields = st.sampled_from(["name", "user", "address", "device", "room", "session", "text",
                           "duration", "reason", "code", "id", "seq", "limit", "count", "age",
                           "prune", "before", "after"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["publish", "presence", "info", "disconnect", "ban", "unban", "bans",
                        "mute", "unmute", "mutes", "history", "delete-message", "erase-user",
                        "retention", "activity"]),
       st.dictionaries(_fields, _json_values, max_size=5))
def test_any_body_is_a_4xx_answer_or_accepted_never_a_crash(method, body):
    """The API's decode boundary: whatever JSON a caller sends, decoding and
    the target checks raise only what becomes a 400."""
    import msgspec

    from chatd import api as api_module

    kinds = {"publish": api_module.PublishIn, "presence": api_module.PresenceIn,
             "info": api_module.InfoIn, "disconnect": api_module.DisconnectIn,
             "ban": api_module.BanIn, "unban": api_module.LiftIn, "bans": api_module.ListIn,
             "mute": api_module.MuteIn, "unmute": api_module.LiftIn,
             "mutes": api_module.ListIn, "history": api_module.HistoryIn,
             "delete-message": api_module.DeleteMessageIn,
             "erase-user": api_module.EraseUserIn, "retention": api_module.RetentionIn,
             "activity": api_module.ListIn}
    try:
        decoded = msgspec.json.decode(msgspec.json.encode(body), type=kinds[method])
    except msgspec.ValidationError:
        return
    if isinstance(decoded, api_module._Target):
        allowed = ("name", "user", "device", "address") if method == "disconnect" \
            else api_module.TARGETS
        try:
            api_module._target(decoded, allowed)
        except api_module.ApiError as exc:
            assert exc.status == 400


async def test_a_ban_survives_kill_9(process, tmp_path):
    import json as _json
    import signal

    from tests.conftest import open_websocket_url

    config = tmp_path / "config.json"
    config.write_text(_json.dumps({
        "host": "127.0.0.1:0", "store": str(tmp_path / "chatd.db"), "api-key": KEY,
        "endpoints": [{"path": "/socialvp", "protocol": "socialvp"}]}))
    server = process("serve", "--config", str(config)).start()
    answer = await api(server.port, "ban", {"name": "mallory", "reason": "spam"})
    assert answer["name"] == "mallory"  # answered once committed
    server.stop(signal.SIGKILL)
    server.start()
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/socialvp") as ws:
        assert await ws.get_message()  # init
        await ws.send_message(_json.dumps({"command": "identify", "name": "Mallory"}))
        refusal = _json.loads(await ws.get_message())
    assert refusal == {"type": "outcome", "success": False, "code": 403, "message": "Banned: spam!"}


async def test_with_admin_host_the_api_and_page_move_there(chat, tmp_path):
    from tests.test_http import get, http

    server = await chat.start(config(tmp_path, admin_host="127.0.0.1:0"))
    admin = server.admin_ports[0]
    assert (await api(admin, "info", {}))["connections"]["total"] == 0
    assert (await http(admin, get("/admin/")))[0] == 200
    got, _, _ = await trio.to_thread.run_sync(lambda: post(server.port, "info", {}))
    assert got == 405  # the public listener serves no API
    assert (await http(server.port, get("/admin/")))[0] == 404


@pytest.mark.parametrize("admin_host", [None, "127.0.0.1:0"])
async def test_the_admin_page_is_not_served_as_a_web_client_file(chat, tmp_path, admin_host):
    """The admin page lives at /admin/ on the API's listener only: under
    /app/ it was served on the public listener too (admin-host or not)."""
    from tests.test_http import get, http

    server = await chat.start(config(tmp_path, admin_host=admin_host))
    for name in ("admin.html", "admin.js", "admin.css"):
        assert (await http(server.port, get(f"/app/{name}")))[0] == 404, name
    assert (await http(server.port, get("/app/app.js")))[0] == 200
    where = server.admin_ports[0] if admin_host else server.port
    assert (await http(where, get("/admin/admin.js")))[0] == 200


async def test_the_notice_senders_name_cannot_log_in_to_gradagenda(chat, tmp_path):
    await start(chat, tmp_path)
    peer = await chat.connect("/gradagenda")
    await peer.send(auth("chatd"))
    answer = await peer.recv()
    assert answer["status"] == "failed" and "reserved" in answer["message"]
    assert await peer.closed() == 1008
