#!/usr/bin/env python3
"""How many log bytes can one client make chatd write? (issue 19, item 3)

Starts chatd (``python -m chatd serve``) on a free loopback port with all
five endpoints, its stderr (the text log, at the default level ``info``)
in a file, then runs one of the inputs below for ``--seconds`` from
``--connections`` clients (all from 127.0.0.1) and prints the log bytes
written during the run: in all, per second, and per connection per second.

Inputs (``--input``), each a way a client makes chatd log:

- ``socialvp-command``: identify, then ``{"command":"ccc…(4000)"}`` frames
  (an unknown command is logged, quoting it);
- ``wcp-type``: join, then ``{"type":"x\\n…(4000)","data":"x"}`` (msgspec's
  error text quotes the value);
- ``wschat-json``: 4,000 bytes that are not JSON;
- ``multichat-json``: register, then 4,000 bytes that are not JSON;
- ``churn``: a connection that fails wcp's join with a 4,000-byte user_id,
  again and again (connected / authentication failed / disconnected lines).

``--no-exempt`` sets ``limits-exempt`` to ``[]`` so that 127.0.0.1 gets
the per-address limits a remote client gets (by default loopback is
exempt). ``--pythonpath DIR`` runs another checkout's chatd (before/after).

    python scripts/log_volume.py --input socialvp-command --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

FILL = "c" * 3990


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(port: int, kind: str, index: int, deadline: float) -> int:
    """Send the input until ``deadline``; frames sent."""
    url = f"ws://127.0.0.1:{port}"
    sent = 0
    if kind == "churn":
        while trio.current_time() < deadline:
            try:
                async with open_websocket_url(url + "/wcp") as ws:
                    await ws.send_message(json.dumps({"type": "user_joined",
                                                      "user_id": "\u200b" + FILL}))
                    await ws.get_message()  # the refusal; then close at once
            except (ConnectionClosed, HandshakeError, OSError):
                pass
            sent += 1
        return sent
    path, hello, frame = {
        "socialvp-command": ("/socialvp", {"command": "identify", "name": f"flood{index}"},
                             json.dumps({"command": FILL})),
        "wcp-type": ("/wcp", {"type": "user_joined", "user_id": f"flood{index}"},
                     json.dumps({"type": "x\n2026-12-07 20:00:00,000 ERROR chatd: FORGED" + FILL,
                                 "data": "x"})),
        "wschat-json": ("/wschat", None, FILL),
        "multichat-json": ("/multichat", {"action": "register", "client-name": f"flood{index}",
                                          "secret-key": "log-volume-secret"}, FILL),
    }[kind]
    async with open_websocket_url(url + path, message_queue_size=10_000) as ws:
        if hello is not None:
            await ws.send_message(json.dumps(hello))
        async with trio.open_nursery() as nursery:
            async def drain() -> None:
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed:
                    pass
            nursery.start_soon(drain)
            while trio.current_time() < deadline:
                await ws.send_message(frame)
                sent += 1
            nursery.cancel_scope.cancel()
    return sent


async def flood(port: int, kind: str, connections: int, seconds: float) -> list[int]:
    deadline = trio.current_time() + seconds
    counts = [0] * connections

    async def run(i: int) -> None:
        counts[i] = await one_client(port, kind, i, deadline)

    async with trio.open_nursery() as nursery:
        for i in range(connections):
            nursery.start_soon(run, i)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="socialvp-command",
                        choices=["socialvp-command", "wcp-type", "wschat-json", "multichat-json",
                                 "churn"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--no-exempt", action="store_true")
    parser.add_argument("--pythonpath", help="run chatd from this directory")
    args = parser.parse_args()
    port = free_port()
    config = {"host": f"127.0.0.1:{port}", "secret-key": "log-volume-secret",
              "jwt-secret": "log-volume-jwt-secret-of-32-bytes-at-least",
              "store": ":memory:", "web-client": None,
              "endpoints": [{"path": f"/{p}", "protocol": p} for p in
                            ("multichat", "socialvp", "wschat", "wcp")]}
    if args.no_exempt:
        config["limits-exempt"] = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config))
        log_path = Path(tmp, "chatd.log")
        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = args.pythonpath
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "chatd", "serve", "--config",
                                     "config.json"], cwd=tmp, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            while b"listening on" not in log_path.read_bytes():
                if proc.poll() is not None:
                    sys.exit(f"chatd exited:\n{log_path.read_text()}")
                time.sleep(0.05)
            before = log_path.stat().st_size
            started = time.monotonic()
            counts = trio.run(flood, port, args.input, args.connections, args.seconds)
            elapsed = time.monotonic() - started
            time.sleep(0.5)  # lines of the last frames
            written = log_path.stat().st_size - before
            text = log_path.read_bytes()[before:].decode(errors="replace")
        finally:
            proc.terminate()
            proc.wait()
    lines = text.count("\n")
    print(f"input {args.input}, {args.connections} connection(s), {elapsed:.1f} s, "
          f"{'loopback not exempt' if args.no_exempt else 'loopback exempt (default)'}")
    print(f"frames (or connections) sent: {sum(counts)}")
    print(f"log: {written} bytes, {lines} lines; {written / elapsed / 1024:.2f} KiB/s; "
          f"{written / elapsed / args.connections:.0f} B/s per connection; "
          f"longest line {max((len(line) for line in text.splitlines()), default=0)} chars")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
