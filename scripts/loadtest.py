#!/usr/bin/env python3
"""Load-test a running chatd (or one this script starts) over real WebSockets.

Scenarios (``python scripts/loadtest.py SCENARIO --help`` lists the options):

  fanout      S subscribers and P publishers in one lobby
  rooms       many small rooms: one endpoint per room (``--paths``, or
              ``--spawn`` writes such a config)
  connect     a connection storm: N connects a second, auth included
  idle        hold N authenticated connections
  gradagenda  stored group messages: G groups of K members, P publishers each

Examples (each against 127.0.0.1 only, bounded by ``--duration``)::

  python scripts/loadtest.py fanout --spawn --subscribers 1000 --duration 10
  python scripts/loadtest.py rooms --spawn --protocol wcp --rooms 50 --room-size 10
  python scripts/loadtest.py connect --port 8765 --secret-key S --connect-rate 1000
  python scripts/loadtest.py idle --spawn --connections 10000 --workers 2
  python scripts/loadtest.py gradagenda --port 8765 --jwt-secret J --plot out.png

The client is deliberately cheap, because the machine that drives the load
is usually the machine being measured: raw WebSocket frames on trio sockets
(hand-rolled handshake and masking), one task per connection, and on the
receiving side no JSON parsing at all for chat messages: frames are counted
from their headers and the send time is read by a byte search for the
``~lt`` marker each message carries. Its CPU is reported in the summary;
if a worker is near 100% of a core, the result measures the client (add
``--workers``). docs/performance.md says how the numbers were taken.

Publishers are paced by ``--rate`` (messages a second, all publishers
together) or, with ``--rate 0``, by a window: each publisher keeps at most
``--window`` messages in flight, counted until its probe (a connection that
joined the room after every subscriber, so it is served last) has seen them.

Results: a live progress line on stderr (when it is a TTY, or with
``--progress``), a summary table, ``--json`` (one JSON line on stdout; the
table then goes to stderr) and ``--plot FILE.png`` (matplotlib). Traffic
goes to loopback addresses only, unless ``--host`` names another host
explicitly.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import math
import multiprocessing
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import trio

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("fanout", "rooms", "connect", "idle", "gradagenda")
PROTOCOLS = ("multichat", "socialvp", "wschat", "wcp", "gradagenda")
#: Every chat message sent carries MARK + 19-digit monotonic ns + ":" + tag + ":".
MARK = b"~lt"
RECEIVE_SIZE = 65536
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NEVER = 2**63
#: Seconds between the probes catching up and the final count.
SETTLE = 0.2
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


class LoadError(Exception):
    """A client step failed; the message is the error's category."""


# --- latency histograms --------------------------------------------------------
# Log-linear buckets over microseconds, 1/64 relative precision: cheap to
# fill per delivery, and merged across workers and intervals by adding.


def bucket(us: int) -> int:
    if us < 128:
        return us if us > 0 else 0
    e = us.bit_length() - 7
    return (e << 6) + (us >> e)


def bucket_value(b: int) -> float:
    """The middle of bucket ``b``, in microseconds."""
    if b < 128:
        return float(b)
    e = (b >> 6) - 1
    return ((b - (e << 6)) << e) + (1 << e) / 2


def merge_into(total: dict[int, int], part: dict[int, int]) -> None:
    for b, n in part.items():
        total[b] = total.get(b, 0) + n


def summarize(hist: dict[int, int], max_us: int | None = None) -> dict[str, float] | None:
    """p50/p90/p99/max in milliseconds, and the sample count."""
    count = sum(hist.values())
    if not count:
        return None
    out: dict[str, float] = {}
    ordered = sorted(hist.items())
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        target, seen = math.ceil(q * count), 0
        for b, n in ordered:
            seen += n
            if seen >= target:
                out[name] = round(bucket_value(b) / 1000, 3)
                break
    top = max_us if max_us is not None else bucket_value(ordered[-1][0])
    out["max"] = round(top / 1000, 3)
    for name in ("p50", "p90", "p99"):  # a bucket's middle may lie past the maximum
        out[name] = min(out[name], out["max"])
    out["count"] = count
    return out


# --- WebSocket wire (client side) ----------------------------------------------


def handshake_request(host_header: str, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the Sec-WebSocket-Accept it must get back."""
    key = base64.b64encode(random.randbytes(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return request, accept


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final frame, masked as RFC 6455 requires of clients."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    key = random.randbytes(4)
    if not n:
        return header + key
    # XOR as one big integer: far cheaper in Python than byte by byte.
    stream = (key * ((n + 3) // 4))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:120]


def message_content(tag: bytes, size: int) -> bytes:
    """A chat text of ``size`` bytes carrying the send time and the sender's tag."""
    head = b"%s%019d:%s:" % (MARK, time.monotonic_ns(), tag)
    return head + b"x" * (size - len(head)) if size > len(head) else head


def json_text(value: str) -> bytes:
    return json.dumps(value).encode()


# --- protocol dialects: how each protocol authenticates and publishes ------------


class Dialect:
    """The client side of one chatd protocol, as its document describes it."""

    name = ""
    #: The publisher receives its own lobby message (so it is its own probe).
    echo = False
    #: Byte strings that make a non-chat frame worth parsing as JSON.
    markers: tuple[bytes, ...] = ()
    #: Clients carry a JWT (minted from the secret, or by `chatd token`).
    tokens = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    async def authenticate(self, client: WsClient) -> None:
        """Finish the auth stage; raise LoadError if the server refuses."""

    def publish(self, client: WsClient, content: bytes) -> bytes:
        raise NotImplementedError

    def problem(self, obj: Any) -> str | None:
        """A failure the server reported in a frame, if this frame is one."""
        return None

    def observe(self, client: WsClient, obj: Any) -> None:
        """Note what a control frame tells this client (e.g. a session id)."""


class MultichatDialect(Dialect):
    name = "multichat"

    async def authenticate(self, client: WsClient) -> None:
        frame = {"action": "register", "client-name": client.name,
                 "secret-key": self.plan.secret_key}
        await client.request(frame, lambda o: o.get("action") == "register-ack")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"action":"client-message","content":"' + content + b'"}'


class SocialvpDialect(Dialect):
    name = "socialvp"
    markers = (b"false",)

    async def authenticate(self, client: WsClient) -> None:
        reply = await client.request({"command": "identify", "name": client.name},
                                     lambda o: o.get("type") == "outcome")
        if not reply.get("success"):
            raise LoadError(f"auth: outcome {reply.get('code')} {reply.get('message')}")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"command":"broadcast","message":"' + content + b'"}'

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "outcome" and not obj.get("success"):
            return f"outcome {obj.get('code')} {obj.get('message')}"
        return None


class WschatDialect(Dialect):
    """No auth stage; with a JWT secret every message carries a token."""

    name = "wschat"
    echo = True
    tokens = True

    def publish(self, client: WsClient, content: bytes) -> bytes:
        jwt = b',"jwt":' + json_text(client.token) if client.token else b""
        return b'{"usr":' + json_text(client.name) + jwt + b',"msg":"' + content + b'"}'


class WcpDialect(Dialect):
    """``user_joined`` has no acknowledgement, so the client then sends an
    empty object: its ``error`` answer proves the join was handled first."""

    name = "wcp"
    markers = (b'"error"',)

    async def authenticate(self, client: WsClient) -> None:
        await client.send_json({"type": "user_joined", "user_id": client.name,
                                "display_name": client.name})
        await client.request({}, lambda o: o.get("type") == "error")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return b'{"type":"message","data":"' + content + b'"}'

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "error":
            return f"error {obj.get('message')}"
        return None


