"""The auth answer is the first frame after the auth frame, even while the
room is busy: real bridges take the first frame after ``register`` as the
ack (the original Go server sends it before adding the client)."""

from __future__ import annotations

import trio

from tests.abuse import no_rate_limits
from tests.conftest import SECRET
from tests.lobby_peers import IDENTIFIED, INIT
from tests.test_gradagenda import auth, create, login, message, ok

JOINERS = 60


async def chatter(peer, make, stop: trio.Event) -> None:
    """Send as fast as the server takes it until ``stop``."""
    i = 0
    while not stop.is_set():
        await peer.send(make(i))
        i += 1
        if i % 20 == 0:
            await trio.sleep(0)


async def test_register_ack_comes_before_any_forwarded_message(chat):
    await chat.start(**no_rate_limits())
    talker = await chat.multichat("talker")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter, talker, lambda i: {"action": "client-message",
                                                        "content": f"busy {i}"}, stop)
        for i in range(JOINERS):
            peer = await chat.connect("/multichat")
            await peer.send({"action": "register", "client-name": f"bridge{i}",
                             "secret-key": SECRET})
            assert await peer.recv() == {"action": "register-ack"}
            assert (await peer.recv())["action"] == "forwarding-message"  # it is busy
            await peer.close()
        stop.set()


async def test_identified_comes_before_any_broadcast_or_quit(chat):
    from tests.lobby_peers import socialvp
    await chat.start(**no_rate_limits())
    talker = await socialvp(chat, "talker")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter, talker, lambda i: {"command": "broadcast",
                                                        "message": f"busy {i}"}, stop)
        for i in range(JOINERS):
            peer = await chat.connect("/socialvp")
            assert await peer.recv() == INIT
            await peer.send({"command": "identify", "name": f"guest{i}"})
            assert await peer.recv() == IDENTIFIED
            assert (await peer.recv())["type"] == "broadcast"
            await peer.close()
        stop.set()


async def test_gradagenda_login_answer_comes_before_the_users_other_devices_traffic(chat):
    await chat.start(**no_rate_limits())
    phone = await login(chat, "alice", "phone")
    session_id = (await create(phone, "bob"))["session-id"]
    stop = trio.Event()

    async def drain() -> None:
        while True:
            await phone.recv()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        nursery.start_soon(chatter, phone, lambda i: message(session_id, f"busy {i}",
                                                             cdid=f"m{i}"), stop)
        for i in range(JOINERS // 2):
            laptop = await chat.connect("/gradagenda")
            await laptop.send(auth("alice", f"laptop{i}"))
            assert await laptop.recv() == ok("auth")
            assert (await laptop.recv())["type"] == "message-broadcast"
            await laptop.close()
        stop.set()
        nursery.cancel_scope.cancel()
