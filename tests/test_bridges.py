"""Real multichat bridges, replayed: what they send, as they send it.

The multichat-qqbot bridge (Python) builds every frame with
``json.dumps({'action': 'client-message', 'content': message})``, whose
default escapes each CJK character as ``\\uXXXX`` (six bytes); its messages
carry a prefix of 21 ASCII characters here, so 672 characters make a
4,096-byte frame, 673 a 4,102-byte one and 1,700 a 10,264-byte one (the
frames issue 20 measured). The original Go server forwards all three;
chatd does too on a config written for it (no ``endpoints``: a 64 KiB
bound, docs/protocols.md), and keeps 4 KB on its embedded default.

Two bridges may register one ``client-name`` (a bridge run twice, or one
reconnecting while its old connection is still held), as on the original
server; no client of another protocol may take or speak as that name.
A binary frame after registration is ignored, as the Go server does.
"""

from __future__ import annotations

import json

import pytest

from chatd.config import decode_config
from tests.conftest import SECRET
from tests.lobby_peers import signed, socialvp, wcp, wschat
from tests.rawws import BINARY, CONTINUATION, RawClient, frame, text

PREFIX = "[QQ] group 4242 Ming:"  # 21 ASCII characters before the message


def qqbot_frame(characters: int) -> str:
    """The frame the qqbot bridge sends for a message of ``characters`` CJK characters."""
    assert len(PREFIX) == 21
    return json.dumps({"action": "client-message", "content": PREFIX + "\u4f60" * characters})


def go_config(tmp_path, **extra):
    """A config written for the original Go server: no endpoints."""
    return decode_config(json.dumps({"ws-path": "/", "host": "127.0.0.1:0",
                                     "secret-key": SECRET, "store": str(tmp_path / "go.db"),
                                     **extra}))


@pytest.mark.parametrize("characters, size", [(672, 4096), (673, 4102), (1700, 10264)])
async def test_qqbot_escaped_cjk_messages_are_forwarded_on_a_go_server_config(
        chat, tmp_path, characters, size):
    await chat.start(go_config(tmp_path))
    qq = await chat.multichat("QQ", path="/")
    mc = await chat.multichat("MC", path="/")
    sent = qqbot_frame(characters)
    assert len(sent.encode()) == size
    await qq.send(sent)
    got = await mc.recv()
    assert got == {"action": "forwarding-message", "source-client-name": "QQ",
                   "content": PREFIX + "\u4f60" * characters}
    # The bridge is still connected: its next message goes through too.
    await qq.send(qqbot_frame(1))
    assert (await mc.recv())["content"] == PREFIX + "\u4f60"


async def test_a_go_server_config_s_bound_is_64_kib(chat, tmp_path):
    await chat.start(go_config(tmp_path))
    qq = await chat.multichat("QQ", path="/")
    mc = await chat.multichat("MC", path="/")
    envelope = len(json.dumps({"action": "client-message", "content": ""}))
    await qq.send(json.dumps({"action": "client-message", "content": "a" * (65536 - envelope)}))
    assert len((await mc.recv())["content"]) == 65536 - envelope
    await qq.send(json.dumps({"action": "client-message", "content": "a" * (65537 - envelope)}))
    assert await qq.closed() == 1009
    assert qq.ws.closed.reason == "message exceeds 65536 bytes"


async def test_a_go_server_config_may_set_its_own_bound(chat, tmp_path):
    await chat.start(go_config(tmp_path, **{"max-frame-bytes": 8192}))
    qq = await chat.multichat("QQ", path="/")
    await qq.send(qqbot_frame(1700))
    assert await qq.closed() == 1009


async def test_the_embedded_default_keeps_4_kb(chat):
    # Its documented limit: 672 escaped characters pass, 673 do not.
    await chat.start()
    qq = await chat.multichat("QQ")
    mc = await chat.multichat("MC")
    await qq.send(qqbot_frame(672))
    assert len((await mc.recv())["content"]) == 21 + 672
    await qq.send(qqbot_frame(673))
    assert await qq.closed() == 1009
    assert qq.ws.closed.reason == "message exceeds 4096 bytes"


