#!/usr/bin/env python3
"""Throughput of 1, 2 and 3 chatd nodes as one cluster, with the load spread.

Starts its own ``redis-server`` (a free loopback port) and uses a fresh
PostgreSQL database (created on ``--pg-admin``, dropped at the end), then
for each node count starts that many chatd nodes (``broker`` and ``store``
shared, abuse limits lifted) and drives them with ``scripts/loadgen`` (the
load client of ``scripts/loadtest.py``), its worker processes dealt over
the nodes, so subscribers and publishers are spread across them:

1. lobby fan-out, as fast as a window of unacknowledged messages allows
   (peak): deliveries/s and latency percentiles;
2. the same at ``--fraction`` (default 80%) of that peak's publish rate,
   paced: every message must reach every subscriber (no loss);
3. GradAgenda groups (``--rooms`` of ``--room-size``): stored messages/s
   (a message counts once its sender has its confirmed broadcast).

``--mixed`` runs the mixed-writer case instead (issue 18): ``--users``
GradAgenda users, user i on node i mod N, all members of ``--groups``
shared groups, each sending into the groups in turn with ``--window``
unconfirmed, for ``--duration`` seconds; then the same users all on the
first node. It reports stored messages/s, confirmation latency, the
answers ``storage busy`` (and any other failure) and the deadlocks
PostgreSQL counted (``pg_stat_database``), the nodes' CPU per stored
message, stored messages per store transaction, the items published and
received over Redis and the feeds' gap reads (from each node's
``/metrics``), and the spread run's share of the one-node figure.

Each node's CPU is read from /proc. Everything runs on loopback and stops
by itself; a run takes about ``3 x --duration`` seconds per node count.

    python scripts/cluster_bench.py
    python scripts/cluster_bench.py --nodes 1,2 --subscribers 200 --duration 8 --json
    python scripts/cluster_bench.py --mixed --nodes 3 --users 3 --groups 4 --window 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import trio

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(1, str(SCRIPTS.parent))

from loadgen.cli import parse_args  # noqa: E402
from loadgen.plan import make_plans  # noqa: E402
from loadgen.process import raise_fd_limit, read_cpu_seconds, stop_process  # noqa: E402
from loadgen.run import Run  # noqa: E402
from loadgen.scenarios import SCENARIOS  # noqa: E402
from loadgen.target import resolve_target  # noqa: E402

SECRET = "cluster-bench-secret"
JWT_SECRET = "cluster-bench-jwt-secret-of-32-bytes"
PROTOCOLS = ("multichat", "gradagenda")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("cluster_bench: redis-server is not on PATH")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("cluster_bench: redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Database:
    """A fresh PostgreSQL database on the server ``admin`` names."""

    def __init__(self, admin: str) -> None:
        import psycopg

        self.admin = admin
        self.name = f"chatd_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.name}")
        self.url = admin.rsplit("/", 1)[0] + "/" + self.name

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class Node:
    def __init__(self, name: str, workdir: Path, broker: str, store: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir(exist_ok=True)
        config = {
            "host": "127.0.0.1:0", "broker": broker, "store": store, "node-id": name,
            "secret-key": SECRET, "jwt-secret": JWT_SECRET, "log-level": "warning",
            "endpoints": [{"path": f"/{p}", "protocol": p} for p in PROTOCOLS],
            "max-connections": 1_000_000, "max-connections-per-ip": 1_000_000,
            "connect-rate-per-ip": 1e9, "connect-burst-per-ip": 1_000_000,
            "message-rate": 1e9, "message-burst": 1_000_000,
        }
        (self.dir / "config.json").write_text(json.dumps(config))
        self.log = open(self.dir / "chatd.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--config", str(self.dir / "config.json"),
             "--log-level", "info"], cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._port()

    def _port(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in (self.dir / "chatd.log").read_text(errors="replace").splitlines():
                if "listening on" in line:
                    return int(line.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                raise SystemExit(f"cluster_bench: chatd exited:\n{(self.dir / 'chatd.log').read_text()}")
            time.sleep(0.05)
        raise SystemExit("cluster_bench: chatd did not start")

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def metrics(self, names: tuple[str, ...]) -> dict[str, float]:
        """The samples of ``/metrics`` whose names (labels included) start
        with one of ``names``, summed by sample line."""
        found: dict[str, float] = {}
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return found
        for line in data.decode(errors="replace").splitlines():
            if line.startswith(names):
                key, _, value = line.rpartition(" ")
                found[key] = found.get(key, 0.0) + float(value)
        return found

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def load(argv: list[str], ports: list[int]) -> dict[str, Any]:
    """One loadgen run with its workers dealt over ``ports`` (one per node)."""
    args = parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    layout = scenario.layout(args, args.path or f"/{args.protocol}", f"cb{os.getpid() % 100000}")
    target = resolve_target(args, {})
    plans = make_plans(args, layout, target, {"secret-key": SECRET, "jwt-secret": JWT_SECRET}, {})
    for index, plan in enumerate(plans):
        plan.port = ports[index % len(ports)]
        plan.host_header = f"127.0.0.1:{plan.port}"
    run = Run(args, plans, layout, None)
    run.start_workers()
    wait = 0.0
    try:
        result = trio.run(run.main)
        wait = 10.0
    finally:
        run.stop_workers(wait)
    return result


def measure(nodes: list[Node], argv: list[str]) -> dict[str, Any]:
    before = [read_cpu_seconds(n.proc.pid) or 0.0 for n in nodes]
    started = time.monotonic()
    result = load(argv, [n.port for n in nodes])
    seconds = time.monotonic() - started
    after = [read_cpu_seconds(n.proc.pid) or 0.0 for n in nodes]
    latency = result["latency_ms"] or {}
    return {
        "deliveries_per_s": result["deliveries_per_s"], "publish_rate": result["publish_rate"],
        "delivered_ratio": result["delivered_ratio"], "errors": result["error_count"],
        "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"), "max_ms": latency.get("max"),
        "node_cpu_pct": [round(100 * (b - a) / seconds) for a, b in zip(before, after)],
        "client_cpu_pct": result["client"]["cpu_pct"],
    }


def bench(count: int, workdir: Path, redis: Redis, admin: str, args: argparse.Namespace,
          ) -> dict[str, Any]:
    database = Database(admin)
    nodes = [Node(f"n{i + 1}", workdir, redis.url, database.url) for i in range(count)]
    try:
        deadline = time.monotonic() + 30
        while not all(node.ready() for node in nodes):
            if time.monotonic() > deadline:
                raise SystemExit("cluster_bench: the nodes did not become ready")
            time.sleep(0.1)
        workers = str(max(count, args.workers))
        common = ["--duration", str(args.duration), "--workers", workers, "--port",
                  str(nodes[0].port), "--size", "100", "--json"]
        fanout = ["fanout", "--protocol", "multichat", "--subscribers", str(args.subscribers),
                  "--publishers", str(args.publishers), "--secret-key", SECRET, *common]
        peak = measure(nodes, [*fanout, "--window", str(args.window)])
        paced_rate = round(peak["publish_rate"] * args.fraction, 1)
        paced = measure(nodes, [*fanout, "--rate", str(paced_rate)])
        paced["rate"] = paced_rate
        grad = measure(nodes, ["gradagenda", "--rooms", str(args.rooms), "--room-size",
                               str(args.room_size), "--window", "16", "--jwt-secret",
                               JWT_SECRET, *common])
        return {"nodes": count, "fanout_peak": peak, "fanout_paced": paced, "gradagenda": grad}
    finally:
        for node in nodes:
            node.stop()
        database.drop()


# --- the mixed-writer case (--mixed) ---------------------------------------------------

#: The node metrics read before and after a mixed run.
COUNTED = ("chatd_store_commit_seconds_count", "chatd_cluster_events_total",
           "chatd_cluster_gradagenda_gap_reads_total")


async def mixed_clients(ports: list[int], users: int, groups: int, window: int,
                        duration: float) -> dict[str, Any]:
    """User i on ``ports[i % len(ports)]``; all in ``groups`` groups; each
    sends with ``window`` unconfirmed for ``duration`` seconds."""
    from scripts.gradagenda_bench import BenchSocket
    from chatd.tokens import mint

    names = [f"mixed-{i}" for i in range(users)]
    group_ids: list[str] = []
    created = trio.Event()
    started = trio.Event()
    joined = 0
    latencies: list[float] = []
    counts = {"confirmed": 0, "busy": 0, "failed": 0, "delivered": 0}
    failures: dict[str, int] = {}
    stop_at = [0.0]

    async def user(index: int) -> None:
        nonlocal joined
        ws = await BenchSocket.connect(ports[index % len(ports)], "/gradagenda")
        incoming = ws.messages()
        await ws.send(json.dumps({"type": "authenticate", "cdid": "auth", "user-id": names[index],
                                  "device-id": "bench",
                                  "token": mint(JWT_SECRET, names[index])}).encode())
        assert json.loads(await anext(incoming))["status"] == "succeeded"
        if index == 0:
            for g in range(groups):
                await ws.send(json.dumps({"type": "request-mutable-session-creation",
                                          "cdid": f"create{g}", "user-id": names}).encode())
                while True:
                    info = json.loads(await anext(incoming))
                    if info.get("cdid") == f"create{g}":
                        break
                assert info["status"] == "created", info
                group_ids.append(info["session-id"])
            created.set()
        else:
            await created.wait()
            known: set[str] = set()
            while not set(group_ids) <= known:  # this node has heard of every group
                info = json.loads(await anext(incoming))
                if info.get("type") == "providing-session-info":
                    known.add(info["session-id"])
        joined += 1
        if joined == users:
            started.set()
        await started.wait()
        sent_at: dict[str, float] = {}
        sent = 0

        async def send_one() -> None:
            nonlocal sent
            cdid = str(sent)
            sent_at[cdid] = time.perf_counter()
            await ws.send(json.dumps({
                "type": "request-sending-a-message", "cdid": cdid,
                "session-id": group_ids[sent % groups],
                "message": {"type": "text", "body": f"{names[index]} {cdid}"},
                "sender-timestamp": int(time.time() * 1000)}).encode())
            sent += 1

        for _ in range(window):
            await send_one()
        with trio.move_on_after(duration + 30):
            async for payload in incoming:
                frame = json.loads(payload)
                cdid = frame.get("cdid")
                if frame.get("type") == "message-broadcast":
                    if cdid is None:
                        counts["delivered"] += 1
                        continue
                    counts["confirmed"] += 1
                    latencies.append(time.perf_counter() - sent_at.pop(cdid))
                elif cdid in sent_at:
                    sent_at.pop(cdid)
                    text = frame.get("message", "")
                    counts["busy" if "busy" in text else "failed"] += 1
                    failures[text] = failures.get(text, 0) + 1
                else:
                    continue
                if time.perf_counter() < stop_at[0]:
                    await send_one()
                elif not sent_at:
                    break
        await ws.stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(users):
            nursery.start_soon(user, i)
        await started.wait()
        begin = time.perf_counter()
        stop_at[0] = begin + duration
    elapsed = time.perf_counter() - begin
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) \
            if latencies else None

    return {"stored_per_s": round(counts["confirmed"] / elapsed), **counts,
            "failures": failures, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "seconds": round(elapsed, 2)}


def deadlocks(database: Database) -> int:
    import psycopg

    with psycopg.connect(database.admin, autocommit=True) as conn:
        return conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = %s",
                            (database.name,)).fetchone()[0]


class Backends:
    """What the chatd backends of ``database`` do, sampled from
    ``pg_stat_activity`` every 5 ms while the run lasts: backends on
    average in each state (``idle``: waiting for chatd; ``Lock/advisory``:
    waiting for another batch's session lock; ``IO/WALSync``: flushing a
    COMMIT; ``idle in transaction``: holding a transaction open while
    chatd works)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.counts: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Backends:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(self.database.admin, autocommit=True) as conn:
            while not self._stop.wait(0.005):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE application_name = 'chatd' AND datname = %s",
                    (self.database.name,)).fetchall()
                self.samples += 1
                for state, kind, event in rows:
                    key = state if state in ("idle", "idle in transaction") \
                        else f"{kind or 'CPU'}/{event or '-'}"
                    self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[str, float]:
        return {key: round(n / max(1, self.samples), 2)
                for key, n in sorted(self.counts.items(), key=lambda kv: -kv[1])}


