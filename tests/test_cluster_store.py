"""The durable path of a cluster under ordinary traffic and routine database
operations (issue 18): three real chatd nodes on a private Redis and a
private PostgreSQL (tests/pg.py ``pg_private``) that the tests restart and
pause.

- members of shared groups spread over the nodes write at once: no
  deadlock, no ``storage busy``, every message once and in order on every
  device;
- PostgreSQL fast-restarted ten times under traffic from three nodes: no
  node is left refusing, every confirmed message is in the history;
- PostgreSQL paused (SIGSTOP): every send is answered while it is stopped,
  writes resume after SIGCONT, and the node logs the loss and the return
  once each.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psycopg
import pytest
import trio

from tests.cluster_helpers import Cluster, Node, redis_server  # noqa: F401
from tests.conftest import GUARD, Peer
from tests.pg import pg_private, pg_private_server, with_database  # noqa: F401
from tests.test_gradagenda import auth, create, message, ok

# Kills, pauses and restarts of Redis or PostgreSQL under way, with timeouts
# and graces measured in seconds: run alone, after the parallel part of
# the suite, so that other tests cannot starve these nodes (README).
pytestmark = pytest.mark.serial


async def login(cluster: Cluster, node: Node, user: str, device: str) -> Peer:
    peer = await cluster.connect(node, "gradagenda")
    await peer.send(auth(user, device))
    assert await peer.recv() == ok("auth")
    return peer


def stored(url: str) -> dict[str, list[tuple[int, str, str]]]:
    """Every stored message: session -> [(seq, sender, body)] in seq order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT session_id, seq, sender_id, message FROM messages "
                            "ORDER BY session_id, seq").fetchall()
    out: dict[str, list[tuple[int, str, str]]] = {}
    for session_id, seq, sender, text in rows:
        out.setdefault(session_id, []).append((seq, sender, json.loads(text)["body"]))
    return out


class Device:
    """A connected device that records every broadcast it gets, per session,
    and the answers to its own sends (by cdid)."""

    def __init__(self, peer: Peer, user: str) -> None:
        self.peer = peer
        self.user = user
        self.got: dict[str, list[tuple[int, str, str]]] = {}
        self.answers: dict[str, dict] = {}
        self.changed = trio.Event()

    async def read(self) -> None:
        while True:
            frame = await self.peer.recv()
            if frame["type"] == "message-broadcast":
                self.got.setdefault(frame["session-id"], []).append(
                    (frame["seq"], frame["sender-id"], frame["message"]["body"]))
            if "cdid" in frame:
                self.answers[frame["cdid"]] = frame
            self.changed.set()
            self.changed = trio.Event()

    async def until(self, condition) -> None:
        with trio.fail_after(6 * GUARD):
            while not condition():
                await self.changed.wait()

    async def send(self, session_id: str, body: str, cdid: str) -> None:
        await self.peer.send(message(session_id, body, cdid=cdid))

    def confirmed(self) -> dict[str, int]:
        """cdid -> seq of this device's confirmed sends."""
        return {cdid: a["seq"] for cdid, a in self.answers.items()
                if a["type"] == "message-broadcast"}

    def refused(self) -> dict[str, str]:
        return {cdid: a["message"] for cdid, a in self.answers.items()
                if a["type"] == "status-response" and a.get("status") == "failed"}


async def sender(device: Device, sessions: list[str], count: int, window: int,
                 prefix: str) -> None:
    """Send ``count`` messages into ``sessions`` in turn, ``window``
    unanswered at most; returns once all are answered."""
    for n in range(count):
        await device.until(lambda n=n: n - sum(c.startswith(prefix) for c in device.answers)
                           < window)
        await device.send(sessions[n % len(sessions)], f"{prefix}{n}", f"{prefix}{n}")
    await device.until(lambda: sum(c.startswith(prefix) for c in device.answers) == count)


async def test_members_on_different_nodes_write_shared_groups_without_busy_or_deadlock(
        tmp_path, nursery, redis_server, pg_private):
    """3 users on 3 nodes, 4 shared groups, 32 unconfirmed each: every send
    confirmed (no ``storage busy``), PostgreSQL counts no deadlock, and each
    user's two devices (on two nodes) get every message once, in seq order."""
    url = with_database(pg_private.url, "chatd")
    cluster = Cluster(tmp_path, nursery, redis_server.url, url)
    try:
        nodes = await cluster.nodes_up("n1", "n2", "n3")
        users = ["ann", "ben", "cat"]
        first = await login(cluster, nodes[0], users[0], "setup")
        groups = [(await create(first, *users, cdid=f"g{g}"))["session-id"] for g in range(4)]
        devices = []
        for i, user in enumerate(users):
            for d in range(2):  # writer on node i, reader on node i+1
                devices.append(Device(await login(cluster, nodes[(i + d) % 3], user, f"d{d}"),
                                      user))
        for device in devices:
            nursery.start_soon(device.read)
        per_user = 160
        async with trio.open_nursery() as writing:
            for device in devices[::2]:
                writing.start_soon(sender, device, groups, per_user, 32, f"{device.user}-")
        for device in devices[::2]:
            assert device.refused() == {}
            assert len(device.confirmed()) == per_user
        history = stored(url)
        assert sum(len(rows) for rows in history.values()) == per_user * len(users)
        for group in groups:
            assert [row[0] for row in history[group]] == list(range(1, len(history[group]) + 1))
        for device in devices:
            await device.until(lambda device=device: all(
                len(device.got.get(g, [])) >= len(history[g]) for g in groups))
            for group in groups:
                assert device.got[group] == history[group], (device.user, group)
        with psycopg.connect(pg_private.url, autocommit=True) as conn:
            assert conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = "
                                "'chatd'").fetchone() == (0,)
    finally:
        cluster.stop_all()


