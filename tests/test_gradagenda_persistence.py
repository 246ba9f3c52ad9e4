"""GradAgenda durability against a real chatd process: restarts and
``kill -9``, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import signal

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import GUARD, JWT_SECRET, Peer, open_websocket_url
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.test_gradagenda import answers, auth, message, ok


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "chatd.db")
    return request.getfixturevalue("pg_url")


def config(tmp_path, store: str, **extra: object) -> str:
    """A GradAgenda-only config on ``store``; ``extra``: more keys."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "host": "127.0.0.1:0", "jwt-secret": JWT_SECRET, "store": store,
        "message-burst": 10_000,  # the burst below is deliberate
        "endpoints": [{"path": "/gradagenda", "protocol": "gradagenda"}], **extra}))
    return str(path)


class Server:
    """A chatd process and clients for it, opened in the test's nursery."""

    def __init__(self, process, tmp_path, nursery, store: str, **extra: object) -> None:
        self.proc = process("serve", "--config", config(tmp_path, store, **extra))
        self.nursery = nursery

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.proc.start)

    async def stop(self, sig: int | None = None) -> int:
        # In a thread, so that the clients here can answer the close handshake.
        return await trio.to_thread.run_sync(self.proc.stop, sig)

    async def login(self, user: str) -> Peer:
        async def open_(*, task_status=trio.TASK_STATUS_IGNORED):
            async with open_websocket_url(f"ws://127.0.0.1:{self.proc.port}/gradagenda") as ws:
                task_status.started(ws)
                await trio.sleep_forever()

        peer = Peer(await self.nursery.start(open_))
        await peer.send(auth(user))
        assert await peer.recv() == ok("auth")
        return peer


async def all_history(peer: Peer, session_id: str) -> list[dict]:
    """Every stored message, paging forward 100 at a time."""
    stored: list[dict] = []
    while True:
        after = stored[-1]["seq"] if stored else 0
        cdid = f"h{after}"
        await peer.send({"type": "request-message-history", "cdid": cdid,
                         "session-id": session_id, "after": after})
        page, _ = await answers(peer, cdid)
        if not page:
            return stored
        stored += page


async def test_sessions_members_and_messages_survive_a_restart(process, tmp_path, nursery,
                                                              store):
    server = Server(process, tmp_path, nursery, store)
    await server.start()
    alice = await server.login("alice")
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c",
                      "user-id": ["bob", "carol"]})
    group = (await alice.recv())["session-id"]
    await alice.send({"type": "request-direct-session-info", "cdid": "d", "user-id": "bob"})
    pair = (await alice.recv())["session-id"]
    sent = []
    for n in range(3):
        await alice.send(message(group, f"before restart {n}", cdid=str(n)))
        sent.append({k: v for k, v in (await alice.recv()).items() if k != "cdid"})
    assert await server.stop() == 0

    await server.start()
    bob = await server.login("bob")
    await bob.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    listed, _ = await answers(bob, "ls")
    assert [(s["session-id"], s["user-id"]) for s in listed] == [
        (group, ["alice", "bob", "carol"])]
    assert await all_history(bob, group) == sent
    await bob.send(message(group, "after restart", cdid="after"))
    assert (await bob.recv())["seq"] == 4
    # The direct session was stored too: messages go in without asking again.
    await bob.send(message(pair, "direct", cdid="direct"))
    assert (await bob.recv())["seq"] == 1
    await server.stop()


async def test_every_confirmed_message_survives_kill_9_in_order(process, tmp_path, nursery,
                                                               store):
    server = Server(process, tmp_path, nursery, store)
    await server.start()
    alice = await server.login("alice")
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c", "user-id": []})
    group = (await alice.recv())["session-id"]
    burst, kill_after = 400, 100
    confirmed: list[dict] = []

    async def send_burst() -> None:
        try:
            for n in range(burst):
                await alice.send(message(group, f"#{n}", cdid=str(n)))
        except ConnectionClosed:
            pass  # the server is gone: the rest were never confirmed

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as burst_nursery:
            burst_nursery.start_soon(send_burst)
            try:
                while True:
                    confirmed.append(json.loads(await alice.ws.get_message()))
                    if len(confirmed) == kill_after:
                        server.proc.proc.kill()  # SIGKILL, mid-burst
            except ConnectionClosed:
                pass
    await server.stop(signal.SIGKILL)  # reaps it (already dead)
    assert len(confirmed) >= kill_after
    assert [m["seq"] for m in confirmed] == list(range(1, len(confirmed) + 1))

    await server.start()
    alice = await server.login("alice")
    stored = await all_history(alice, group)
    # Gap-free and in sending order; everything confirmed is there, as confirmed.
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    assert [m["message"]["body"] for m in stored] == [f"#{n}" for n in range(len(stored))]
    assert stored[:len(confirmed)] == [{k: v for k, v in m.items() if k != "cdid"}
                                       for m in confirmed]
    await server.stop()