def endpoints_config(tmp_path):
    return decode_config(json.dumps({
        "host": "127.0.0.1:0", "secret-key": SECRET, "store": str(tmp_path / "e.db"),
        "endpoints": [
            {"path": "/bridges", "protocol": "multichat", "max-frame-bytes": 65536},
            {"path": "/wcp", "protocol": "wcp"},
            {"path": "/socialvp", "protocol": "socialvp", "max-frame-bytes": 1024},
            {"path": "/wschat", "protocol": "wschat"}]}))


async def test_each_endpoint_has_its_own_limit_for_what_its_clients_send(chat, tmp_path):
    await chat.start(endpoints_config(tmp_path))
    watcher = await wcp(chat, "watcher")
    viewer = await socialvp(chat, "viewer")
    assert (await watcher.recv())["user_id"] == "viewer"
    qq = await chat.multichat("QQ", path="/bridges")
    assert await watcher.recv() == {"type": "user_joined", "user_id": "QQ", "display_name": "QQ"}
    # A recipient's limit is for what it sends, not for what it receives:
    # a bridge's 10 KB message reaches the wcp (4 KB) and socialvp (1 KB)
    # clients of the same room whole.
    await qq.send(qqbot_frame(1700))
    message = PREFIX + "\u4f60" * 1700
    got = await watcher.recv()
    assert got["type"] == "message" and got["user_id"] == "QQ" and got["data"] == message
    assert await viewer.recv() == {"type": "broadcast", "from": "QQ", "message": message}
    # The same text sent by the wcp client is over its endpoint's 4 KB.
    await watcher.send({"type": "message", "data": message})
    assert await watcher.closed() == 1009
    await viewer.send({"command": "broadcast", "message": "x" * 1024})
    assert await viewer.closed() == 1009


async def test_check_config_shows_each_endpoint_s_limit(tmp_path):
    from chatd.config import effective_config
    effective = effective_config(endpoints_config(tmp_path))
    assert [e["max-frame-bytes"] for e in effective["endpoints"]] == [65536, 4096, 1024, 4096]
    assert effective["max-frame-bytes"] == 4096
    go = effective_config(go_config(tmp_path))
    assert go["max-frame-bytes"] == 65536 and go["endpoints"][0]["max-frame-bytes"] == 65536


# --- two bridges, one name ------------------------------------------------------


async def test_two_bridges_share_a_name_and_the_room_sees_one_user(chat):
    await chat.start()
    watcher = await wcp(chat, "watcher")
    viewer = await socialvp(chat, "viewer")
    assert (await watcher.recv())["user_id"] == "viewer"
    listener = await chat.multichat("listener")
    assert (await watcher.recv())["user_id"] == "listener"
    one = await chat.multichat("QQ")
    assert await watcher.recv() == {"type": "user_joined", "user_id": "QQ", "display_name": "QQ"}
    # The second registration of the name is acknowledged, as by the Go server.
    two = await chat.multichat("QQ")
    # Each bridge's message reaches the other (a bridge of the same name is
    # another client) and everyone else; never its sender.
    await one.send({"action": "client-message", "content": "from one"})
    assert await two.recv() == {"action": "forwarding-message", "source-client-name": "QQ",
                                "content": "from one"}
    assert (await listener.recv())["content"] == "from one"
    # The wcp client saw no second user_joined: the message comes next.
    assert (await watcher.recv())["data"] == "from one"
    assert await viewer.recv() == {"type": "broadcast", "from": "QQ", "message": "from one"}
    await two.send({"action": "client-message", "content": "from two"})
    assert (await one.recv())["content"] == "from two"
    assert (await watcher.recv())["data"] == "from two"
    assert (await viewer.recv())["message"] == "from two"
    # The first leaves: the name is still held, nobody is told it left.
    await one.close()
    await two.send({"action": "client-message", "content": "still here"})
    assert (await watcher.recv())["data"] == "still here"
    assert (await viewer.recv())["message"] == "still here"
    # The last leaves: now the room hears it, once.
    await two.close()
    assert await watcher.recv() == {"type": "user_left", "user_id": "QQ"}
    assert await viewer.recv() == {"type": "quit", "who": "QQ"}


