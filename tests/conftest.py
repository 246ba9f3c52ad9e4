"""Fixtures: a real chatd on 127.0.0.1 with an ephemeral port, real clients."""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from chatd.config import Config, default_config
from chatd.server import Server

SECRET = "test-secret"
JWT_SECRET = "test-jwt-secret-of-at-least-32-bytes"
# A guard against a hung test, never a timing assertion.
GUARD = 10


class Peer:
    """A WebSocket client that speaks JSON."""

    def __init__(self, ws) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self) -> Any:
        with trio.fail_after(GUARD):
            return json.loads(await self.ws.get_message())

    async def recv_raw(self) -> str | bytes:
        with trio.fail_after(GUARD):
            return await self.ws.get_message()

    async def closed(self) -> int:
        """Wait for the server to close; the close code (skipping frames)."""
        with trio.fail_after(GUARD):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    return exc.reason.code

    async def close(self) -> None:
        await self.ws.aclose()


class Harness:
    """Starts servers and opens clients against them."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.server: Server | None = None

    async def start(self, config: Config | None = None, **overrides: Any) -> Server:
        if config is None:
            config = default_config()
            config.secret_key = SECRET
            config.jwt_secret = JWT_SECRET
        config.host = "127.0.0.1:0"
        if config.store == "chatd.db":
            config.store = str(self.tmp_path / "chatd.db")
        for key, value in overrides.items():
            setattr(config, key, value)
        self.server = await self.nursery.start(Server(config).run)
        return self.server

    def url(self, path: str) -> str:
        scheme = "wss" if self.server.config.wss else "ws"
        return f"{scheme}://127.0.0.1:{self.server.port}{path}"

    async def connect(self, path: str, **kwargs: Any) -> Peer:
        ws = await self.nursery.start(_open, self.url(path), kwargs)
        return Peer(ws)

    async def multichat(self, name: str, path: str = "/multichat") -> Peer:
        peer = await self.connect(path)
        await peer.send({"action": "register", "client-name": name, "secret-key": SECRET})
        assert await peer.recv() == {"action": "register-ack"}
        return peer


@asynccontextmanager
async def open_websocket_url(url: str, ssl_context: ssl.SSLContext | None = None,
                             **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's ``open_websocket_url``, but the TCP socket is always
    closed on the way out.

    trio-websocket 0.12 leaves its socket to the garbage collector (a
    ``ResourceWarning``) when the server refused the handshake or closed
    the connection first: ``aclose()`` returns early once a close reason
    is known. Here the test owns the stream and closes it itself. Raises
    what ``open_websocket_url`` raises (``ConnectionRejected``, ...), not
    an exception group, when one thing went wrong.
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "wss":
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, host, resource, **kwargs)
                try:
                    yield ws
                finally:
                    with trio.move_on_after(GUARD):
                        await ws.aclose()
        except BaseExceptionGroup as group:
            sole = _sole_exception(group)
            if sole is None:
                raise
            raise sole from None
    finally:
        await trio.aclose_forcefully(stream)


def _sole_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception in a (nested) group, if it holds just one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


async def _open(url: str, kwargs: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # A roomy queue, so a client that a test stops reading still answers
    # the server's close frame at shutdown.
    kwargs.setdefault("message_queue_size", 64)
    async with open_websocket_url(url, **kwargs) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


@pytest.fixture
async def chat(nursery, tmp_path):
    harness = Harness(nursery, tmp_path)
    yield harness
    # Stop the server while its clients still answer close handshakes.
    if harness.server is not None and not harness.server.stopped.is_set():
        harness.server.shutdown()
        with trio.fail_after(GUARD):
            await harness.server.stopped.wait()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Keep the reason of a ``pytest.skip(reason)`` called inside a trio
    test: pytest-trio 0.8 re-raises it as a bare ``pytest.skip()``, whose
    reason reads just "Skipped", with the original in its context."""
    try:
        return (yield)
    except pytest.skip.Exception as exc:
        inner = exc.__context__
        if not exc.msg and isinstance(inner, BaseExceptionGroup):
            sole = _sole_exception(inner)
            if isinstance(sole, pytest.skip.Exception):
                raise sole from None
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Every skip must say why: a skip without a reason fails instead."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped:").strip()
        if reason in ("", "Skipped", "unconditional skip"):
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid} was skipped without a reason: give one"
    return report


@pytest.fixture(autouse=True)
def _close_raw_streams():
    """Close the raw connections (tests/rawws.py) a test left open."""
    yield
    from tests.rawws import close_leftovers
    close_leftovers()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started next that
    must be told its port (a spawned chatd, redis-server, PostgreSQL).

    Picked at random below the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``), not with ``bind(0)``: a port the
    kernel just handed out here is the one it hands next to whatever
    binds port 0 — another worker's server — before ours takes it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            first_ephemeral = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    low = 10_000 if first_ephemeral > 11_000 else 1024
    for _ in range(200):
        port = random.randrange(low, first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


class ServerProcess:
    """chatd as a real process, for restarts, signals and ``kill -9``."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        self.args = args
        #: (soft, hard) RLIMIT_NOFILE to start chatd with, as a unit file would.
        self.nofile = nofile
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = cwd / "server.log"

    def start(self) -> "ServerProcess":
        """Start chatd and wait for its 'listening on' line; sets ``port``."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([sys.executable, "-m", "chatd", *self.args],
                                         cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=self._limits)
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            new = self.log.read_bytes()[offset:].decode(errors="replace")
            for line in new.splitlines():
                if "listening on" in line:
                    address = line.split("listening on ")[1].split(";")[0]
                    self.port = int(address.rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited {self.proc.returncode}:\n{new}")
            time.sleep(0.02)  # polling a log file for start-up, not a sync stand-in
        raise RuntimeError("chatd did not start:\n" + self.log.read_text())

    def _limits(self) -> None:
        if self.nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def stop(self, sig: int | None = None) -> int:
        """Signal chatd (SIGTERM by default) and return its exit code."""
        import signal as _signal
        self.proc.send_signal(sig or _signal.SIGTERM)
        return self.proc.wait(GUARD)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def process(tmp_path):
    procs: list[ServerProcess] = []

    def make(*args: str, env: dict | None = None,
             nofile: tuple[int, int] | None = None) -> ServerProcess:
        p = ServerProcess(list(args), tmp_path, env, nofile)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
