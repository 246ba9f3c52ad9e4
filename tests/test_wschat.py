"""wschat end to end against a real server."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

from chatd.protocols.wschat import rfc3339_ns
from chatd.tokens import mint
from tests.conftest import JWT_SECRET
from tests.lobby_peers import signed, wschat

TIM = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


def without_tim(frame: dict) -> dict:
    assert TIM.match(frame["tim"]), frame
    return {k: v for k, v in frame.items() if k != "tim"}


async def test_message_is_stamped_and_reaches_everyone_sender_included(chat):
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send({"usr": "ann", "msg": "hello"})
    echo = await talker.recv()
    heard = await listener.recv()
    assert echo == heard
    assert without_tim(echo) == {"usr": "ann", "msg": "hello"}
    stamped = datetime.strptime(echo["tim"][:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamped.year >= 2024  # a real UTC date, not an epoch offset


async def test_listener_who_never_sends_receives_everything(chat):
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    for text in ["one", "two", "three"]:
        await talker.send({"usr": "ann", "msg": text})
        assert (await talker.recv())["msg"] == text
    assert [(await listener.recv())["msg"] for _ in range(3)] == ["one", "two", "three"]


@pytest.mark.parametrize("junk", [
    "{not json", "", "[]", "42", json.dumps({"usr": "ann"}), json.dumps({"msg": "hi"}),
    json.dumps({"usr": 1, "msg": "hi"}), json.dumps({"usr": "ann", "msg": ["hi"]}),
    json.dumps({"usr": "ann", "msg": "hi", "jwt": 5}),
])
async def test_invalid_frames_are_dropped_silently(chat, junk):
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send(junk)
    await talker.send({"usr": "ann", "msg": "valid"})
    assert without_tim(await talker.recv()) == {"usr": "ann", "msg": "valid"}
    assert without_tim(await listener.recv()) == {"usr": "ann", "msg": "valid"}


async def test_extra_fields_are_not_relayed(chat):
    await chat.start()
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send({**signed("ann", "hi"), "tim": "forged", "color": "red"})
    assert without_tim(await listener.recv()) == {"usr": "ann", "msg": "hi"}
    assert without_tim(await talker.recv()) == {"usr": "ann", "msg": "hi"}


@pytest.mark.parametrize("token", [
    None,
    "not.a.jwt",
    mint("another secret, long enough for HS256", "ann", ttl=None),
], ids=["missing", "garbage", "other-key"])
async def test_with_jwt_configured_unverified_messages_are_dropped(chat, token):
    await chat.start()  # the harness configures jwt-secret
    listener = await wschat(chat)
    talker = await wschat(chat)
    frame = {"usr": "ann", "msg": "forged"}
    if token is not None:
        frame["jwt"] = token
    await talker.send(frame)
    await talker.send(signed("ann", "genuine"))
    assert (await talker.recv())["msg"] == "genuine"
    assert (await listener.recv())["msg"] == "genuine"


async def test_with_jwt_configured_exp_is_not_required_nor_enforced(chat):
    await chat.start()
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send({"usr": "ann", "msg": "no exp", "jwt": mint(JWT_SECRET, "ann", ttl=None)})
    await talker.send({"usr": "ann", "msg": "expired", "jwt": mint(JWT_SECRET, "ann", ttl=-60)})
    assert [(await listener.recv())["msg"] for _ in range(2)] == ["no exp", "expired"]
    assert [(await talker.recv())["msg"] for _ in range(2)] == ["no exp", "expired"]


async def test_jwt_is_ignored_when_none_is_configured(chat):
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send({"usr": "ann", "msg": "anything goes", "jwt": "garbage"})
    assert (await listener.recv())["msg"] == "anything goes"


def test_tim_has_nine_fractional_digits_in_utc():
    moment = datetime(2020, 8, 11, 22, 26, 58, tzinfo=timezone.utc)
    ns = int(moment.timestamp()) * 1_000_000_000 + 118_678_679
    assert rfc3339_ns(ns) == "2020-08-11T22:26:58.118678679Z"
    assert rfc3339_ns(ns - 118_678_679) == "2020-08-11T22:26:58.000000000Z"


@pytest.mark.parametrize("usr", ["", "bell\x07", "x" * 257])
async def test_messages_from_an_invalid_usr_are_dropped(chat, usr):
    await chat.start(jwt_secret=None)
    listener = await wschat(chat)
    talker = await wschat(chat)
    await talker.send({"usr": usr, "msg": "sneaky"})
    await talker.send({"usr": "ann", "msg": "valid"})
    assert without_tim(await listener.recv()) == {"usr": "ann", "msg": "valid"}