def bench_mixed(count: int, workdir: Path, redis: Redis, admin: str,
                args: argparse.Namespace) -> dict[str, Any]:
    """The mixed-writer case on ``count`` nodes, then all users on one."""
    results: dict[str, Any] = {"nodes": count, "users": args.users, "groups": args.groups,
                               "window": args.window, "load_average": os.getloadavg()[0]}
    for layout in ("spread", "one node"):
        database = Database(admin)
        nodes = [Node(f"n{i + 1}-{layout[0]}", workdir, redis.url, database.url)
                 for i in range(count)]
        try:
            deadline = time.monotonic() + 30
            while not all(node.ready() for node in nodes):
                if time.monotonic() > deadline:
                    raise SystemExit("cluster_bench: the nodes did not become ready")
                time.sleep(0.1)
            ports = [n.port for n in nodes] if layout == "spread" else [nodes[0].port]
            before = [read_cpu_seconds(n.proc.pid) or 0.0 for n in nodes]
            counted = [n.metrics(COUNTED) for n in nodes]
            started = time.monotonic()
            with Backends(database) as backends:
                result = trio.run(mixed_clients, ports, args.users, args.groups, args.window,
                                  args.duration)
            seconds = time.monotonic() - started
            used = [(read_cpu_seconds(n.proc.pid) or 0.0) - b for n, b in zip(nodes, before)]
            result["node_cpu_pct"] = [round(100 * u / seconds) for u in used]
            stored = result["stored_per_s"] * seconds
            result["node_cpu_us_per_stored"] = round(1e6 * sum(used) / stored) if stored else None
            result["pg_backends"] = backends.averages()
            # What the nodes did in the run (the metrics' growth, summed):
            # store transactions, items published and received over Redis,
            # store reads to fill feeds' gaps (None from code without it).
            grown: dict[str, float] = {}
            for node, was in zip(nodes, counted):
                for key, value in node.metrics(COUNTED).items():
                    grown[key] = grown.get(key, 0.0) + value - was.get(key, 0.0)
            commits = grown.get("chatd_store_commit_seconds_count", 0)
            result["stored_per_commit"] = round(result["confirmed"] / commits, 1) if commits else None
            result["items_published"] = round(
                grown.get('chatd_cluster_events_total{outcome="published"}', 0))
            result["items_received"] = round(
                grown.get('chatd_cluster_events_total{outcome="received"}', 0))
            reads = grown.get("chatd_cluster_gradagenda_gap_reads_total")
            result["gap_reads"] = round(reads) if reads is not None else None
            result["deadlocks"] = deadlocks(database)
            results[layout] = result
        finally:
            for node in nodes:
                node.stop()
            database.drop()
    one = results["one node"]["stored_per_s"]
    results["spread_share_of_one_node"] = round(results["spread"]["stored_per_s"] / one, 2) \
        if one else None
    return results