async def test_a_bridge_reconnecting_while_its_old_connection_is_held_is_accepted(chat):
    # The old connection is half-open: the server still holds it (until
    # keepalive gives up); the bridge's new connection must not be refused.
    await chat.start()
    stale = await RawClient.connect(chat.server.port, "/multichat")
    await stale.send_text(json.dumps({"action": "register", "client-name": "MC-survival",
                                      "secret-key": SECRET}))
    assert json.loads(await stale.next_message()) == {"action": "register-ack"}
    fresh = await chat.multichat("MC-survival")
    other = await chat.multichat("QQ")
    await fresh.send({"action": "client-message", "content": "back"})
    assert await other.recv() == {"action": "forwarding-message",
                                  "source-client-name": "MC-survival", "content": "back"}


@pytest.mark.parametrize("other", ["wcp", "socialvp"])
async def test_no_client_of_another_protocol_takes_a_shared_bridge_name(chat, other):
    await chat.start()
    one = await chat.multichat("bridge")
    two = await chat.multichat("bridge")

    async def refused(name: str) -> None:
        if other == "wcp":
            peer = await chat.connect("/wcp")
            await peer.send({"type": "user_joined", "user_id": name, "display_name": "x"})
            assert (await peer.recv())["type"] == "error"
        else:
            peer = await chat.connect("/socialvp")
            await peer.recv()  # init
            await peer.send({"command": "identify", "name": name})
            assert (await peer.recv())["code"] == 305
        await peer.close()

    for name in ("bridge", "Bridge", "bridg\u0435"):
        await refused(name)
    await one.close()
    await refused("bridge")  # the other bridge still holds it
    await two.close()
    # Free once the last bridge has gone.
    if other == "wcp":
        await wcp(chat, "bridge")
    else:
        await socialvp(chat, "bridge")


async def test_wschat_cannot_speak_as_a_shared_bridge_name(chat):
    await chat.start()
    one = await chat.multichat("bridge")
    await chat.multichat("bridge")
    listener = await wschat(chat)
    await listener.send(signed("bridge", "spoof"))  # dropped, logged
    await listener.send(signed("honest", "hello"))
    got = await listener.recv()
    assert got["usr"] == "honest" and got["msg"] == "hello"
    assert (await one.recv())["content"] == "hello"


@pytest.mark.parametrize("second", ["Bridge", "BRIDGE", "bridg\u0435"])
async def test_a_look_alike_of_a_bridge_s_name_is_refused_even_to_a_bridge(chat, second):
    await chat.start()
    await chat.multichat("bridge")
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": second, "secret-key": SECRET})
    assert await peer.closed() == 1008
    assert peer.ws.closed.reason == "client-name already in use"


async def test_a_bridge_cannot_share_a_name_another_protocol_holds(chat):
    await chat.start()
    await wcp(chat, "alice")
    peer = await chat.connect("/multichat")
    await peer.send({"action": "register", "client-name": "alice", "secret-key": SECRET})
    assert await peer.closed() == 1008


# --- binary frames --------------------------------------------------------------


async def test_a_binary_frame_after_registration_is_ignored_as_by_the_go_server(chat):
    await chat.start()
    server = chat.server
    qq = await RawClient.connect(server.port, "/multichat")
    await qq.send_text(json.dumps({"action": "register", "client-name": "QQ",
                                   "secret-key": SECRET}))
    assert json.loads(await qq.next_message()) == {"action": "register-ack"}
    mc = await chat.multichat("MC")
    await qq.send_bytes(frame(BINARY, b"\x00\x01\x02"))
    await qq.send_bytes(frame(BINARY, b'{"action": "client-message",', fin=False)
                        + frame(CONTINUATION, b' "content": "binary"}'))
    await qq.send_bytes(text(qqbot_frame(3)))
    # Only the text message is forwarded; the connection is still open.
    assert (await mc.recv())["content"] == PREFIX + "\u4f60" * 3


