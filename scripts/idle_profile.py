#!/usr/bin/env python3
"""Where an idle connection's memory goes: tracemalloc over N authenticated connections.

Runs chatd's ``Server`` in this process (with the collector settings of
``chatd serve``: ``gc.freeze()`` and the raised thresholds), opens
``--connections`` idle multichat connections from ``scripts/loadtest.py
idle`` in another process, and compares a tracemalloc snapshot taken with
them all open against one taken before. Each allocation still alive is
put in a bucket by the innermost frame of its traceback that says what it
is for (the table below), and divided by the connections: the Python
heap per connection, by owner. The RSS per connection is printed too, but
tracemalloc's own bookkeeping inflates it: take RSS from ``loadtest.py
idle --spawn`` (no tracemalloc).

    python scripts/idle_profile.py --connections 10000
    python scripts/idle_profile.py --connections 2000 --top 30

Buckets: the task (trio's Task, its context and cancel status; the
coroutine frames of the connection's ``await`` chain, allocated where each
coroutine is called), trio's epoll registration, the WebSocket parser
(``websockets``' Protocol and its reader generator), the socket, chatd's
own objects (Connection, the protocol object, the transport, the lobby's
entries), and the rest.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatd.config import EndpointConfig, default_config  # noqa: E402
from chatd.server import Server  # noqa: E402

SECRET = "idle-profile"
#: (bucket, a path fragment of the innermost frame that puts an allocation in it)
BUCKETS = [
    ("trio: epoll registration (EpollWaiters, the fd's entry)", "trio/_core/_io_epoll.py"),
    ("trio: the task (Task, context, cancel status, scopes)", "trio/_core/_run.py"),
    ("trio: other", "/trio/"),
    ("WebSocket parser (websockets Protocol, reader generator)", "/websockets/"),
    ("request head parser (h11)", "/h11/"),
    ("chatd: connection task and its coroutine frames", "chatd/connection.py"),
    ("chatd: parking (the idle connections' epoll set)", "chatd/parking.py"),
    ("chatd: server's accept and handshake path", "chatd/server.py"),
    ("chatd: transport (socket wrapper, outbox)", "chatd/transport.py"),
    ("chatd: client (outbox, flusher)", "chatd/outbox.py"),
    ("chatd: lobby and router entries", "chatd/lobby.py"),
    ("chatd: router", "chatd/router.py"),
    ("chatd: protocol object", "chatd/protocols/"),
    ("chatd: other", "/chatd/"),
    ("socket objects", "socket.py"),
]


def bucket_of(trace: tracemalloc.Traceback) -> str:
    for frame in reversed(trace):  # tracemalloc lists the oldest frame first
        for name, fragment in BUCKETS:
            if fragment in frame.filename:
                return name
    return "other"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def profile(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="chatd-idle-"))
    config = default_config()
    config.secret_key = SECRET
    config.host = "127.0.0.1:0"
    config.store = str(tmp / "chatd.db")
    config.endpoints = [EndpointConfig(path="/multichat", protocol="multichat")]
    for key, value in (("max_connections", 1_000_000), ("max_connections_per_ip", 1_000_000),
                       ("connect_rate_per_ip", 1e9), ("connect_burst_per_ip", 1_000_000)):
        setattr(config, key, value)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).run)
        port = server.ports[0]
        tracemalloc.start(args.frames)
        gc.collect()
        before, rss_before = tracemalloc.take_snapshot(), rss_kib()
        command = [sys.executable, str(REPO / "scripts" / "loadtest.py"), "idle",
                   "--port", str(port), "--secret-key", SECRET, "--path", "/multichat",
                   "--connections", str(args.connections), "--workers", "2",
                   "--duration", "600", "--engine", args.engine]
        load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while server.metrics.connections.get("multichat", 0) < args.connections:
                if load.poll() is not None:
                    raise SystemExit("idle_profile: the load test ended before connecting")
                await trio.sleep(0.2)  # a script waiting for a count, not a test
            await trio.sleep(1.0)
            gc.collect()  # what is still alive, not garbage the collector has yet to meet
            after, rss_after = tracemalloc.take_snapshot(), rss_kib()
        finally:
            load.kill()
            load.wait()
        nursery.cancel_scope.cancel()
    n = args.connections
    diff = after.compare_to(before, "traceback")
    per_bucket: Counter = Counter()
    per_line: Counter = Counter()
    for stat in diff:
        if stat.size_diff <= 0:
            continue
        per_bucket[bucket_of(stat.traceback)] += stat.size_diff
        frame = stat.traceback[-1]  # the innermost
        per_line[f"{frame.filename.split('site-packages/')[-1].replace(str(REPO) + '/', '')}"
                 f":{frame.lineno}"] += stat.size_diff
    total = sum(per_bucket.values())
    print(f"{n:,} idle multichat connections: Python heap {total / n:,.0f} B per connection "
          f"(tracemalloc); RSS {(rss_after - rss_before) / n:.2f} KiB per connection "
          f"(inflated by tracemalloc)")
    print(f"\n  {'bytes/conn':>10}  share  bucket")
    for name, size in per_bucket.most_common():
        print(f"  {size / n:>10,.0f}  {100 * size / total:4.0f}%  {name}")
    print(f"\n  {'bytes/conn':>10}  allocated at (innermost frame)")
    for line, size in per_line.most_common(args.top):
        print(f"  {size / n:>10,.0f}  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--frames", type=int, default=12, help="traceback depth kept")
    parser.add_argument("--top", type=int, default=20, help="allocation lines listed")
    parser.add_argument("--engine", default="auto", choices=("auto", "go", "python"))
    args = parser.parse_args()
    os.environ.pop("JWT_SECRET", None)
    trio.run(profile, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