async def test_postgres_fast_restarted_ten_times_under_traffic_from_three_nodes(
        tmp_path, nursery, redis_server, pg_private):
    """Each node keeps sending while PostgreSQL is restarted (``-m fast``)
    ten times: answers are confirmations or ``storage busy``; afterwards
    every node is ready and takes writes, and every confirmed message is
    stored with the seq it was confirmed with."""
    url = with_database(pg_private.url, "chatd")
    cluster = Cluster(tmp_path, nursery, redis_server.url, url)
    try:
        nodes = await cluster.nodes_up("n1", "n2", "n3", **{"store-busy-timeout": 2})
        users = ["ann", "ben", "cat"]
        first = await login(cluster, nodes[0], users[0], "setup")
        group = (await create(first, *users, cdid="g"))["session-id"]
        devices = [Device(await login(cluster, node, user, "w"), user)
                   for node, user in zip(nodes, users, strict=True)]
        for device in devices:
            nursery.start_soon(device.read)
        stop = trio.Event()
        sent = [0] * len(devices)

        async def keep_sending(index: int) -> None:
            device = devices[index]
            while not stop.is_set():
                n = sent[index]
                await device.until(lambda: n - len(device.answers) < 8)
                await device.send(group, f"{device.user}-{n}", f"{device.user}-{n}")
                sent[index] += 1
            await device.until(lambda: len(device.answers) == sent[index])

        async with trio.open_nursery() as traffic:
            for index in range(len(devices)):
                traffic.start_soon(keep_sending, index)
            for _ in range(10):
                # Some writes go through between two restarts.
                before = [len(d.confirmed()) for d in devices]
                for device, count in zip(devices, before, strict=True):
                    await device.until(lambda d=device, c=count: len(d.confirmed()) > c)
                await trio.to_thread.run_sync(pg_private.stop)
                await trio.to_thread.run_sync(pg_private.start)
            stop.set()
        for node in nodes:
            await cluster.ready(node)
        for device in devices:
            assert set(device.refused().values()) <= {
                "storage busy: nothing was stored, try again"}
            await device.send(group, f"{device.user}-after", "after")
            await device.until(lambda d=device: "after" in d.confirmed())
        history = {seq: (sender_id, body) for seq, sender_id, body in stored(url)[group]}
        assert sorted(history) == list(range(1, len(history) + 1))
        for device in devices:
            for cdid, seq in device.confirmed().items():
                body = f"{device.user}-after" if cdid == "after" else cdid
                assert history[seq] == (device.user, body)
        assert "refusing further writes" not in "".join(
            Path(node.log).read_text() for node in nodes)
    finally:
        cluster.stop_all()


def postgres_processes(data_dir: str) -> list[int]:
    """The postmaster's pid and its children's."""
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        main = int(f.readline())
    pids = [main]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == main:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


async def test_postgres_paused_is_answered_within_the_bound_and_writes_resume(
        tmp_path, nursery, redis_server, pg_private):
    """Every PostgreSQL process stopped (SIGSTOP) while a node writes: each
    send is answered (confirmed before the pause, ``storage busy`` after)
    while the server is still stopped; after SIGCONT the node writes again
    by itself, and its log says once that the store was lost and once that
    it is back."""
    url = with_database(pg_private.url, "chatd")
    cluster = Cluster(tmp_path, nursery, redis_server.url, url)
    pids: list[int] = []
    try:
        [node] = await cluster.nodes_up("n1", **{"store-busy-timeout": 1})
        writer = Device(await login(cluster, node, "ann", "w"), "ann")
        group = (await create(writer.peer, "ann", "ben", cdid="g"))["session-id"]
        nursery.start_soon(writer.read)
        count = 200
        async with trio.open_nursery() as writing:
            writing.start_soon(sender, writer, [group], count, 16, "m")
            await writer.until(lambda: len(writer.confirmed()) >= 20)
            pids = postgres_processes(pg_private.data)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
        # Every send was answered while PostgreSQL is still stopped.
        assert len(writer.answers) == count
        assert set(writer.refused().values()) == {"storage busy: nothing was stored, try again"}
        assert "store" in await cluster.ready(node, want=False)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        pids = []
        await cluster.ready(node)
        await writer.send(group, "after", "after")
        await writer.until(lambda: "after" in writer.confirmed())
        history = {seq: body for seq, _, body in stored(url)[group]}
        for cdid, seq in writer.confirmed().items():
            assert history[seq] == cdid
        log = Path(node.log).read_text()
        assert log.count(" lost (") == 1 and log.count(" is back: ") == 1, log
        assert "Traceback" not in log
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        cluster.stop_all()