def mixed_table(result: dict[str, Any]) -> str:
    lines = [f"mixed writers: {result['users']} users, {result['groups']} shared groups, "
             f"window {result['window']}, {result['nodes']} nodes "
             f"(load {result['load_average']:.2f})",
             "layout     stored/s  p50 ms  p99 ms  busy  failed  deadlocks  node CPU %"]
    for layout in ("spread", "one node"):
        r = result[layout]
        lines.append(f"{layout:<9} {r['stored_per_s']:>9,}  {r['p50_ms'] or 0:>6.1f}  "
                     f"{r['p99_ms'] or 0:>6.1f}  {r['busy']:>4}  {r['failed']:>6}  "
                     f"{r['deadlocks']:>9}  {'/'.join(str(c) for c in r['node_cpu_pct'])}")
    lines.append(f"spread / one node: {result['spread_share_of_one_node']}")
    for layout in ("spread", "one node"):
        r = result[layout]
        lines.append(f"{layout}: node CPU per stored message {r['node_cpu_us_per_stored']} us; "
                     f"stored per transaction {r['stored_per_commit']}; items published "
                     f"{r['items_published']:,}, received {r['items_received']:,}; "
                     f"gap reads {r['gap_reads']}; "
                     "PostgreSQL backends on average: "
                     + ", ".join(f"{k} {v}" for k, v in r["pg_backends"].items()))
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["nodes  fan-out peak deliveries/s  p99 ms  | at {f}: rate  delivered  p99 ms  "
             "| GradAgenda stored/s  deliveries/s  p99 ms | node CPU % (peak)"]
    for r in results:
        peak, paced, grad = r["fanout_peak"], r["fanout_paced"], r["gradagenda"]
        lines.append(
            f"{r['nodes']:>5}  {peak['deliveries_per_s']:>25,.0f}  {peak['p99_ms'] or 0:>6.1f}  "
            f"| {paced['rate']:>12,.0f}  {paced['delivered_ratio'] or 0:>9.4f}  "
            f"{paced['p99_ms'] or 0:>6.1f}  | {grad['publish_rate']:>19,.0f}  "
            f"{grad['deliveries_per_s']:>12,.0f}  {grad['p99_ms'] or 0:>6.1f} | "
            f"{'/'.join(str(c) for c in peak['node_cpu_pct'])}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2,3", help="node counts to run (default 1,2,3)")
    p.add_argument("--subscribers", type=int, default=300, help="fan-out subscribers (default 300)")
    p.add_argument("--publishers", type=int, default=3, help="fan-out publishers (default 3)")
    p.add_argument("--window", type=int, default=32,
                   help="unacknowledged messages per publisher at peak (default 32)")
    p.add_argument("--fraction", type=float, default=0.8,
                   help="paced run's share of the peak publish rate (default 0.8)")
    p.add_argument("--rooms", type=int, default=10, help="GradAgenda groups (default 10)")
    p.add_argument("--room-size", type=int, default=10, help="members per group (default 10)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--workers", type=int, default=3,
                   help="load client processes, dealt over the nodes (default 3)")
    p.add_argument("--pg-admin", default=os.environ.get(
        "CHATD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--mixed", action="store_true",
                   help="run the mixed-writer case only (members of each group on every node)")
    p.add_argument("--users", type=int, default=3, help="--mixed: users, one device each "
                   "(default 3)")
    p.add_argument("--groups", type=int, default=4, help="--mixed: shared groups (default 4)")
    args = p.parse_args()
    raise_fd_limit()
    counts = [int(c) for c in args.nodes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="chatd-cluster-bench-"))
    redis = Redis(workdir)
    results = []
    try:
        for count in counts:
            if args.mixed:
                results.append(bench_mixed(count, workdir, redis, args.pg_admin, args))
                print(mixed_table(results[-1]))
                continue
            results.append(bench(count, workdir, redis, args.pg_admin, args))
            print(f"{count} node(s) done", file=sys.stderr)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.mixed:
        if args.json:
            print(json.dumps(results))
        return 0
    print(table(results).replace("{f}", f"{args.fraction:.0%}"))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