class GradagendaDialect(Dialect):
    name = "gradagenda"
    echo = True  # a sent message reaches every member device, the sender's too
    tokens = True
    markers = (b"failed", b"providing-session-info")

    async def authenticate(self, client: WsClient) -> None:
        frame = {"cdid": "auth", "type": "authenticate", "user-id": client.name,
                 "device-id": f"{client.name}-loadtest", "token": client.token}
        reply = await client.request(frame, lambda o: o.get("cdid") == "auth")
        if reply.get("status") != "succeeded":
            raise LoadError(f"auth: {reply.get('message') or reply.get('status')}")

    async def create_group(self, client: WsClient, members: list[str]) -> None:
        frame = {"cdid": "create", "type": "request-mutable-session-creation", "user-id": members}
        reply = await client.request(frame, lambda o: o.get("type") == "providing-session-info"
                                     or (o.get("cdid") == "create" and o.get("status") == "failed"),
                                     "group creation")
        if reply.get("type") != "providing-session-info":
            raise LoadError(f"group creation: {reply.get('message')}")

    def publish(self, client: WsClient, content: bytes) -> bytes:
        return (b'{"cdid":"m","type":"request-sending-a-message","session-id":' + client.session
                + b',"message":{"type":"text","body":"' + content
                + b'"},"sender-timestamp":%d}' % (time.time_ns() // 1_000_000))

    def problem(self, obj: Any) -> str | None:
        if obj.get("type") == "status-response" and obj.get("status") == "failed":
            return f"status-response failed: {obj.get('message')}"
        return None

    def observe(self, client: WsClient, obj: Any) -> None:
        if obj.get("type") == "providing-session-info" and obj.get("status") != "deleted":
            client.session = json.dumps(obj.get("session-id")).encode()
            client.session_known.set()


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (
    MultichatDialect, SocialvpDialect, WschatDialect, WcpDialect, GradagendaDialect)}


# --- one client connection -------------------------------------------------------


class WsClient:
    """One raw WebSocket connection: a reader task that counts chat frames
    (no JSON), and just enough of the protocol to authenticate and publish."""

    def __init__(self, worker: Worker, name: str, room: int) -> None:
        self.worker = worker
        self.stats = worker.stats
        self.dialect = worker.dialect
        self.name = name
        self.room = room
        self.token = worker.token_for(name) if self.dialect.tokens else None
        self.stream: trio.SocketStream | None = None
        self.fd = -1
        self.send_lock = trio.Lock()
        self.buffer = b""
        self.closing = False      # we started the close: what follows is no error
        self.got_close: int | None = None   # the code of the server's close frame
        self.close_info = "connection lost"
        self.done = trio.Event()
        # A pending request: a predicate over the next control frames.
        self.waiter: Callable[[Any], bool] | None = None
        self.reply: Any = None
        self.replied = trio.Event()
        # Window accounting: frames tagged by this probe's publisher.
        self.ack_tag: bytes | None = None
        self.acked = 0
        self.ack_event: trio.Event | None = None
        self.sent = 0  # as a publisher
        # GradAgenda: the group this member is in.
        self.session = b""
        self.session_known = trio.Event()

    # --- opening ------------------------------------------------------------

    async def open(self, path: str) -> None:
        plan = self.worker.plan
        sock = trio.socket.socket(plan.family, socket.SOCK_STREAM)
        try:
            source = self.worker.next_source()
            if source:
                # Let connect() pick the port, so ports are unique per 4-tuple.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((source, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await sock.connect((plan.address, plan.port))
            except OSError as exc:
                raise LoadError(f"connect: {type(exc).__name__}") from None
        except BaseException:
            sock.close()
            raise
        self.stream = trio.SocketStream(sock)
        request, accept = handshake_request(plan.host_header, path)
        await self.stream.send_all(request)
        response = b""
        while b"\r\n\r\n" not in response:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise LoadError("handshake: connection closed")
            response += data
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        status, *headers = head.split(b"\r\n")
        status_text = status.decode(errors="replace")
        if not status_text.startswith("HTTP/1.1 101"):
            raise LoadError(f"handshake: HTTP {status_text.partition(' ')[2] or status_text}")
        answer = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in headers)}
        if answer.get(b"sec-websocket-accept") != accept:
            raise LoadError("handshake: wrong Sec-WebSocket-Accept")
        self.stats.open += 1

    # --- sending ------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LoadError(f"send: {self.close_info}") from exc

    async def send_json(self, obj: Any) -> None:
        await self.send_raw(client_frame(json.dumps(obj, separators=(",", ":")).encode()))

    async def request(self, obj: Any, answered: Callable[[Any], bool], what: str = "auth") -> Any:
        """Send ``obj`` and wait for the first control frame ``answered`` accepts."""
        self.waiter, self.reply, self.replied = answered, None, trio.Event()
        await self.send_json(obj)
        await self.replied.wait()
        if self.reply is None:
            raise LoadError(f"{what}: {self.close_info}")
        return self.reply

    # --- receiving ----------------------------------------------------------

    def feed(self, data: bytes, now_ns: int) -> None:
        """Bytes the worker's reader got for this connection."""
        buf = self.buffer + data if self.buffer else data
        pongs: list[bytes] = []
        self.buffer = buf[self._scan(buf, now_ns, pongs):]
        if pongs:
            frames = b"".join(client_frame(p, 0xA) for p in pongs)
            self.worker.nursery.start_soon(self._send_quietly, frames)
        if self.got_close is not None:
            if not self.closing:  # echo the server's close frame (RFC 6455)
                code = 1000 if self.got_close == 1005 else self.got_close
                self.worker.nursery.start_soon(self._send_quietly,
                                               client_frame(close_payload(code), 0x8))
            self.ended()

    def lost(self, reason: str) -> None:
        """The socket reached EOF or failed without a close frame."""
        if not self.closing:
            self._record_close(1006, reason)
        self.ended()

    def ended(self) -> None:
        """No more frames will come: wake whoever waits on this connection."""
        if self.done.is_set():
            return
        self.worker.receiver.remove(self)
        self.stats.open -= 1
        self.done.set()
        self.replied.set()  # a pending request fails
        if self.ack_event is not None:
            self.ack_event.set()

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await self.send_raw(data)
            except LoadError:
                pass

    def _scan(self, buf: bytes, now_ns: int, pongs: list[bytes]) -> int:
        """Handle each complete frame in ``buf``; return the bytes used.

        The hot path: chat frames are counted and timed without decoding.
        """
        stats = self.stats
        hist = stats.latency
        worst = stats.latency_max
        ack_tag = self.ack_tag
        find = buf.find
        end_of_data = len(buf)
        pos = delivered = 0
        while end_of_data - pos >= 2:
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if end_of_data - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if end_of_data - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > end_of_data:
                break
            opcode = buf[pos] & 0x0F
            pos = end
            if opcode <= 1:
                i = find(MARK, start, end)
                if i < 0:
                    self._control(buf[start:end])
                    continue
                delivered += 1
                us = (now_ns - int(buf[i + 3:i + 22])) // 1000
                if us < 128:
                    b = us if us > 0 else 0
                else:
                    e = us.bit_length() - 7
                    b = (e << 6) + (us >> e)
                hist[b] = hist.get(b, 0) + 1
                if us > worst:
                    worst = us
                if ack_tag is not None and buf.startswith(ack_tag, i + 23):
                    self.acked += 1
                    if self.ack_event is not None:
                        self.ack_event.set()
            elif opcode == 0x8:
                payload = buf[start:end]
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.closing:
                    self._record_close(code, payload[2:].decode(errors="replace"))
                self.got_close = code
                break
            elif opcode == 0x9:
                pongs.append(buf[start:end])
        stats.latency_max = worst
        if now_ns < stats.deadline_ns:
            stats.deliveries += delivered
        else:
            stats.late += delivered
        return pos

    def _control(self, payload: bytes) -> None:
        """A frame that is not a chat message: parse it only if it may matter."""
        if self.waiter is None and not any(m in payload for m in self.dialect.markers):
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        self.dialect.observe(self, obj)
        if self.waiter is not None and self.waiter(obj):
            self.waiter, self.reply = None, obj
            self.replied.set()
            return
        problem = self.dialect.problem(obj)
        if problem:
            self.worker.error(problem)

    def _record_close(self, code: int, reason: str) -> None:
        self.close_info = f"closed {code} {reason}".strip()
        self.stats.close_codes[code] += 1
        self.stats.close_reasons.setdefault(code, reason)

    # --- closing ------------------------------------------------------------

    async def close(self) -> None:
        """Close handshake, then the socket (the server closes TCP first)."""
        self.closing = True
        if not self.done.is_set():
            try:
                await self.send_raw(client_frame(close_payload(1000), 0x8))
            except LoadError:
                pass
            with trio.move_on_after(2):
                await self.done.wait()
        await self.abort()

    async def abort(self) -> None:
        self.closing = True
        if self.stream is not None:
            if self in self.worker.receiver:  # opened: stop reading it
                self.ended()
            await trio.aclose_forcefully(self.stream)