async def test_a_binary_first_frame_is_not_a_register(chat):
    await chat.start()
    raw = await RawClient.connect(chat.server.port, "/multichat")
    await raw.send_bytes(frame(BINARY, json.dumps({
        "action": "register", "client-name": "QQ", "secret-key": SECRET}).encode()))
    close = await raw.until_close()
    assert close is not None and close.code == 1008


@pytest.mark.parametrize("path", ["/socialvp", "/wschat", "/wcp", "/gradagenda"])
async def test_other_protocols_still_close_a_binary_frame_1003(chat, path):
    await chat.start()
    raw = await RawClient.connect(chat.server.port, path)
    await raw.send_bytes(frame(BINARY, b"\x00"))
    close = await raw.until_close()
    assert close is not None and close.code == 1003


# --- the registry, without sockets: any order of joins and leaves -----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chatd.broker.local import LocalBroker  # noqa: E402
from chatd.outbox import Client, Flusher  # noqa: E402
from chatd.events import Join, Leave  # noqa: E402
from chatd.lobby import Lobby  # noqa: E402
from chatd.protocols.multichat import Multichat  # noqa: E402
from chatd.protocols.wcp import Wcp  # noqa: E402


class _Transport:
    waiting_frames = 0
    waiting_bytes = 0

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes, count: int) -> bool:
        self.data += data
        return True

    def messages(self) -> list[dict]:
        """The server frames written (unmasked, short), decoded."""
        out, data = [], self.data
        while data:
            length, start = data[1], 2
            if length == 126:
                length, start = int.from_bytes(data[2:4], "big"), 4
            out.append(json.loads(data[start:start + length]))
            data = data[start + length:]
        return out


NAMES = ["bridge", "Bridge", "qq"]  # "Bridge" looks like "bridge"
steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["multichat", "wcp"]), st.sampled_from(NAMES)),
    st.tuples(st.just("leave"), st.integers(0, 20))), max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps)
def test_bridges_share_exact_names_and_the_room_hears_first_join_and_last_leave(steps):
    lobby, flusher = Lobby(LocalBroker()), Flusher()
    watcher_transport = _Transport()
    watcher = Client(Wcp, "lobby", "w", "/wcp", 512, watcher_transport, flusher)
    assert lobby.join(Join(client=watcher, name="watcher", register=True, announce=True)) is True
    # The model: name as shown -> (protocol, clients holding it).
    held: dict[str, tuple[str, list[Client]]] = {}
    present: list[Client] = []
    heard: list[dict] = []
    for step in steps:
        if step[0] == "leave":
            if not present:
                continue
            client = present.pop(step[1] % len(present))
            lobby.leave(Leave(client=client))
            protocol, holders = held[client.name]
            holders.remove(client)
            if not holders:
                del held[client.name]
                heard.append({"type": "user_left", "user_id": client.name})
            continue
        protocol, name = step
        cls = Multichat if protocol == "multichat" else Wcp
        client = Client(cls, "lobby", "p", f"/{protocol}", 512, _Transport(), flusher)
        look_alike = {n for n in held if n.lower() == name.lower()}
        shares = look_alike == {name} and protocol == "multichat" == held[name][0]
        expected = not look_alike or shares
        ok = lobby.join(Join(client=client, name=name, display_name=None if protocol ==
                             "multichat" else name, register=True, announce=True,
                             shared=protocol == "multichat"))
        assert ok is expected, (step, held)
        if ok:
            present.append(client)
            if shares:
                held[name][1].append(client)
            else:
                held[name] = (protocol, [client])
                heard.append({"type": "user_joined", "user_id": name, "display_name": name})
    flusher.flush()
    assert watcher_transport.messages() == heard
    for client in present:
        lobby.leave(Leave(client=client))
    room = lobby.rooms["lobby"]
    assert set(room.holders.values()) == {watcher} and list(room.claims) == [watcher.id]
