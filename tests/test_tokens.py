"""Tokens and clocks (issue #9 item 10): leeway, claims refused by name, every
failed authentication logged.

``chatd.tokens.verify`` alone first, then GradAgenda and wschat over real
connections, then the INFO line each protocol's failed authentication
leaves in the log.
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import tokens
from chatd.protocols.base import AuthFailed, Context, Send
from chatd.protocols.gradagenda import GradAgenda
from tests.conftest import JWT_SECRET, SECRET
from tests.lobby_peers import signed, socialvp, wcp, wschat

NOW = 1_800_000_000


def token(secret: str = JWT_SECRET, algorithm: str = "HS256", **claims) -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


# --- verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("claims", [
    {"sub": "alice", "exp": NOW + 60},
    {"sub": "alice", "exp": NOW + 60, "iat": NOW + 2},  # a clock 2 s ahead (issue #9)
    {"sub": "alice", "exp": NOW - 20},  # expired, within the 30 s of skew
    {"sub": "alice", "exp": NOW + 60, "nbf": NOW + 25, "iat": NOW + 29},
    {"sub": "alice", "exp": NOW + 60.5, "iat": NOW - 0.5},  # NumericDates may be fractional
])
def test_tokens_within_the_leeway_are_accepted(claims):
    assert tokens.verify(JWT_SECRET, token(**claims), require_exp=True, require_sub=True,
                         leeway=30, now=NOW) == claims


@pytest.mark.parametrize("claims, reason", [
    ({"sub": "alice", "exp": NOW - 31}, "token expired (exp 1799999969 is 31 s ago)"),
    ({"sub": "alice", "exp": str(NOW + 60)},
     "claim 'exp' must be a number of seconds since the epoch, not str '1800000060'"),
    ({"sub": "alice", "exp": NOW + 60, "iat": "yesterday"},
     "claim 'iat' must be a number of seconds since the epoch, not str 'yesterday'"),
    ({"sub": "alice", "exp": NOW + 60, "nbf": [1]},
     "claim 'nbf' must be a number of seconds since the epoch, not list [1]"),
    ({"sub": "alice", "exp": True},
     "claim 'exp' must be a number of seconds since the epoch, not bool True"),
    ({"sub": "alice", "exp": NOW + 60, "iat": NOW + 31},
     "claim 'iat' is in the future (31 s ahead, more than the 30 s allowed)"),
    ({"sub": "alice", "exp": NOW + 600, "nbf": NOW + 300},
     "token not valid yet (nbf 1800000300 is 300 s ahead, more than the 30 s allowed)"),
    ({"sub": "alice"}, "claim 'exp' is missing: the token must expire"),
    ({"exp": NOW + 60}, "claim 'sub' is missing"),
    ({"sub": 42, "exp": NOW + 60}, "claim 'sub' must be a non-empty string"),
    ({"sub": "", "exp": NOW + 60}, "claim 'sub' must be a non-empty string"),
    # Out of any calendar: 10**400 once raised OverflowError (close 1011 and
    # a traceback); 1e308 made a token that never expires.
    ({"sub": "alice", "exp": NOW + 60, "iat": 10**400},
     "claim 'iat' must be a time from 1970 to 9999 in seconds since the epoch, not "
     + repr(10**400)[:36] + "...'"),
    ({"sub": "alice", "exp": NOW + 60, "nbf": 10**400},
     "claim 'nbf' must be a time from 1970 to 9999 in seconds since the epoch, not "
     + repr(10**400)[:36] + "...'"),
    ({"sub": "alice", "exp": -10**400},
     "claim 'exp' must be a time from 1970 to 9999 in seconds since the epoch, not "
     + repr(-10**400)[:36] + "...'"),
    ({"sub": "alice", "exp": 1e308},
     "claim 'exp' must be a time from 1970 to 9999 in seconds since the epoch, not 1e+308"),
    ({"sub": "alice", "exp": 253_402_300_800},
     "claim 'exp' must be a time from 1970 to 9999 in seconds since the epoch, not 253402300800"),
    ({"sub": "alice", "exp": NOW + 60, "iat": -1},
     "claim 'iat' must be a time from 1970 to 9999 in seconds since the epoch, not -1"),
])
def test_malformed_or_expired_claims_are_refused_by_name(claims, reason):
    with pytest.raises(tokens.TokenRefused) as refused:
        tokens.verify(JWT_SECRET, token(**claims), require_exp=True, require_sub=True,
                      leeway=30, now=NOW)
    assert str(refused.value) == reason


_claim_values = st.one_of(
    st.integers(min_value=-10**500, max_value=10**500), st.floats(), st.booleans(), st.none(),
    st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["exp", "nbf", "iat", "sub"]), _claim_values))
def test_any_claim_values_are_accepted_or_refused_by_name(claims):
    try:
        tokens.verify(JWT_SECRET, token(**claims), require_exp=True, require_sub=True,
                      leeway=30, now=NOW)
    except tokens.TokenRefused as refused:
        assert str(refused).isprintable()


@pytest.mark.parametrize("bad, reason", [
    (token(secret="another secret of at least 32 bytes!", sub="a"), "signature does not verify"),
    (token(algorithm="HS512", sub="a"), "algorithm 'HS512' not accepted (HS256 only)"),
    (jwt.encode({"sub": "a"}, None, algorithm="none"), "algorithm 'none' not accepted (HS256 only)"),
    ("not.a.jwt", "not a well-formed JWT"),
    ("", "not a well-formed JWT"),
])
def test_tokens_that_do_not_verify_say_why(bad, reason):
    with pytest.raises(tokens.TokenRefused) as refused:
        tokens.verify(JWT_SECRET, bad, require_exp=False)
    assert str(refused.value) == reason


def test_without_require_exp_an_expired_token_passes_but_a_malformed_one_does_not():
    # wschat: "exp is neither required nor enforced", as in the original.
    assert tokens.verify(JWT_SECRET, token(sub="a", exp=NOW - 3600), require_exp=False, now=NOW)
    with pytest.raises(tokens.TokenRefused, match="claim 'exp' must be a number"):
        tokens.verify(JWT_SECRET, token(sub="a", exp="never"), require_exp=False, now=NOW)


def test_the_leeway_comes_from_the_context():
    ahead = json.dumps({"type": "authenticate", "cdid": "a", "user-id": "alice",
                        "device-id": "phone",
                        "token": token(sub="alice", exp=time.time() + 600, iat=time.time() + 10)})
    accepted = GradAgenda(Context(jwt_secret=JWT_SECRET, jwt_leeway=30)).receive(ahead)
    assert type(accepted[0]).__name__ == "Login"
    refused = GradAgenda(Context(jwt_secret=JWT_SECRET, jwt_leeway=0)).receive(ahead)
    assert isinstance(refused[0], AuthFailed) and "'iat' is in the future" in refused[0].reason
    assert isinstance(refused[1], Send) and b"'iat' is in the future" in refused[1].data


# --- over real connections ------------------------------------------------------------------


def authenticate(tok: str, user: str = "alice") -> dict:
    return {"type": "authenticate", "cdid": "a", "user-id": user, "device-id": "phone",
            "token": tok}


async def test_issue_9_a_token_minted_two_seconds_ahead_is_accepted(chat):
    await chat.start()
    peer = await chat.connect("/gradagenda")
    now = int(time.time())
    await peer.send(authenticate(token(sub="alice", iat=now + 2, exp=now + 3600)))
    assert await peer.recv() == {"type": "status-response", "status": "succeeded", "cdid": "a"}


@pytest.mark.parametrize("claims, says", [
    ({"sub": "alice", "exp": "4102444800"}, "claim 'exp' must be a number"),
    ({"sub": "alice", "exp": 1_000_000_000}, "token expired (exp 1000000000"),
    ({"sub": "bob", "exp": 4_102_444_800}, "its 'sub' 'bob' is not this user-id"),
    ({"exp": 4_102_444_800}, "claim 'sub' is missing"),
    ({"sub": "alice", "exp": 4_102_444_800, "iat": 10**400}, "claim 'iat' must be a time"),
])
async def test_gradagenda_refusals_name_the_claim(chat, claims, says):
    await chat.start()
    peer = await chat.connect("/gradagenda")
    await peer.send(authenticate(token(**claims)))
    answer = await peer.recv()
    assert answer["status"] == "failed" and answer["message"].startswith("token refused: ")
    assert says in answer["message"], answer


async def test_wschat_accepts_a_token_from_a_clock_ahead_and_drops_a_malformed_one(chat):
    await chat.start()
    ann = await wschat(chat)
    now = int(time.time())
    await ann.send({"usr": "ann", "msg": "bad", "jwt": token(sub="ann", iat="now")})
    await ann.send({"usr": "ann", "msg": "ahead", "jwt": token(sub="ann", iat=now + 2)})
    assert (await ann.recv())["msg"] == "ahead"  # "bad" was dropped: no echo


# --- every failed authentication is logged at INFO with user, reason and peer -------------


def auth_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "chatd.connection" and "authentication failed" in r.getMessage()
            and r.levelname == "INFO"]


async def test_gradagenda_failures_are_logged(chat, caplog):
    caplog.set_level("INFO", logger="chatd")
    await chat.start()
    peer = await chat.connect("/gradagenda")
    await peer.send(authenticate(token(sub="alice", exp="soon")))
    assert (await peer.recv())["status"] == "failed"
    [line] = auth_failures(caplog)
    assert line.startswith("127.0.0.1:") and line.endswith(
        " authentication failed on /gradagenda: user 'alice': token refused: claim 'exp' must "
        "be a number of seconds since the epoch, not str 'soon'")


async def test_multichat_failures_are_logged(chat, caplog):
    caplog.set_level("INFO", logger="chatd")
    await chat.start()
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": "bridge", "secret-key": "guess"})
    assert await peer.closed() == 1008
    assert auth_failures(caplog)[0].endswith(
        " authentication failed on /multichat: user 'bridge': wrong secret-key")
    await chat.multichat("bridge")
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": "Bridge", "secret-key": SECRET})
    assert await peer.closed() == 1008
    assert auth_failures(caplog)[1].endswith(": user 'Bridge': client-name already in use")


async def test_socialvp_refused_identify_is_logged(chat, caplog):
    caplog.set_level("INFO", logger="chatd")
    await chat.start()
    await socialvp(chat, "sam")
    peer = await chat.connect("/socialvp")
    await peer.recv()
    await peer.send({"command": "identify", "name": "s\u0430m"})
    assert (await peer.recv())["code"] == 305
    await peer.send({"command": "identify", "name": "sam\u200b"})
    assert (await peer.recv())["code"] == 400
    assert [line.split(" ", 1)[1] for line in auth_failures(caplog)] == [
        "authentication failed on /socialvp: user 's\u0430m': name already in use",
        "authentication failed on /socialvp: user 'sam\\u200b': name contains an invisible or "
        "formatting character (U+200B ZERO WIDTH SPACE)",
    ]


async def test_wcp_refused_join_is_logged(chat, caplog):
    caplog.set_level("INFO", logger="chatd")
    await chat.start()
    await wcp(chat, "wendy")
    peer = await chat.connect("/wcp")
    await peer.send({"type": "user_joined", "user_id": "WENDY", "display_name": "W"})
    assert (await peer.recv())["message"] == "user_id already in use"
    [line] = auth_failures(caplog)
    assert line.endswith(" authentication failed on /wcp: user 'WENDY': user_id already in use")


async def test_wschat_messages_with_a_bad_token_are_logged(chat, caplog):
    caplog.set_level("INFO", logger="chatd")
    await chat.start()
    ann = await wschat(chat)
    await ann.send({"usr": "ann", "msg": "x", "jwt": token(secret="not the server's secret!!!!!!!!",
                                                           sub="ann")})
    await ann.send(signed("ann", "y"))
    assert (await ann.recv())["msg"] == "y"
    [line] = auth_failures(caplog)
    assert line.endswith(" authentication failed on /wschat: user 'ann': jwt refused: "
                         "signature does not verify: message dropped")
