#!/usr/bin/env python3
"""Does a flood cost everyone else? A conversation's round trip, alone and
beside flooders, and the server's memory under an empty-fragment flood.

Starts chatd (``python -m chatd serve``) with its default limits on a free
loopback port, two endpoints in two rooms: a conversation (two multichat
clients passing a message back and forth) in one, flooders in the other,
so the flood reaches nobody in the conversation and only the server's own
scheduling can hurt it. Phases, each ``--seconds`` long:

1. ``alone``: the conversation by itself;
2. ``messages``: beside ``--flooders`` clients sending messages as fast as
   TCP lets them;
3. ``fragments``: beside ``--flooders`` clients each sending one unfinished
   text frame, then empty continuation fragments without end (never FIN).

It prints the round trip's p50/p90/p99 per phase, what each flooder got
through, the close codes flooders saw, and the server's RSS before and
after the fragment flood. ``--pythonpath DIR`` runs another checkout's
chatd (e.g. an older commit, for before/after figures).

    python scripts/flood_bench.py --seconds 10 --flooders 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from loadgen.wire import ZERO_KEY, client_frame

SECRET = "flood-bench-secret"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One masked client frame (zero mask: the server must not care)."""
    return client_frame(payload, opcode, fin=fin, key=ZERO_KEY)


class Client:
    """A wsproto client for the conversation (it answers pings)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list = []

    @classmethod
    async def open(cls, port: int, path: str, name: str) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target=path)))
        assert isinstance(await client.next(), AcceptConnection)
        await client.send({"action": "register", "client-name": name, "secret-key": SECRET})
        assert json.loads((await client.next()).data)["action"] == "register-ack"
        return client

    async def send(self, obj: dict) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(obj))))

    async def next(self):
        while not self.events:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("server closed")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                else:
                    self.events.append(event)
        return self.events.pop(0)


async def conversation(port: int, seconds: float) -> list[float]:
    """Round trips (seconds) of a message passed alice -> bob -> alice."""
    alice = await Client.open(port, "/talk", "alice")
    bob = await Client.open(port, "/talk", "bob")
    rtts = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        start = time.perf_counter()
        await alice.send({"action": "client-message", "content": f"ping {i}"})
        assert json.loads((await bob.next()).data)["content"] == f"ping {i}"
        await bob.send({"action": "client-message", "content": f"pong {i}"})
        assert json.loads((await alice.next()).data)["content"] == f"pong {i}"
        rtts.append(time.perf_counter() - start)
        i += 1
        await trio.sleep(0.02)  # a lively chat, well under the default message-rate
    await alice.stream.aclose()
    await bob.stream.aclose()
    return rtts


async def flooder(port: int, kind: str, index: int, stop: trio.Event, result: dict) -> None:
    """Flood until ``stop``: messages, or empty fragments after one open frame."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    sock.sendall(frame(1, json.dumps({"action": "register", "client-name": f"flood-{kind}-{index}",
                                      "secret-key": SECRET}).encode()))
    sock.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    if kind == "messages":
        chunk = frame(1, json.dumps({"action": "client-message", "content": "x" * 80}).encode()) * 100
        per_chunk = 100
    else:
        await stream.send_all(frame(1, b'{"action":"client-message","content":"', fin=False))
        chunk = frame(0, b"", fin=False) * 1000
        per_chunk = 1000
    sent = 0
    closed = None

    async def read() -> None:
        # Read everything (other flooders' messages come here too), to see
        # whether and how the server closes this flooder.
        nonlocal closed
        ws = FrameConnection(ConnectionType.CLIENT, trailing_data=head.partition(b"\r\n\r\n")[2])
        while True:
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    closed = f"close {event.code} {event.reason}"
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                closed = closed or "EOF"
                return
            ws.receive_data(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        with trio.move_on_at(trio.current_time() + 3600) as scope:
            async def watch() -> None:
                await stop.wait()
                scope.cancel()
            nursery.start_soon(watch)
            try:
                while True:
                    await stream.send_all(chunk)
                    sent += per_chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = closed or "broken"
        nursery.cancel_scope.cancel()
    result[kind].append({"frames_sent": sent, "closed": closed})
    sock.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentiles(rtts: list[float]) -> dict:
    ms = sorted(r * 1000 for r in rtts)
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50": round(q[49], 3), "p90": round(q[89], 3), "p99": round(q[98], 3)}


async def run(args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="flood-bench-"))
    config = {"host": f"127.0.0.1:{port}", "secret-key": SECRET, "store": str(tmp / "c.db"),
              "endpoints": [{"path": "/talk", "protocol": "multichat", "room": "talk"},
                            {"path": "/flood", "protocol": "multichat", "room": "flood"}],
              "log-level": "warning"}
    (tmp / "config.json").write_text(json.dumps(config))
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    proc = subprocess.Popen([sys.executable, "-m", "chatd", "serve", "--config",
                             str(tmp / "config.json")], env=env, cwd=args.pythonpath or None,
                            stderr=open(tmp / "server.log", "wb"))
    try:
        with trio.fail_after(10):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        out: dict = {"server": args.pythonpath or "this checkout", "phases": {}}
        out["phases"]["alone"] = percentiles(await conversation(port, args.seconds))
        for kind in ("messages", "fragments"):
            result: dict = {kind: []}
            stop = trio.Event()
            rss_before = rss_kib(proc.pid)
            async with trio.open_nursery() as nursery:
                for index in range(args.flooders):
                    nursery.start_soon(flooder, port, kind, index, stop, result)
                await trio.sleep(0.5)  # let the flood build up before measuring
                rtts = await conversation(port, args.seconds)
                stop.set()
            phase = percentiles(rtts)
            phase["flooders"] = result[kind]
            phase["server_rss_kib_before"] = rss_before
            phase["server_rss_kib_after"] = rss_kib(proc.pid)
            out["phases"][kind] = phase
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--pythonpath", help="run the chatd found here instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = trio.run(run, args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"server: {out['server']}")
    for name, phase in out["phases"].items():
        line = f"  {name:9s} round trip p50 {phase['p50']:.2f} ms  p90 {phase['p90']:.2f} ms  " \
               f"p99 {phase['p99']:.2f} ms  ({phase['n']} round trips)"
        print(line)
        if "flooders" in phase:
            sent = [f["frames_sent"] for f in phase["flooders"]]
            closes = sorted({str(f["closed"]) for f in phase["flooders"]})
            print(f"            flooders wrote {sum(sent):,} frames; ended: {', '.join(closes)}; "
                  f"server RSS {phase['server_rss_kib_before'] / 1024:.1f} -> "
                  f"{phase['server_rss_kib_after'] / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