class Receiver:
    """Reads every connection of a worker in one task, over a private epoll.

    Measured cheaper than a trio task per connection: one wakeup serves
    every socket that has data, with one recv() each, and no per-socket
    re-registration (docs/performance.md).
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.clients: dict[int, WsClient] = {}

    def __contains__(self, client: WsClient) -> bool:
        return self.clients.get(client.fd) is client

    def add(self, client: WsClient) -> None:
        client.fd = client.stream.socket.fileno()
        self.clients[client.fd] = client
        self.epoll.register(client.fd, select.EPOLLIN)
        if client.buffer:  # frames that came with the handshake response
            data, client.buffer = client.buffer, b""
            client.feed(data, time.monotonic_ns())

    def remove(self, client: WsClient) -> None:
        if self.clients.get(client.fd) is client:
            del self.clients[client.fd]
            try:
                self.epoll.unregister(client.fd)
            except OSError:
                pass

    async def run(self) -> None:
        clients = self.clients
        poll = self.epoll.poll
        read = os.read  # on a socket, read(2) is recv(2); trio keeps it non-blocking
        while True:
            await trio.lowlevel.wait_readable(self.epoll.fileno())
            ready = poll(0, 4096)
            now_ns = time.monotonic_ns()
            for fd, _ in ready:
                client = clients.get(fd)
                if client is None:
                    continue
                try:
                    data = read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    client.lost("connection lost")
                    continue
                if data:
                    client.feed(data, now_ns)
                else:
                    client.lost("closed without a close frame")


# --- what each worker process is asked to do -------------------------------------


@dataclass
class Plan:
    scenario: str
    protocol: str
    family: int
    address: str
    port: int
    host_header: str
    paths: list[str]                 # one per room
    secret_key: str | None
    jwt_secret: str | None
    tokens: dict[str, str]
    sources: list[str]
    size: int
    window: int
    rate_per_publisher: float
    connect_rate: float              # this worker's share
    churn: bool
    connect_timeout: float
    concurrency: int
    interval: float
    grace: float
    cpus: list[int] | None
    worker_index: int
    subscribers: list[tuple[str, int]] = field(default_factory=list)      # (name, room)
    publishers: list[tuple[str, str | None, int]] = field(default_factory=list)  # (name, probe, room)
    groups: dict[int, list[str]] = field(default_factory=dict)           # room -> members (creator first)


@dataclass
class Stats:
    deliveries: int = 0
    late: int = 0
    publishes: int = 0
    connects: int = 0
    late_connects: int = 0
    attempts: int = 0
    open: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    latency_max: int = 0
    connect_latency: dict[int, int] = field(default_factory=dict)
    connect_latency_max: int = 0
    errors: Counter = field(default_factory=Counter)
    close_codes: Counter = field(default_factory=Counter)
    close_reasons: dict[int, str] = field(default_factory=dict)
    deadline_ns: int = NEVER


class Worker:
    """One process's share of the clients, driven phase by phase by the parent."""

    def __init__(self, plan: Plan, pipe: Connection) -> None:
        self.plan = plan
        self.pipe = pipe
        self.stats = Stats()
        self.dialect = DIALECTS[plan.protocol](plan)
        self.clients: list[WsClient] = []
        self.pairs: list[tuple[WsClient, WsClient]] = []   # (publisher, probe)
        self.connected: Counter = Counter()                 # room -> clients in it
        self.room_publishes: Counter = Counter()
        self._source = 0
        self.receiver = Receiver()
        self.sampling = trio.CancelScope()
        self.nursery: trio.Nursery

    # --- plumbing -------------------------------------------------------------

    def report(self, *message: Any) -> None:
        self.pipe.send(message)

    async def next_message(self) -> Any:
        while not self.pipe.poll():
            await trio.lowlevel.wait_readable(self.pipe.fileno())
        return self.pipe.recv()

    def error(self, kind: str) -> None:
        self.stats.errors[kind] += 1

    def next_source(self) -> str | None:
        sources = self.plan.sources
        if not sources:
            return None
        self._source += 1
        return sources[self._source % len(sources)]

    def token_for(self, name: str) -> str | None:
        if name in self.plan.tokens:
            return self.plan.tokens[name]
        if self.plan.jwt_secret:
            return mint_token(self.plan.jwt_secret, name)
        return None

    async def open_client(self, name: str, room: int) -> WsClient | None:
        """Connect and authenticate one client; None (error counted) if it fails."""
        client = WsClient(self, name, room)
        started = time.monotonic_ns()
        opened = False
        try:
            with trio.fail_after(self.plan.connect_timeout):
                await client.open(self.plan.paths[room])
                self.receiver.add(client)
                await self.dialect.authenticate(client)
            opened = True
        except trio.TooSlowError:
            self.error("timeout: connect and auth took over %gs" % self.plan.connect_timeout)
        except LoadError as exc:
            self.error(str(exc))
        except OSError as exc:
            self.error(f"connect: {type(exc).__name__}")
        finally:
            if not opened:  # failed, or cancelled at the end of a storm
                with trio.CancelScope(shield=True):
                    await client.abort()
        if not opened:
            return None
        us = (time.monotonic_ns() - started) // 1000
        stats = self.stats
        b = bucket(us)
        stats.connect_latency[b] = stats.connect_latency.get(b, 0) + 1
        stats.connect_latency_max = max(stats.connect_latency_max, us)
        if time.monotonic_ns() < stats.deadline_ns:
            stats.connects += 1
        else:
            stats.late_connects += 1
        self.clients.append(client)
        self.connected[room] += 1
        return client

    async def open_many(self, wanted: list[tuple[str, int]]) -> list[WsClient | None]:
        """Open clients with at most ``concurrency`` handshakes in flight."""
        limiter = trio.CapacityLimiter(self.plan.concurrency)
        result: list[WsClient | None] = [None] * len(wanted)

        async def one(i: int, name: str, room: int) -> None:
            async with limiter:
                result[i] = await self.open_client(name, room)

        async def progress() -> None:
            while True:
                await trio.sleep(0.25)
                self.report("setup", self.stats.open, sum(self.stats.errors.values()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as openers:
                for i, (name, room) in enumerate(wanted):
                    openers.start_soon(one, i, name, room)
            nursery.cancel_scope.cancel()
        return result

    # --- the phases -------------------------------------------------------------

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.receiver.run)
            while True:
                message = await self.next_message()
                kind = message[0]
                if kind == "connect":
                    wanted = list(self.plan.subscribers)
                    if self.plan.protocol == "gradagenda":  # members before the group exists
                        wanted += [(name, room) for name, _, room in self.plan.publishers]
                    await self.open_many(wanted)
                elif kind == "prepare":
                    await self.prepare()
                elif kind == "run":
                    await self.run(*message[1:])
                    continue  # "run" reports itself
                elif kind == "finish":
                    await self.finish()
                    nursery.cancel_scope.cancel()
                    return
                self.report("done", kind, self.stats.open, sum(self.stats.errors.values()))

    async def prepare(self) -> None:
        """Publishers join after every subscriber (so probes are served last)."""
        plan = self.plan
        if plan.protocol == "gradagenda":
            await self.prepare_groups()
            return
        wanted: list[tuple[str, int]] = []
        for name, probe, room in plan.publishers:
            wanted.append((name, room))
            if probe:
                wanted.append((probe, room))
        opened = iter(await self.open_many(wanted))
        for name, probe, room in plan.publishers:
            publisher = next(opened)
            watcher = next(opened) if probe else publisher
            if publisher is not None and watcher is not None:
                watcher.ack_tag = publisher.name.encode() + b":"
                self.pairs.append((publisher, watcher))

    async def prepare_groups(self) -> None:
        """Creators make one group per room; publishers learn its session id."""
        plan = self.plan
        members = {c.name: c for c in self.clients}

        async def create(room: int, names: list[str]) -> None:
            creator = members.get(names[0])
            if creator is None:
                return
            try:
                with trio.fail_after(plan.connect_timeout):
                    await self.dialect.create_group(creator, names)
            except (LoadError, trio.TooSlowError) as exc:
                self.error(str(exc) or "timeout: group creation")

        async with trio.open_nursery() as nursery:
            for room, names in plan.groups.items():
                nursery.start_soon(create, room, names)
        for name, _, room in plan.publishers:
            publisher = members.get(name)
            if publisher is None:
                continue
            with trio.move_on_after(plan.connect_timeout):
                await publisher.session_known.wait()
            if not publisher.session:
                self.error("group: session info never arrived")
                continue
            publisher.ack_tag = publisher.name.encode() + b":"
            self.pairs.append((publisher, publisher))

    async def run(self, start: float, deadline: float) -> None:
        """The measured window: publish, storm or hold, and sample each interval."""
        stats = self.stats
        offset = trio.current_time() - time.monotonic()
        start_t, deadline_t = start + offset, deadline + offset
        await trio.sleep_until(start_t)
        stats.deadline_ns = int(deadline * 1e9)
        # Connects and their times count from here on (set-up is reported apart).
        stats.connects, stats.connect_latency, stats.connect_latency_max = 0, {}, 0
        cpu_start = os.times()
        self.nursery.start_soon(self.sample, start_t)
        async with trio.open_nursery() as load:
            if self.plan.scenario == "connect":
                load.start_soon(self.storm, start_t, deadline_t)
            with trio.move_on_at(deadline_t):
                async with trio.open_nursery() as publishing:
                    for publisher, probe in self.pairs:
                        publishing.start_soon(self.publish, publisher, probe, start_t, deadline_t)
                    await trio.sleep_forever()
            await self.drain()
        cpu_end = os.times()
        self.report("ran", {"user": cpu_end.user - cpu_start.user,
                            "system": cpu_end.system - cpu_start.system,
                            "seconds": trio.current_time() - start_t})

    async def drain(self) -> None:
        """Wait (at most ``grace`` seconds) until each probe has seen every
        message its publisher sent: the probe is served last."""
        with trio.move_on_after(self.plan.grace):
            for publisher, probe in self.pairs:
                while probe.acked < publisher.sent and not probe.done.is_set():
                    probe.ack_event = trio.Event()
                    await probe.ack_event.wait()

    async def publish(self, publisher: WsClient, probe: WsClient, start: float,
                      deadline: float) -> None:
        plan, stats = self.plan, self.stats
        rate, window, size = plan.rate_per_publisher, plan.window, plan.size
        tag = publisher.name.encode()
        make = self.dialect.publish
        while not (publisher.done.is_set() or probe.done.is_set()):
            now = trio.current_time()
            sent = publisher.sent
            room = window - (sent - probe.acked)
            due = int((now - start) * rate) + 1 - sent if rate else room
            n = min(due, room)
            if n > 0:
                frames = b"".join(client_frame(make(publisher, message_content(tag, size)))
                                  for _ in range(n))
                try:
                    await publisher.send_raw(frames)
                except LoadError as exc:
                    self.error(str(exc))
                    return
                publisher.sent += n
                stats.publishes += n
                self.room_publishes[publisher.room] += n
            elif due > 0 or not rate:
                probe.ack_event = trio.Event()
                await probe.ack_event.wait()
            else:
                await trio.sleep_until(min(deadline, start + sent / rate))

    async def storm(self, start: float, deadline: float) -> None:
        """Connect at this worker's rate; hold each connection or close it.

        Attempts still under way at the deadline may finish (within
        ``--connect-timeout``): they count as late connects, not as lost.
        """
        rate = self.plan.connect_rate
        if rate <= 0:
            return
        async with trio.open_nursery() as attempts:
            for k in range(math.ceil((deadline - start) * rate)):
                await trio.sleep_until(start + k / rate)
                self.stats.attempts += 1
                attempts.start_soon(self.storm_one, k)

    async def storm_one(self, k: int) -> None:
        client = await self.open_client(f"{self.plan_prefix()}c{k}", 0)
        if client is not None and self.plan.churn:
            with trio.CancelScope(shield=True):  # even at the end of the window
                await client.close()

    def plan_prefix(self) -> str:
        return f"lt{os.getpid() % 100000}w{self.plan.worker_index}"

    async def sample(self, start: float) -> None:
        """Every interval, send the parent what happened since the last one."""
        last = (0, 0, 0, 0, sum(self.stats.errors.values()))
        k = 0
        with self.sampling:
            while True:
                k += 1
                await trio.sleep_until(start + k * self.plan.interval)
                last = self.send_sample(k, last)

    def send_sample(self, k: int, last: tuple) -> tuple:
        stats = self.stats
        now = (stats.deliveries, stats.late, stats.publishes, stats.connects + stats.late_connects,
               sum(stats.errors.values()))
        latency, stats.latency = stats.latency, {}
        connect_latency, stats.connect_latency = stats.connect_latency, {}
        self.report("sample", k, {
            "deliveries": now[0] - last[0] + now[1] - last[1], "publishes": now[2] - last[2],
            "connects": now[3] - last[3], "errors": now[4] - last[4], "open": stats.open,
            "latency": latency, "connect_latency": connect_latency})
        return now

    async def finish(self) -> None:
        stats = self.stats
        self.sampling.cancel()
        # What the last interval sample has not carried yet goes in the final.
        times = os.times()
        self.report("final", {
            "deliveries": stats.deliveries, "late": stats.late, "publishes": stats.publishes,
            "connects": stats.connects, "late_connects": stats.late_connects,
            "attempts": stats.attempts, "open": stats.open,
            "latency": stats.latency, "latency_max": stats.latency_max,
            "connect_latency": stats.connect_latency,
            "connect_latency_max": stats.connect_latency_max,
            "errors": dict(stats.errors), "close_codes": dict(stats.close_codes),
            "close_reasons": stats.close_reasons,
            "connected": dict(self.connected), "room_publishes": dict(self.room_publishes),
            "cpu_total": times.user + times.system})
        limiter = trio.CapacityLimiter(self.plan.concurrency * 4)

        async def close(client: WsClient) -> None:
            async with limiter:
                await client.close()

        with trio.move_on_after(5):
            async with trio.open_nursery() as closing:
                for client in self.clients:
                    closing.start_soon(close, client)


def mint_token(secret: str, user_id: str, ttl: int = 3600) -> str:
    import jwt  # PyJWT, a chatd dependency
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


def worker_process(plan: Plan, pipe: Connection, inherited: list[Connection]) -> None:
    """A worker's body: its own trio loop; SIGINT is the parent's business."""
    die_with_parent(signal.SIGKILL)
    # The parent's ends of earlier workers' pipes came along with the fork:
    # holding them would keep those workers from seeing the parent go.
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    random.seed()
    raise_fd_limit()
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    try:
        trio.run(Worker(plan, pipe).main)
    except BaseException as exc:  # the parent reports it and stops the run
        pipe.send(("crashed", f"{type(exc).__name__}: {exc}"))
        raise


def die_with_parent(sig: int) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies,
    so a killed load test leaves no server or worker behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawned_server_setup() -> None:
    """preexec_fn of a spawned server: one fd per connection; die with us."""
    raise_fd_limit()
    die_with_parent(signal.SIGTERM)


def raise_fd_limit() -> int:
    """Lift the soft file-descriptor limit to the hard one (one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- the server under test ----------------------------------------------------


class ServerProcess:
    """A chatd (or the websockets peer) started by ``--spawn``, in a temp dir."""

    def __init__(self, kind: str, config: dict | None, secret_key: str,
                 cpus: list[int] | None) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix="chatd-loadtest-"))
        self.log_path = self.dir / "server.log"
        # A free port picked here: chatd logs its address at info level only,
        # and the run's server logs at warning.
        self.port = free_port()
        if kind == "chatd":
            config = {**config, "host": f"127.0.0.1:{self.port}"}
            (self.dir / "config.json").write_text(json.dumps(config, indent=2))
            args = [sys.executable, "-m", "chatd", "serve", "--config", "config.json"]
        else:
            args = [sys.executable, str(REPO / "scripts" / "peer_server.py"),
                    "--port", str(self.port), "--secret-key", secret_key]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        env.pop("JWT_SECRET", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=self.dir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=spawned_server_setup)
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)  # polling for the listener to come up
        output = self.output()
        self.stop()
        raise SystemExit(f"loadtest: {self.kind} did not start:\n{output}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def spawn_config(args: argparse.Namespace, paths: list[str], secret_key: str,
                 jwt_secret: str | None) -> dict:
    """A chatd config for this run: loopback, a free port, the abuse limits lifted
    (the load comes from one host, at rates no single client would reach)."""
    if args.scenario == "rooms" and args.protocol != "gradagenda":
        endpoints = [{"path": p, "protocol": args.protocol, "room": p.strip("/")} for p in paths]
    else:
        endpoints = [{"path": paths[0], "protocol": args.protocol}]
    config = {
        "secret-key": secret_key, "endpoints": endpoints,
        "store": "chatd.db", "log-level": args.server_log_level,
        "max-connections": 1_000_000, "max-connections-per-ip": 1_000_000,
        "connect-rate-per-ip": 1e9, "connect-burst-per-ip": 1_000_000,
        "message-rate": 1e9, "message-burst": 1_000_000,
    }
    if jwt_secret:
        config["jwt-secret"] = jwt_secret
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) if found else None


def read_host_seconds() -> tuple[float, float, list[float]]:
    """CPU seconds since boot (/proc/stat): all cores running processes, all
    cores in interrupts (mostly loopback packets: the load itself), and each
    core busy at all (a pinned server's core at 100% is saturated)."""
    tick = os.sysconf("SC_CLK_TCK")
    lines = Path("/proc/stat").read_text().splitlines()
    total = [int(x) for x in lines[0].split()[1:]]
    per_cpu = []
    for line in lines[1:]:
        if not line.startswith("cpu"):
            break
        f = [int(x) for x in line.split()[1:]]
        per_cpu.append((f[0] + f[1] + f[2] + f[5] + f[6]) / tick)
    return (total[0] + total[1] + total[2]) / tick, (total[5] + total[6]) / tick, per_cpu


def read_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the parent: plan, run the phases, report -------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="default: multichat (gradagenda for the gradagenda scenario)")
    t = p.add_argument_group("target")
    t.add_argument("--host", help="server host; anything not loopback must be given here "
                                  "explicitly (default: from --config, else 127.0.0.1)")
    t.add_argument("--port", type=int, help="default: from --config, else 8765")
    t.add_argument("--config", help="the server's chatd config file: host, secrets, endpoints")
    t.add_argument("--path", help="endpoint path (default: the protocol's in --config, "
                                  "else /PROTOCOL)")
    t.add_argument("--paths", help="rooms scenario: comma-separated endpoint paths, one per room")
    t.add_argument("--spawn", nargs="?", const="chatd", choices=("chatd", "websockets"),
                   help="start the server for this run (chatd, or the websockets peer "
                        "scripts/peer_server.py) on a free port, and stop it after")
    t.add_argument("--server-pid", type=int, help="the server's pid: RSS and CPU are reported")
    t.add_argument("--server-cpus", help="with --spawn: pin the server to these CPUs (e.g. 0)")
    t.add_argument("--server-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"), help="with --spawn")
    t.add_argument("--secret-key", help="multichat shared secret (default: from --config)")
    t.add_argument("--jwt-secret", help="HS256 key for GradAgenda/wschat tokens (default: "
                                        "from --config or JWT_SECRET; else `chatd token`)")
    t.add_argument("--source-ips", type=int, default=64,
                   help="spread connections over this many 127.0.0.x source addresses when "
                        "the target is 127.0.0.1 (per-address limits, port ranges); 0: off")
    s = p.add_argument_group("shape")
    s.add_argument("--subscribers", type=int, help="fanout: default 100")
    s.add_argument("--publishers", type=int, default=1, help="per room/group (default 1)")
    s.add_argument("--rooms", type=int, help="rooms/gradagenda: default 10")
    s.add_argument("--room-size", type=int, help="subscribers per room/group (default 10)")
    s.add_argument("--connections", type=int, default=1000, help="idle: default 1000")
    s.add_argument("--connect-rate", type=float, default=100.0,
                   help="connect: new connections a second (default 100)")
    s.add_argument("--churn", action="store_true",
                   help="connect: close each connection once authenticated (default: hold)")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=0.0,
                      help="messages a second, all publishers together (0: as fast as "
                           "the window allows)")
    load.add_argument("--window", type=int,
                      help="messages each publisher may have in flight (default: 64, "
                           "or 1000 with --rate)")
    load.add_argument("--size", type=int, default=100, help="message text bytes (default 100)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    load.add_argument("--workers", type=int, default=1, help="client processes (default 1)")
    load.add_argument("--cpus", help="pin the client workers to these CPUs (e.g. 1)")
    load.add_argument("--interval", type=float, help="seconds per sample (default: 1, "
                                                     "or less for short runs)")
    load.add_argument("--grace", type=float, default=2.0,
                      help="at most this many seconds after the window for messages still "
                           "in flight to arrive (default 2)")
    load.add_argument("--connect-timeout", type=float, default=10.0,
                      help="seconds one connect plus auth may take")
    load.add_argument("--concurrency", type=int, default=200,
                      help="handshakes in flight per worker while setting up")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the result as one JSON line "
                                                         "on stdout (the table goes to stderr)")
    out.add_argument("--progress", action="store_true", help="progress line even without a TTY")
    out.add_argument("--plot", metavar="FILE.png", help="latency and throughput over time")
    args = p.parse_args(argv)
    if args.scenario == "gradagenda":
        if args.protocol not in (None, "gradagenda"):
            p.error("the gradagenda scenario uses --protocol gradagenda")
        args.protocol = "gradagenda"
    args.protocol = args.protocol or "multichat"
    if args.spawn == "websockets" and (args.protocol != "multichat" or args.scenario == "rooms"):
        p.error("--spawn websockets speaks multichat in one lobby only")
    if args.duration <= 0 or args.workers < 1 or args.size < 1:
        p.error("--duration, --workers and --size must be positive")
    if args.publishers < 1 and args.scenario in ("fanout", "rooms", "gradagenda"):
        p.error("--publishers must be at least 1")
    if args.interval is None:
        args.interval = min(1.0, max(0.1, args.duration / 10))
    return args


