"""How a lobby message's cost grows with the number of protocols present.

Starts chatd as a subprocess (all lobby protocols in room ``lobby``), puts
``--receivers`` clients into the lobby split evenly over the first 1, 2,
3 and 4 lobby protocols (multichat, socialvp, wschat, wcp), has one more
multichat client publish ``--messages`` messages, and reports deliveries
per second for each case. Every case delivers the same number of frames;
what changes is how many encodings and frames the router builds per
message (one per protocol present). Besides the wall-clock rate (which
includes these clients, on the same machine) it reports the server
process's own CPU time per delivery, read from ``/proc`` (Linux), and the
time the lobby's fan-out alone takes per message, measured in process
without sockets (encode and frame once per protocol, then one outbox
hand-off per recipient).

    python scripts/protocol_cost.py --receivers 100 --messages 2000

The receivers are raw sockets that count frames without parsing JSON, so
the client side stays cheap next to the server. Messages go out in
windows (``--window``) so no receiver's outbox overflows: chatd cuts off
a slow consumer, and that is not what is measured here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from chatd.outbox import Client, Flusher
from chatd.events import Join, Publish
from chatd.lobby import Lobby
from chatd.protocols import PROTOCOL_CLASSES
from loadgen.wire import ZERO_KEY, client_frame

PROTOCOLS = ("multichat", "socialvp", "wschat", "wcp")
SECRET = "protocol-cost-secret"


# --- a minimal WebSocket client over a raw socket ---------------------------------


class RawClient:
    """Sends masked text frames; reads and counts the server's frames cheaply."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int, path: str) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            await client._fill()
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"handshake refused at {path}: {head[:80]!r}")
        client.buffer = bytearray(rest)
        return client

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise RuntimeError("server closed the connection")
        self.buffer += data

    async def send(self, obj: dict) -> None:
        await self.stream.send_all(client_frame(json.dumps(obj).encode(), key=ZERO_KEY))

    def _frame_end(self, pos: int) -> tuple[int, int] | None:
        """(payload start, frame end) of the frame at ``pos``, if it is all here."""
        buf = self.buffer
        if len(buf) - pos < 2:
            return None
        n = buf[pos + 1] & 0x7F
        start = pos + 2
        if n == 126:
            if len(buf) - pos < 4:
                return None
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        elif n == 127:
            if len(buf) - pos < 10:
                return None
            n = int.from_bytes(buf[pos + 2:pos + 10], "big")
            start = pos + 10
        end = start + n
        return (start, end) if end <= len(buf) else None

    async def recv(self) -> bytes:
        while (span := self._frame_end(0)) is None:
            await self._fill()
        start, end = span
        if self.buffer[0] & 0x0F == 0x8:
            raise RuntimeError(f"server closed: {bytes(self.buffer[start:end])!r}")
        payload = bytes(self.buffer[start:end])
        del self.buffer[:end]
        return payload

    async def skip_until(self, marker: bytes) -> None:
        while marker not in await self.recv():
            pass

    async def count(self, n: int) -> None:
        """Read exactly ``n`` frames, without looking inside them."""
        pos = 0
        while n:
            span = self._frame_end(pos)
            if span is None:
                del self.buffer[:pos]
                pos = 0
                await self._fill()
                continue
            pos = span[1]
            n -= 1
        del self.buffer[:pos]


# --- joining the lobby in each protocol -------------------------------------------


async def join(port: int, protocol: str, name: str) -> RawClient:
    """A client of ``protocol`` that the server has surely let into the lobby."""
    client = await RawClient.connect(port, f"/{protocol}")
    if protocol == "multichat":
        await client.send({"action": "register", "client-name": name, "secret-key": SECRET})
        await client.skip_until(b"register-ack")
    elif protocol == "socialvp":
        await client.recv()  # init
        await client.send({"command": "identify", "name": name})
        await client.skip_until(b'"code":300')
    elif protocol == "wschat":
        await client.send({"usr": name, "msg": "hello"})
        await client.skip_until(f'"usr":"{name}"'.encode())  # its own echo
    elif protocol == "wcp":
        joined = {"type": "user_joined", "user_id": name, "display_name": name}
        await client.send(joined)
        await client.send(joined)  # answered only once the first has been handled
        await client.skip_until(b"already joined")
    return client


