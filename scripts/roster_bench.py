"""How big a room can a newcomer join? (issue 19 item 1)

Starts chatd (a real process, the defaults but for the endpoints:
socialvp and wcp on one lobby, a ``:memory:`` store), fills the lobby
with ``--clients`` socialvp clients named with ``--name-length``
characters each, then joins one wcp client that reads as fast as it can
and counts the roster's ``user_joined`` frames. Prints the room size, the
roster's bytes, how long the roster took and how the joiner ended up:
``joined`` (every name received, then a message of the room after it)
or the close code and reason.

    python scripts/roster_bench.py --clients 900 --name-length 256
    python scripts/roster_bench.py --clients 5000 --name-length 8

Client sockets count against this process's open-file limit (and the
server's): ``ulimit -n`` must exceed ``--clients`` by a few dozen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage


class Ws:
    """A minimal WebSocket client on a trio stream (wsproto)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list = []
        self.bytes = 0

    @classmethod
    async def open(cls, port: int, path: str) -> "Ws":
        self = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target=path)))
        event = await self.next()
        assert isinstance(event, AcceptConnection), event
        return self

    async def send(self, obj: dict) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(obj))))

    async def next(self):
        while not self.events:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.bytes += len(data)
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def message(self):
        """The next whole text message as JSON, or the close event / None."""
        parts = []
        while True:
            event = await self.next()
            if not isinstance(event, TextMessage):
                return event
            parts.append(event.data)
            if event.message_finished:
                return json.loads("".join(parts))


def name(i: int, length: int) -> str:
    head = f"u{i}"
    return head + "x" * max(0, length - len(head))


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "config.json"
    config.write_text(json.dumps({
        "host": "127.0.0.1:0", "store": ":memory:", "log-level": "info",
        "endpoints": [{"path": "/socialvp", "protocol": "socialvp"},
                      {"path": "/wcp", "protocol": "wcp"}]}))
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "chatd", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        port = None
        for _ in range(500):
            text = (tmp / "server.log").read_text(errors="replace")
            if "listening on" in text:
                port = int(text.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])
                break
            await trio.sleep(0.02)
        if port is None:
            print(text)
            return 1
        room = []
        for i in range(args.clients):
            peer = await Ws.open(port, "/socialvp")
            await peer.message()  # init
            await peer.send({"command": "identify", "name": name(i, args.name_length)})
            answer = await peer.message()
            assert answer.get("code") == 300, answer
            room.append(peer)
        joiner = await Ws.open(port, "/wcp")
        start = time.perf_counter()
        await joiner.send({"type": "user_joined", "user_id": "joiner", "display_name": "Joiner"})
        got = 0
        outcome = "joined"
        with trio.move_on_after(args.timeout) as scope:
            while got < args.clients:
                frame = await joiner.message()
                if not isinstance(frame, dict):
                    outcome = (f"closed {frame.code} {frame.reason}"
                               if isinstance(frame, CloseConnection) else "connection lost")
                    break
                if frame.get("type") == "user_joined":
                    got += 1
        elapsed = time.perf_counter() - start
        roster_bytes = joiner.bytes
        if scope.cancelled_caught:
            outcome = f"timed out after {args.timeout} s"
        if outcome == "joined":
            await room[0].send({"command": "broadcast", "message": "after the roster"})
            while (frame := await joiner.message()) and isinstance(frame, dict) and \
                    frame.get("type") != "message":
                pass
            if not (isinstance(frame, dict) and frame.get("data") == "after the roster"):
                outcome = f"roster whole, then {frame!r}"
        print(f"room of {args.clients} socialvp clients, names of {args.name_length} chars: "
              f"roster {got} names, {roster_bytes / 1024:.0f} KiB in {elapsed:.2f} s; "
              f"joiner {outcome}; load {os.getloadavg()[0]:.2f}")
        return 0 if outcome == "joined" else 1
    finally:
        proc.terminate()  # a big room takes a while to close
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=900)
    parser.add_argument("--name-length", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0)
    sys.exit(trio.run(main, parser.parse_args()))
