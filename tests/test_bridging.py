"""Lobby bridging: every lobby protocol in one room, each in its own format."""

from __future__ import annotations

import pytest

from chatd.config import Config, EndpointConfig
from tests.conftest import JWT_SECRET, SECRET
from tests.lobby_peers import signed, socialvp, wcp, wschat


async def one_of_each(chat):
    """A wschat listener, a multichat bridge, a socialvp and a wcp client in one lobby."""
    ws = await wschat(chat)
    w = await wcp(chat, "wendy")
    mc = await chat.multichat("bridge")
    svp = await socialvp(chat, "sam")
    # Every name a message can come from is held, and announced to wcp.
    assert await w.recv() == {"type": "user_joined", "user_id": "bridge", "display_name": "bridge"}
    assert await w.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    return mc, svp, ws, w


def wschat_view(frame: dict) -> tuple[str, str]:
    assert set(frame) == {"usr", "msg", "tim"}
    return frame["usr"], frame["msg"]


def wcp_view(frame: dict) -> dict:
    assert isinstance(frame.pop("timestamp"), int)
    return frame


async def test_multichat_message_reaches_every_protocol(chat):
    await chat.start()
    mc, svp, ws, w = await one_of_each(chat)
    await mc.send({"action": "client-message", "content": "from the bridge"})
    assert await svp.recv() == {"type": "broadcast", "from": "bridge", "message": "from the bridge"}
    assert wschat_view(await ws.recv()) == ("bridge", "from the bridge")
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "bridge",
                                        "data": "from the bridge"}


@pytest.mark.parametrize("payload, text", [
    ("plain words", "plain words"),
    ({"x": [1, None]}, '{"x":[1,null]}'),
    (42, "42"),
])
async def test_socialvp_broadcast_reaches_every_protocol(chat, payload, text):
    await chat.start()
    mc, svp, ws, w = await one_of_each(chat)
    await svp.send({"command": "broadcast", "message": payload})
    assert await mc.recv() == {"action": "forwarding-message", "source-client-name": "sam",
                               "content": text}
    assert wschat_view(await ws.recv()) == ("sam", text)
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "sam", "data": text}


async def test_wschat_message_reaches_every_protocol_and_its_sender(chat):
    await chat.start()
    mc, svp, ws, w = await one_of_each(chat)
    await ws.send(signed("wes", "from wschat"))
    assert wschat_view(await ws.recv()) == ("wes", "from wschat")
    assert await mc.recv() == {"action": "forwarding-message", "source-client-name": "wes",
                               "content": "from wschat"}
    assert await svp.recv() == {"type": "broadcast", "from": "wes", "message": "from wschat"}
    # Its first message claimed "wes" for the wschat connection.
    assert await w.recv() == {"type": "user_joined", "user_id": "wes", "display_name": "wes"}
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "wes",
                                        "data": "from wschat"}


async def test_wcp_message_reaches_every_protocol_but_its_sender(chat):
    await chat.start()
    mc, svp, ws, w = await one_of_each(chat)
    await w.send({"type": "message", "data": "from wcp", "timestamp": 99})
    assert await mc.recv() == {"action": "forwarding-message", "source-client-name": "wendy",
                               "content": "from wcp"}
    assert await svp.recv() == {"type": "broadcast", "from": "wendy", "message": "from wcp"}
    assert wschat_view(await ws.recv()) == ("wendy", "from wcp")
    # Wendy got no echo: her next frame is sam's broadcast.
    await svp.send({"command": "broadcast", "message": "next"})
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "sam", "data": "next"}


async def test_names_are_shared_between_socialvp_and_wcp(chat):
    await chat.start()
    await socialvp(chat, "alice")
    bob = await wcp(chat, "bob")
    w = await chat.connect("/wcp")
    await w.send({"type": "user_joined", "user_id": "alice", "display_name": "Alice"})
    assert await w.recv() == {"type": "error", "message": "user_id already in use"}
    s = await chat.connect("/socialvp")
    await s.recv()
    await s.send({"command": "identify", "name": "bob"})
    assert (await s.recv())["code"] == 305
    # multichat names are held too: a bridge cannot register as alice.
    bridge = await chat.connect("/multichat")
    await bridge.send({"action": "register", "client-name": "alice", "secret-key": SECRET})
    assert await bridge.closed() == 1008
    await socialvp(chat, "carol")
    assert (await bob.recv())["user_id"] == "carol"