class Countdown:
    """Wakes the sender once every receiver has read the current window."""

    def __init__(self) -> None:
        self.remaining = 0
        self.done = trio.Event()

    def reset(self, n: int) -> None:
        self.remaining = n
        self.done = trio.Event()

    def arrive(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(port: int, server_pid: int, protocols: tuple[str, ...], receivers: int,
                  messages: int, window: int) -> tuple[float, float]:
    """Deliveries per second, and server CPU microseconds per delivery, with
    ``receivers`` clients spread over ``protocols``."""
    clients = [await join(port, protocols[i % len(protocols)], f"r{i}")
               for i in range(receivers)]
    sender = await join(port, "multichat", "sender")
    # Everything before this marker (joins, hellos) is set-up, not measured.
    await sender.send({"action": "client-message", "content": "barrier"})
    for client in clients:
        await client.skip_until(b"barrier")

    windows = [min(window, messages - i) for i in range(0, messages, window)]
    countdown = Countdown()
    go = [trio.Event() for _ in windows]

    async def receive(client: RawClient) -> None:
        for i, size in enumerate(windows):
            await go[i].wait()
            await client.count(size)
            countdown.arrive()

    message = {"action": "client-message", "content": "x" * 64}
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(receive, client)
        start = time.perf_counter()
        cpu_start = cpu_seconds(server_pid)
        for i, size in enumerate(windows):
            countdown.reset(len(clients))
            go[i].set()
            for _ in range(size):
                await sender.send(message)
            await countdown.done.wait()
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(server_pid) - cpu_start
    for client in [*clients, sender]:
        await client.stream.aclose()
    deliveries = receivers * messages
    return deliveries / elapsed, cpu * 1e6 / deliveries


# --- the router's fan-out alone ------------------------------------------------------


def router_fanout(protocols: tuple[str, ...], receivers: int, messages: int) -> float:
    """Microseconds the lobby spends per published message (encode, frame,
    hand to every outbox), in process and without sockets."""
    lobby = Lobby()
    flusher = Flusher()  # never flushed: the frames stay in each outbox

    def client(protocol: str, name: str) -> Client:
        cls = PROTOCOL_CLASSES[protocol]
        joined = Client(cls, "lobby", "bench", f"/{protocol}", outbox_size=2**31,
                        transport=None, flusher=flusher)
        named = protocol in ("socialvp", "wcp")
        lobby.join(Join(client=joined, name=name, register=named, announce=named))
        return joined

    for i in range(receivers):
        client(protocols[i % len(protocols)], f"r{i}")
    sender = client("multichat", "sender")
    commands = [Publish(client=sender, payload="x" * 64) for _ in range(messages)]
    start = time.perf_counter()
    for command in commands:
        lobby.publish(command)
    return (time.perf_counter() - start) * 1e6 / messages


# --- the server -------------------------------------------------------------------


def start_server(workdir: Path) -> tuple[subprocess.Popen, int, object]:
    config = {
        "host": "127.0.0.1:0", "secret-key": SECRET, "store": ":memory:",
        # The abuse limits would throttle the one fast sender and the many
        # connects; keepalive pings are off because these clients never pong.
        "message-rate": 1e9, "message-burst": 10**9, "connect-rate-per-ip": 1e9,
        "connect-burst-per-ip": 10**9, "max-connections-per-ip": 10**6, "ping-interval": 0,
        "endpoints": [{"path": f"/{p}", "protocol": p} for p in PROTOCOLS],
    }
    (workdir / "config.json").write_text(json.dumps(config))
    log = open(workdir / "server.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "chatd", "serve", "--config", "config.json",
                             "--log-level", "info"], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = (workdir / "server.log").read_text(errors="replace")
        for line in text.splitlines():
            if "listening on" in line:
                address = line.split("listening on ")[1].split(";")[0]
                return proc, int(address.rsplit(":", 1)[1]), log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("chatd did not start:\n" + (workdir / "server.log").read_text())


async def main_async(args: argparse.Namespace, port: int, server_pid: int) -> None:
    print(f"{args.receivers} receivers, {args.messages} messages of 64 characters, "
          f"window {args.window}, best of {args.repeat}")
    print(f"{'protocols':<34} {'deliveries/s':>12} {'server CPU us/delivery':>23} "
          f"{'router us/message':>18}")
    for k in range(1, len(PROTOCOLS) + 1):
        protocols = PROTOCOLS[:k]
        runs = [await measure(port, server_pid, protocols, args.receivers, args.messages,
                              args.window)
                for _ in range(args.repeat)]
        router = min(router_fanout(protocols, args.receivers, args.messages)
                     for _ in range(args.repeat))
        rate = max(r for r, _ in runs)
        cpu = min(c for _, c in runs)
        print(f"{', '.join(protocols):<34} {rate:>12,.0f} {cpu:>23.2f} {router:>18.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=100,
                        help="messages in flight before the sender waits for every receiver")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, log = start_server(Path(tmp))
        try:
            trio.run(main_async, args, port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()


if __name__ == "__main__":
    main()
