"""Several real chatd processes as one cluster, on a real Redis and PostgreSQL.

- ``RedisServer``: a ``redis-server`` of the tests' own, on 127.0.0.1 and
  a free port, without persistence, so tests can kill, pause (SIGSTOP)
  and restart it (never the machine's own Redis).
- ``Cluster``: chatd nodes as processes (``python -m chatd serve``), each
  with its own config and directory, sharing that Redis (``broker``) and a
  PostgreSQL database (``store``, from tests/pg.py); clients connect to
  any node over real WebSockets.

When Redis cannot be had these tests skip, except under ``CI=true``,
where they fail. Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import (
    GUARD, JWT_SECRET, SECRET, Peer, ServerProcess, free_port, open_websocket_url,
)

PROTOCOLS = ("multichat", "socialvp", "wschat", "wcp", "gradagenda")


def unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"cluster tests cannot run: {why}", pytrace=False)
    pytest.skip(f"Redis not available: {why}")


class RedisServer:
    """``redis-server`` on 127.0.0.1 and a free port, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not on PATH (apt-get install redis-server)")
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.dir / "redis.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir)], stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            if self.command("PING") == "+PONG":
                return
            if self.proc.poll() is not None:
                unavailable(f"redis-server exited {self.proc.returncode}")
            time.sleep(0.02)  # polling a starting server, not a sync stand-in
        unavailable("redis-server did not answer PING")

    def command(self, *words: str) -> str | None:
        """One inline command; its first reply line, or None if unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall((" ".join(words) + "\r\n").encode())
                return sock.makefile("rb").readline().decode().strip()
        except OSError:
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def node_config(name: str, broker: str, store: str, **extra: Any) -> dict:
    """Every protocol in room ``lobby``, on a free port, in one cluster."""
    return {"host": "127.0.0.1:0", "broker": broker, "store": store, "node-id": name,
            "secret-key": SECRET, "jwt-secret": JWT_SECRET, "log-level": "info",
            "endpoints": [{"path": f"/{p}", "protocol": p} for p in PROTOCOLS], **extra}


class Node(ServerProcess):
    """One chatd node: its process, config and directory."""

    def __init__(self, name: str, directory: Path, config: dict) -> None:
        directory.mkdir(exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config))
        super().__init__(["serve", "--config", str(directory / "config.json")], directory)
        self.name = name

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(GUARD)


class Cluster:
    """Starts nodes and opens clients on them."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, broker: str, store: str) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.broker = broker
        self.store = store
        self.nodes: list[Node] = []

    async def start(self, name: str, *, ready: bool = True, **extra: Any) -> Node:
        node = Node(name, self.tmp_path / name, node_config(name, self.broker, self.store, **extra))
        self.nodes.append(node)
        await trio.to_thread.run_sync(node.start)
        if ready:
            await self.ready(node)
        return node

    async def nodes_up(self, *names: str, **extra: Any) -> list[Node]:
        return [await self.start(name, **extra) for name in names]

    async def readyz(self, node: Node, path: str = "/readyz") -> tuple[int, str]:
        """GET ``path`` (/readyz): (status, body)."""
        with trio.fail_after(GUARD):
            stream = await trio.open_tcp_stream("127.0.0.1", node.port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                      "Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()

    async def ready(self, node: Node, want: bool = True, guard: float = 2 * GUARD) -> str:
        """Wait until /readyz says ready (or, with ``want=False``, not ready)."""
        with trio.fail_after(guard):
            while True:
                status, body = await self.readyz(node)
                if (status == 200) == want:
                    return body
                await trio.sleep(0.05)  # polling an HTTP probe, as a load balancer does

    async def connect(self, node: Node, protocol: str) -> Peer:
        ws = await self.nursery.start(_open, node.url(f"/{protocol}"))
        return Peer(ws)

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()


async def _open(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(url, message_queue_size=4096) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


@pytest.fixture
async def cluster(tmp_path, nursery, redis_server, pg_url):
    c = Cluster(tmp_path, nursery, redis_server.url, pg_url)
    yield c
    c.stop_all()


# --- clients ---------------------------------------------------------------------


async def socialvp(cluster: Cluster, node: Node, name: str) -> Peer:
    peer = await cluster.connect(node, "socialvp")
    assert (await peer.recv())["type"] == "init"
    await peer.send({"command": "identify", "name": name})
    answer = await peer.recv()
    assert answer["code"] == 300, answer
    return peer


async def wcp(cluster: Cluster, node: Node, user: str, display: str | None = None) -> Peer:
    peer = await cluster.connect(node, "wcp")
    await peer.send({"type": "user_joined", "user_id": user, "display_name": display or user})
    return peer


async def multichat(cluster: Cluster, node: Node, name: str) -> Peer:
    peer = await cluster.connect(node, "multichat")
    await peer.send({"action": "register", "client-name": name, "secret-key": SECRET})
    assert await peer.recv() == {"action": "register-ack"}
    return peer


async def until(peer: Peer, predicate, guard: float = GUARD) -> dict:
    """Frames until one matches ``predicate`` (within ``guard`` seconds); that frame."""
    with trio.fail_after(guard):
        while True:
            frame = json.loads(await peer.ws.get_message())
            if predicate(frame):
                return frame


class FreezingRelay:
    """A TCP relay to Redis on a free port, which can make the subscriptions
    open now deliver nothing while their connections stay open: a
    subscription that silently stops (as after a failover that left it
    behind). Connections made after ``freeze`` work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._subscribers: list[list[bool]] = []
        #: While set, the relay is a dead network: connections dropped, new ones closed.
        self.blocked = False
        self._scopes: set[trio.CancelScope] = set()

    def block(self) -> None:
        """Cut every connection through the relay, and refuse new ones."""
        self.blocked = True
        for scope in self._scopes:
            scope.cancel()

    def unblock(self) -> None:
        self.blocked = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def freeze(self) -> int:
        """Silence every subscription open now; how many there were."""
        for state in self._subscribers:
            state[0] = True
        return len(self._subscribers)

    async def _relay(self, client: trio.SocketStream) -> None:
        if self.blocked:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                await self._forward(client)
            finally:
                self._scopes.discard(scope)
        await trio.aclose_forcefully(client)

    async def _forward(self, client: trio.SocketStream) -> None:
        state = [False]  # frozen
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def up() -> None:
                while data := await client.receive_some():
                    if b"SUBSCRIBE" in data and all(s is not state for s in self._subscribers):
                        self._subscribers.append(state)
                    await upstream.send_all(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                while data := await upstream.receive_some():
                    if not state[0]:
                        await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)