def cpu_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def resolve_target(args: argparse.Namespace, config: dict) -> tuple[int, str, str, int]:
    """(family, address, Host header, port); refuses non-loopback unless --host."""
    host, port = "127.0.0.1", 8765
    if "host" in config:
        cfg_host, _, cfg_port = config["host"].rpartition(":")
        host = cfg_host.strip("[]") or "127.0.0.1"
        port = int(cfg_port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if args.host:
        host = args.host
    if args.port is not None:
        port = args.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(f"loadtest: cannot resolve {host}: {exc}")
    family, _, _, _, sockaddr = infos[0]
    address = sockaddr[0]
    if not ipaddress.ip_address(address).is_loopback and not args.host:
        raise SystemExit(f"loadtest: refusing {host} ({address}): not a loopback address; "
                         "name it with --host to load a remote server")
    host_header = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return family, address, host_header, port


def default_path(protocol: str, config: dict) -> str:
    endpoints = config.get("endpoints")
    if endpoints is not None:
        for endpoint in endpoints:
            if endpoint["protocol"] == protocol:
                return endpoint["path"]
        raise SystemExit(f"loadtest: the config mounts no {protocol} endpoint")
    if config:
        return config.get("ws-path", "/")  # a config without endpoints: multichat alone
    return f"/{protocol}"


def tokens_from_chatd(names: list[str], config_path: str | None) -> dict[str, str]:
    """Mint tokens with ``chatd token`` (one process per user: slow, but needs no secret)."""
    extra = ["--config", config_path] if config_path else []
    print(f"loadtest: minting {len(names)} tokens with `chatd token` (--jwt-secret is faster)",
          file=sys.stderr)
    tokens = {}
    for batch in range(0, len(names), 8):
        procs = {n: subprocess.Popen([sys.executable, "-m", "chatd", "token", n, "--ttl",
                                      "3600", *extra], stdout=subprocess.PIPE, text=True)
                 for n in names[batch:batch + 8]}
        for name, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit("loadtest: `chatd token` failed; pass --jwt-secret")
            tokens[name] = out.strip()
    return tokens


@dataclass
class Layout:
    """Who is where: rooms (endpoint paths or groups) and their clients."""

    paths: list[str]
    subscribers: list[tuple[str, int]] = field(default_factory=list)
    publishers: list[tuple[str, str | None, int]] = field(default_factory=list)
    groups: dict[int, list[str]] = field(default_factory=dict)


def make_layout(args: argparse.Namespace, config: dict, prefix: str) -> Layout:
    scenario, protocol = args.scenario, args.protocol
    echo = DIALECTS[protocol].echo
    path = args.path or default_path(protocol, config)
    if scenario in ("connect", "idle"):
        layout = Layout([path])
        if scenario == "idle":
            layout.subscribers = [(f"{prefix}i{k}", 0) for k in range(args.connections)]
        return layout
    if scenario == "fanout":
        rooms, size = 1, args.subscribers or 100
        paths = [path]
    else:
        rooms, size = args.rooms or 10, args.room_size or 10
        if protocol == "gradagenda":
            paths = [path] * rooms          # groups share one endpoint
        elif args.paths:
            paths = [p.strip() for p in args.paths.split(",") if p.strip()]
            rooms = len(paths)
        elif args.spawn == "chatd":
            paths = [f"/room-{r}" for r in range(rooms)]
        else:
            raise SystemExit("loadtest: rooms are per endpoint: give --paths /a,/b,... "
                             "(one per room) or --spawn")
    layout = Layout(paths)
    for r in range(rooms):
        subs = [f"{prefix}r{r}s{k}" for k in range(size)]
        pubs = [f"{prefix}r{r}p{k}" for k in range(args.publishers)]
        layout.subscribers += [(n, r) for n in subs]
        if protocol == "gradagenda":
            layout.groups[r] = [*pubs, *subs]
        layout.publishers += [(n, None if echo else f"{prefix}r{r}q{k}", r)
                              for k, n in enumerate(pubs)]
    return layout


def make_plans(args: argparse.Namespace, layout: Layout, target: tuple, secrets: dict,
               tokens: dict[str, str]) -> list[Plan]:
    family, address, host_header, port = target
    sources: list[str] = []
    if address == "127.0.0.1" and args.source_ips > 0:
        sources = [f"127.0.0.{k}" for k in range(1, min(args.source_ips, 254) + 1)]
    publishers_total = max(1, len(layout.publishers))
    window = args.window or (1000 if args.rate else 64)
    plans = []
    for w in range(args.workers):
        plan = Plan(
            scenario=args.scenario, protocol=args.protocol, family=family, address=address,
            port=port, host_header=host_header, paths=layout.paths,
            secret_key=secrets.get("secret-key"), jwt_secret=secrets.get("jwt-secret"),
            tokens={}, sources=sources, size=args.size, window=window,
            rate_per_publisher=args.rate / publishers_total,
            connect_rate=args.connect_rate / args.workers, churn=args.churn,
            connect_timeout=args.connect_timeout, concurrency=args.concurrency,
            interval=args.interval, grace=args.grace, cpus=cpu_list(args.cpus),
            worker_index=w)
        plan.subscribers = layout.subscribers[w::args.workers]
        plan.publishers = layout.publishers[w::args.workers]
        mine = {n for n, _, _ in plan.publishers}
        # A group's creator is its first publisher, so its worker creates it.
        plan.groups = {r: names for r, names in layout.groups.items() if names[0] in mine}
        wanted = {n for n, _ in plan.subscribers} | mine | {
            p for _, p, _ in plan.publishers if p}
        plan.tokens = {n: tokens[n] for n in wanted if n in tokens}
        plans.append(plan)
    return plans


class Run:
    """The parent's side: start workers, step them through the phases, collect."""

    def __init__(self, args: argparse.Namespace, plans: list[Plan], layout: Layout,
                 server_pid: int | None) -> None:
        self.args = args
        self.plans = plans
        self.layout = layout
        self.server_pid = server_pid
        self.show_progress = args.progress or sys.stderr.isatty()
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        self.inbox: trio.MemoryReceiveChannel
        self.samples: dict[int, list[dict]] = {}
        self.setup: dict[int, tuple[int, int]] = {}
        self.result: dict[str, Any] = {}

    def start_workers(self) -> None:
        context = multiprocessing.get_context("fork")
        for plan in self.plans:
            mine, theirs = context.Pipe()
            proc = context.Process(target=worker_process, args=(plan, theirs, self.pipes[:]),
                                   daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def stop_workers(self, wait: float) -> None:
        for proc in self.procs:
            proc.join(wait)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    async def listen(self, index: int, pipe: Connection,
                     send: trio.MemorySendChannel) -> None:
        """Read one worker's messages as they come (a worker must never block
        on a full pipe): samples and progress here, phase replies to gather()."""
        async with send:
            while True:
                try:
                    while not pipe.poll():
                        await trio.lowlevel.wait_readable(pipe.fileno())
                    message = pipe.recv()
                except (EOFError, OSError):
                    send.send_nowait((index, ("exited",)))
                    return
                if message[0] == "setup":
                    self.setup[index] = message[1:]
                    self.progress_setup()
                elif message[0] == "sample":
                    self.samples.setdefault(message[1], []).append(message[2])
                    self.progress_run(message[1])
                else:
                    send.send_nowait((index, message))

    async def gather(self, kind: str) -> list[Any]:
        """Wait until every worker has sent ``kind``; show progress meanwhile."""
        got: dict[int, Any] = {}
        while len(got) < len(self.pipes):
            index, message = await self.inbox.receive()
            if message[0] in ("crashed", "exited"):
                detail = message[1] if len(message) > 1 else "exited"
                raise SystemExit(f"loadtest: worker {index} failed: {detail}")
            if message[0] == kind or (message[0] == "done" and message[1] == kind):
                got[index] = message[1:] if message[0] == kind else message[2:]
                if message[0] == "done":
                    self.setup[index] = message[2:]
        return [got[i] for i in range(len(self.pipes))]

    def broadcast(self, *message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    async def main(self) -> dict[str, Any]:
        args = self.args
        send, self.inbox = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            for i, pipe in enumerate(self.pipes):
                nursery.start_soon(self.listen, i, pipe, send.clone())
            send.close()
            pid = self.server_pid
            rss_before = read_rss_kib(pid) if pid else None
            setup_start = time.monotonic()
            self.phase = "connecting"
            self.broadcast("connect")
            await self.gather("connect")
            self.phase = "publishers join" if args.protocol != "gradagenda" else "groups"
            self.broadcast("prepare")
            await self.gather("prepare")
            setup_seconds = time.monotonic() - setup_start
            self.clear_progress()
            rss_after_setup = read_rss_kib(pid) if pid else None
            start = time.monotonic() + 0.05
            deadline = start + args.duration
            self.phase, self.start, self.deadline = "running", start, deadline
            self.broadcast("run", start, deadline)
            await trio.sleep_until(trio.current_time() + (start - time.monotonic()))
            cpu_before = read_cpu_seconds(pid) if pid else None
            host_before = read_host_seconds()
            own_before = os.times()
            await trio.sleep_until(trio.current_time() + (deadline - time.monotonic()))
            cpu_after = read_cpu_seconds(pid) if pid else None
            host_after = read_host_seconds()
            own_after = os.times()
            ran = await self.gather("ran")  # storm stragglers done, probes caught up
            rss_end = read_rss_kib(pid) if pid else None
            # Every probe has caught up (or the grace ran out); let the other
            # subscribers' workers read what the server wrote them just before.
            self.phase = "draining"
            await trio.sleep(SETTLE)
            self.broadcast("finish")
            finals = [f[0] for f in await self.gather("final")]
            self.clear_progress()
            nursery.cancel_scope.cancel()
        server = None
        if pid:
            server = {"pid": pid, "rss_before_kib": rss_before,
                      "rss_after_setup_kib": rss_after_setup, "rss_end_kib": rss_end,
                      "cpu_pct": None if cpu_before is None or cpu_after is None
                      else round(100 * (cpu_after - cpu_before) / args.duration, 1)}
        def pct(seconds: float) -> float:
            return round(100 * seconds / args.duration, 1)

        host = {"cpus": os.cpu_count(), "busy_pct": pct(host_after[0] - host_before[0]),
                "interrupts_pct": pct(host_after[1] - host_before[1]),
                "parent_pct": pct(own_after.user + own_after.system
                                  - own_before.user - own_before.system),
                "cpu_busy_pct": [pct(b - a) for a, b in zip(host_before[2], host_after[2])]}
        return self.compile(finals, [r[0] for r in ran], setup_seconds, server, host)

    # --- progress ---------------------------------------------------------------

    def progress_setup(self) -> None:
        if not self.show_progress:
            return
        opened = sum(s[0] for s in self.setup.values())
        failed = sum(s[1] for s in self.setup.values())
        sys.stderr.write(f"\r{self.phase}: {opened} open, {failed} errors   ")
        sys.stderr.flush()

    def progress_run(self, k: int) -> None:
        interval, duration = self.args.interval, self.args.duration
        if (not self.show_progress or len(self.samples[k]) < len(self.pipes)
                or k * interval > duration + 1e-9):
            return
        part = self.samples[k]
        elapsed = min(k * interval, duration)
        filled = int(30 * elapsed / duration)
        deliveries = sum(s["deliveries"] for s in part) / interval
        connects = sum(s["connects"] for s in part) / interval
        hist: dict[int, int] = {}
        for s in part:
            merge_into(hist, s["latency"])
        p99 = summarize(hist)
        errors = sum(sum(s["errors"] for s in self.samples[j]) for j in self.samples)
        line = (f"\r[{'#' * filled}{'.' * (30 - filled)}] {elapsed:5.1f}/{duration:g}s "
                f"{deliveries:9,.0f} deliveries/s")
        if self.args.scenario == "connect":
            line += f" {connects:7,.0f} connects/s"
        if p99:
            line += f"  p99 {p99['p99']:.1f} ms"
        line += f"  {sum(s['open'] for s in part):,} open  {errors} errors "
        sys.stderr.write(line)
        sys.stderr.flush()

    def clear_progress(self) -> None:
        if self.show_progress:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()

    # --- the result ---------------------------------------------------------------

    def compile(self, finals: list[dict], ran: list[dict], setup_seconds: float,
                server: dict | None, host: dict) -> dict[str, Any]:
        args, layout = self.args, self.layout
        duration = args.duration
        latency: dict[int, int] = {}
        connect_latency: dict[int, int] = {}
        timeline = []
        for k in sorted(self.samples):
            part = self.samples[k]
            hist: dict[int, int] = {}
            chist: dict[int, int] = {}
            for s in part:
                merge_into(hist, s["latency"])
                merge_into(chist, s["connect_latency"])
            merge_into(latency, hist)
            merge_into(connect_latency, chist)
            timeline.append({
                "t": round(k * args.interval, 3),
                "deliveries_per_s": sum(s["deliveries"] for s in part) / args.interval,
                "publishes_per_s": sum(s["publishes"] for s in part) / args.interval,
                "connects_per_s": sum(s["connects"] for s in part) / args.interval,
                "open": sum(s["open"] for s in part),
                "latency_ms": summarize(hist), "connect_latency_ms": summarize(chist)})
        for f in finals:
            merge_into(latency, f["latency"])
            merge_into(connect_latency, f["connect_latency"])
        errors: Counter = Counter()
        close_codes: Counter = Counter()
        reasons: dict[int, str] = {}
        connected: Counter = Counter()
        room_publishes: Counter = Counter()
        for f in finals:
            errors.update(f["errors"])
            close_codes.update(f["close_codes"])
            for code, reason in f["close_reasons"].items():
                reasons.setdefault(code, reason)
            connected.update(f["connected"])
            room_publishes.update(f["room_publishes"])
        echo = DIALECTS[args.protocol].echo
        expected = sum(n * (connected[r] - (0 if echo else 1)) for r, n in room_publishes.items())
        deliveries = sum(f["deliveries"] for f in finals)
        late = sum(f["late"] for f in finals)
        publishes = sum(f["publishes"] for f in finals)
        connects = sum(f["connects"] for f in finals)
        late_connects = sum(f["late_connects"] for f in finals)
        attempts = sum(f["attempts"] for f in finals)
        cpu_user = sum(r["user"] for r in ran)
        cpu_system = sum(r["system"] for r in ran)
        seconds = max(max(r["seconds"] for r in ran), duration)
        per_worker = [round(100 * (r["user"] + r["system"]) / seconds, 1) for r in ran]
        open_now = sum(f["open"] for f in finals)
        if server:
            held = open_now if args.scenario != "connect" or not args.churn else 0
            base = server["rss_before_kib"]
            after = server["rss_end_kib"] if args.scenario == "connect" else server["rss_after_setup_kib"]
            server["rss_per_connection_kib"] = (round((after - base) / held, 2)
                                                if held and base and after else None)
        return {
            "scenario": args.scenario, "protocol": args.protocol,
            "target": f"ws://{self.plans[0].host_header}", "paths": sorted(set(layout.paths)),
            "workers": args.workers, "duration_s": duration,
            "subscribers": len(layout.subscribers), "publishers": len(layout.publishers),
            "rooms": len(set(layout.paths)) if args.protocol != "gradagenda" else len(layout.groups),
            "message_bytes": args.size, "rate_target": args.rate,
            "window": self.plans[0].window,
            "connections": open_now, "setup_s": round(setup_seconds, 3),
            "publishes": publishes, "publish_rate": round(publishes / duration, 1),
            "deliveries": deliveries, "deliveries_per_s": round(deliveries / duration, 1),
            "late_deliveries": late, "expected_deliveries": expected,
            "delivered_ratio": round((deliveries + late) / expected, 4) if expected else None,
            "latency_ms": summarize(latency, max(f["latency_max"] for f in finals) or None),
            "connects": connects, "late_connects": late_connects, "connect_attempts": attempts,
            "connects_per_s": round(connects / duration, 1) if args.scenario == "connect" else None,
            "connect_latency_ms": summarize(connect_latency,
                                            max(f["connect_latency_max"] for f in finals) or None),
            "errors": dict(errors), "error_count": sum(errors.values()),
            "close_codes": {str(c): n for c, n in sorted(close_codes.items())},
            "close_reasons": {str(c): r for c, r in sorted(reasons.items()) if r},
            "server": server,
            "client": {"cpu_pct": round(100 * (cpu_user + cpu_system) / seconds, 1),
                       "user_pct": round(100 * cpu_user / seconds, 1),
                       "system_pct": round(100 * cpu_system / seconds, 1),
                       "worker_cpu_pct": per_worker},
            "host": host,
            "pinned": {"server": cpu_list(args.server_cpus), "client": cpu_list(args.cpus)},
            "timeline": timeline,
        }


# --- output ------------------------------------------------------------------


def others_pct(r: dict[str, Any]) -> float:
    """CPU (% of a core) used during the window by other processes than the
    server and this test: another load on the machine skews the result."""
    host, server = r["host"], r["server"] or {}
    # A process's own CPU time may include interrupts it served.
    return max(0.0, host["busy_pct"] + host["interrupts_pct"] - r["client"]["cpu_pct"]
               - host["parent_pct"] - (server.get("cpu_pct") or 0))


def summary_table(r: dict[str, Any]) -> str:
    def ms(d: dict | None) -> str:
        if not d:
            return "-"
        return (f"p50 {d['p50']:.2f}  p90 {d['p90']:.2f}  p99 {d['p99']:.2f}  "
                f"max {d['max']:.2f} ms  ({d['count']:,} samples)")

    shape = {"fanout": f"{r['subscribers']} subscribers, {r['publishers']} publishers",
             "rooms": f"{r['rooms']} rooms, {r['subscribers']} subscribers, "
                      f"{r['publishers']} publishers",
             "gradagenda": f"{r['rooms']} groups, {r['subscribers']} members, "
                           f"{r['publishers']} publishers",
             "connect": "connection storm", "idle": "idle connections"}[r["scenario"]]
    rows = [("target", f"{r['target']} {', '.join(r['paths'])} ({r['protocol']})"),
            ("run", f"{r['scenario']}: {shape}; {r['duration_s']:g} s, {r['workers']} worker(s)"),
            ("connections", f"{r['connections']:,} open; set up in {r['setup_s']:.2f} s")]
    if r["scenario"] in ("fanout", "rooms", "gradagenda"):
        ratio = f"{100 * r['delivered_ratio']:.1f}%" if r["delivered_ratio"] is not None else "-"
        rows += [("publishes", f"{r['publishes']:,} ({r['publish_rate']:,.1f}/s, "
                               f"{r['message_bytes']} B, window {r['window']})"),
                 ("deliveries", f"{r['deliveries']:,} ({r['deliveries_per_s']:,.0f}/s); "
                                f"{ratio} of {r['expected_deliveries']:,} expected arrived"),
                 ("latency", ms(r["latency_ms"]))]
    if r["scenario"] == "connect":
        late = f", {r['late_connects']:,} more after the window" if r["late_connects"] else ""
        rows += [("connects", f"{r['connects']:,} of {r['connect_attempts']:,} attempts in the "
                              f"window ({r['connects_per_s']:,.1f}/s, auth included{late})"),
                 ("connect time", ms(r["connect_latency_ms"]))]
    errors = ", ".join(f"{n}x {k}" for k, n in sorted(r["errors"].items())) or "none"
    codes = ", ".join(f"{n}x {c}" + (f" ({r['close_reasons'][c]})" if c in r["close_reasons"]
                                     else "") for c, n in r["close_codes"].items()) or "none"
    rows += [("errors", errors), ("close codes", codes)]
    server = r["server"]
    if server:
        def mib(kib: int | None) -> str:
            return f"{kib / 1024:.1f} MiB" if kib else "?"
        per = server.get("rss_per_connection_kib")
        after, when = ((server["rss_end_kib"], "at the end") if r["scenario"] == "connect"
                       else (server["rss_after_setup_kib"], "connected"))
        rows.append(("server", f"pid {server['pid']}: CPU {server['cpu_pct']}% of a core; RSS "
                               f"{mib(server['rss_before_kib'])} idle, {mib(after)} {when}"
                               + (f" ({per:.1f} KiB per connection)" if per else "")))
    client = r["client"]
    rows.append(("client CPU", f"{client['cpu_pct']}% of a core (user {client['user_pct']}%, "
                               f"system {client['system_pct']}%); per worker "
                               f"{', '.join(f'{c}%' for c in client['worker_cpu_pct'])}"))
    host = r["host"]
    rows.append(("host", f"{host['cpus']} CPUs busy "
                         f"{', '.join(f'{c:.0f}%' for c in host['cpu_busy_pct'])}; processes "
                         f"used {host['busy_pct']}% of a core, interrupts {host['interrupts_pct']}%"
                         + (f"; {others_pct(r):.0f}% was neither the server nor this test"
                            if server else "")))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if r["delivered_ratio"] is not None and r["delivered_ratio"] < 0.99:
        lines.append("  note: messages went missing. chatd drops a connection's frames beyond "
                     "its message-rate (default 100/s): lift it in the server's config, or "
                     "pace with --rate")
    busy = host["cpu_busy_pct"]
    client_cores = [busy[c] for c in r["pinned"]["client"] or () if c < len(busy)]
    if max(client["worker_cpu_pct"]) > 85 or (client_cores and max(client_cores) >= 95):
        lines.append("  warning: the client was near a full core, so these numbers may "
                     "measure the client; add --workers (or cores)")
    return "\n".join(lines)


def check_plotting() -> None:
    """Before the run: --plot needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("loadtest: --plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None


def plot(path: str, r: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = r["timeline"]
    t = [p["t"] for p in timeline]
    storm = r["scenario"] == "connect"
    key = "connect_latency_ms" if storm else "latency_ms"
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5))
    for q, style in (("p50", "-"), ("p90", "-"), ("p99", "-"), ("max", ":")):
        values = [p[key][q] if p[key] else float("nan") for p in timeline]
        top.plot(t, values, style, label=q)
    top.set_yscale("log")
    top.set_ylabel("connect + auth time (ms)" if storm else "end-to-end latency (ms)")
    top.legend(loc="upper left", ncol=4)
    top.grid(True, which="both", alpha=0.3)
    if storm or r["scenario"] == "idle":
        bottom.plot(t, [p["connects_per_s"] for p in timeline], label="connects/s")
        bottom.set_ylabel("connects/s")
        other = bottom.twinx()
        other.plot(t, [p["open"] for p in timeline], "g--", label="open connections")
        other.set_ylabel("open connections")
    else:
        bottom.plot(t, [p["deliveries_per_s"] for p in timeline], label="deliveries/s")
        bottom.set_ylabel("deliveries/s")
        other = bottom.twinx()
        other.plot(t, [p["publishes_per_s"] for p in timeline], "r--", label="publishes/s")
        other.set_ylabel("publishes/s")
    lines = bottom.get_lines() + other.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], loc="upper right")
    for ax in (top, bottom):
        ax.axvline(r["duration_s"], color="grey", lw=0.8)
    bottom.set_xlabel("seconds (grey line: end of the measured window)")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(f"chatd {r['scenario']} ({r['protocol']}), {r['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"loadtest: cannot read {path}: {exc}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server and workers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.plot:
        check_plotting()
    config = load_config_file(args.config)
    raise_fd_limit()
    secrets = {"secret-key": args.secret_key or config.get("secret-key"),
               "jwt-secret": args.jwt_secret or os.environ.get("JWT_SECRET")
               or config.get("jwt-secret")}
    prefix = f"lt{os.getpid() % 100000}"
    server: ServerProcess | None = None
    if args.spawn:
        if args.config or args.port or args.host:
            raise SystemExit("loadtest: --spawn starts its own server: drop --config/--port/--host")
        secrets["secret-key"] = secrets["secret-key"] or base64.b32encode(random.randbytes(10)).decode()
        if args.protocol == "gradagenda" or (args.protocol == "wschat" and args.jwt_secret):
            secrets["jwt-secret"] = secrets["jwt-secret"] or random.randbytes(16).hex()
        else:
            secrets["jwt-secret"] = None
        paths = make_layout(args, {}, prefix).paths
        server = ServerProcess(args.spawn, spawn_config(args, sorted(set(paths)), secrets["secret-key"],
                                                        secrets["jwt-secret"]),
                               secrets["secret-key"], cpu_list(args.server_cpus))
        args.port = server.port
        args.server_pid = server.proc.pid
    try:
        target = resolve_target(args, config)
        layout = make_layout(args, config, prefix)
        if args.protocol == "multichat" and not secrets["secret-key"]:
            raise SystemExit("loadtest: multichat needs --secret-key (or --config)")
        tokens: dict[str, str] = {}
        if args.protocol == "gradagenda" and not secrets["jwt-secret"]:
            names = [n for n, _ in layout.subscribers] + [n for n, _, _ in layout.publishers]
            tokens = tokens_from_chatd(sorted(set(names)), args.config)
        plans = make_plans(args, layout, target, secrets, tokens)
        run = Run(args, plans, layout, args.server_pid)
        run.start_workers()
        wait = 0.0
        try:
            result = trio.run(run.main)
            wait = 10.0  # workers close their connections, then exit
        finally:
            run.stop_workers(wait)
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
    table = summary_table(result)
    if args.plot:
        plot(args.plot, result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