async def test_wcp_sees_socialvp_joins_and_leaves_and_socialvp_sees_wcp_quit(chat):
    await chat.start()
    w = await wcp(chat, "wendy")
    s = await socialvp(chat, "sam")
    assert await w.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    await s.close()
    assert await w.recv() == {"type": "user_left", "user_id": "sam"}
    s = await socialvp(chat, "sam")
    assert (await w.recv())["type"] == "user_joined"
    await w.send({"type": "user_left", "user_id": "wendy"})
    assert await s.recv() == {"type": "quit", "who": "wendy"}


async def test_socialvp_message_to_a_wcp_user_arrives_with_to(chat):
    await chat.start()
    w = await wcp(chat, "wendy")
    other = await wcp(chat, "otto")
    await w.recv()
    s = await socialvp(chat, "sam")
    assert (await w.recv())["user_id"] == "sam"
    assert (await other.recv())["user_id"] == "sam"
    await s.send({"command": "message", "to": "wendy", "message": {"q": "tea?"}})
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "sam",
                                        "data": '{"q":"tea?"}', "to": "wendy"}
    # Only wendy: otto's next frame is a later broadcast.
    await s.send({"command": "broadcast", "message": "all"})
    assert wcp_view(await other.recv()) == {"type": "message", "user_id": "sam", "data": "all"}
    assert wcp_view(await w.recv()) == {"type": "message", "user_id": "sam", "data": "all"}


async def test_rooms_are_isolated(chat):
    endpoints = [EndpointConfig(path=f"/{room}/{protocol}", protocol=protocol, room=room)
                 for room in ("red", "blue")
                 for protocol in ("multichat", "socialvp", "wschat", "wcp")]
    await chat.start(Config(endpoints=endpoints, secret_key=SECRET, jwt_secret=JWT_SECRET))
    red_ws = await wschat(chat, "/red/wschat")
    blue_ws = await wschat(chat, "/blue/wschat")
    red_mc = await chat.multichat("r", "/red/multichat")
    blue_mc = await chat.multichat("b", "/blue/multichat")
    # Names are per room: "sam" exists once in each.
    red_w = await wcp(chat, "sam", "/red/wcp")
    blue_svp = await socialvp(chat, "sam", "/blue/socialvp")
    red_svp = await socialvp(chat, "sue", "/red/socialvp")
    assert (await red_w.recv())["user_id"] == "sue"  # not blue's sam
    blue_w = await wcp(chat, "sue", "/blue/wcp")

    await red_svp.send({"command": "broadcast", "message": "red only"})
    assert (await red_mc.recv())["content"] == "red only"
    assert wschat_view(await red_ws.recv()) == ("sue", "red only")
    assert (await red_w.recv())["data"] == "red only"
    await blue_svp.send({"command": "broadcast", "message": "blue only"})
    assert (await blue_mc.recv())["content"] == "blue only"
    assert wschat_view(await blue_ws.recv()) == ("sam", "blue only")
    assert (await blue_w.recv())["data"] == "blue only"
    # Direct messages stay in the room too.
    await red_svp.send({"command": "message", "to": "sue", "message": "me?"})
    assert (await red_svp.recv())["type"] == "message"
    await blue_svp.send({"command": "message", "to": "nobody-in-blue", "message": "x"})
    assert (await blue_svp.recv())["code"] == 404
    # Nothing crossed: each side's next frame is its own room's.
    await red_svp.send({"command": "broadcast", "message": "red again"})
    await blue_svp.send({"command": "broadcast", "message": "blue again"})
    assert (await blue_mc.recv())["content"] == "blue again"
    assert (await blue_w.recv())["data"] == "blue again"
    assert wschat_view(await blue_ws.recv())[1] == "blue again"
    assert (await red_mc.recv())["content"] == "red again"
    assert (await red_w.recv())["data"] == "red again"
    assert wschat_view(await red_ws.recv())[1] == "red again"


async def test_wcp_sees_a_socialvp_rename_as_leave_then_join(chat):
    await chat.start()
    w = await wcp(chat, "wendy")
    s = await socialvp(chat, "sam")
    assert (await w.recv())["user_id"] == "sam"
    await s.send({"command": "identify", "name": "samuel"})
    assert (await s.recv())["code"] == 300
    assert await w.recv() == {"type": "user_left", "user_id": "sam"}
    assert await w.recv() == {"type": "user_joined", "user_id": "samuel", "display_name": "samuel"}
    await s.send({"command": "message", "to": "wendy", "message": "new name"})
    assert (await w.recv())["user_id"] == "samuel"
