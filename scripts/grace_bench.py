#!/usr/bin/env python3
"""How long a free name waits after redis-server restarts empty (the grace).

Starts its own ``redis-server`` (a free loopback port, no persistence), a
fresh PostgreSQL database (created on ``--pg-admin``, dropped at the end)
and three chatd nodes, one of them holding a name; then, ``--rounds``
times: kills Redis, waits until every node reports it lost, starts it
again (empty), and as soon as node 1 is ready asks node 1 for a free
name. Prints, per round, the answer's code, the seconds from Redis's
start and from the claim to the answer, and node 1's count of graces
(``chatd_cluster_name_graces_total``: the grace did happen).

    python scripts/grace_bench.py --rounds 3

Run against another checkout (the "before" of a comparison) with
``PYTHONPATH=/path/to/checkout python scripts/grace_bench.py --root
/path/to/checkout``: the nodes are that checkout's ``python -m chatd``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent


async def bench(root: Path, rounds: int, admin: str) -> None:
    sys.path.insert(0, str(root))
    import psycopg

    from tests.cluster_helpers import Cluster, RedisServer, socialvp

    name = f"grace_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    store = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory(prefix="grace-bench-") as tmp:
            redis = RedisServer(Path(tmp))
            try:
                async with trio.open_nursery() as nursery:
                    cluster = Cluster(Path(tmp), nursery, redis.url, store)
                    try:
                        await rounds_of(cluster, redis, rounds, socialvp)
                    finally:
                        cluster.stop_all()
                        nursery.cancel_scope.cancel()
            finally:
                redis.stop()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def rounds_of(cluster, redis, rounds: int, socialvp) -> None:
    n1, n2, n3 = nodes = await cluster.nodes_up("n1", "n2", "n3")
    await socialvp(cluster, n2, "holder")
    await trio.sleep(2)  # a bench, not a test: every node's view holds the others
    for i in range(rounds):
        redis.kill()
        for node in nodes:
            await cluster.ready(node, want=False)
        redis.start()
        started = time.monotonic()
        await cluster.ready(n1)
        peer = await cluster.connect(n1, "socialvp")
        await peer.recv()
        asked = time.monotonic()
        await peer.send({"command": "identify", "name": f"free{i}"})
        code = (await peer.recv())["code"]
        done = time.monotonic()
        _, body = await cluster.readyz(n1, "/metrics")
        graces = next((line.split()[1] for line in body.splitlines()
                       if line.startswith("chatd_cluster_name_graces_total")), "?")
        print(f"round {i}: code {code}, answered {done - started:.2f} s after Redis started, "
              f"{done - asked:.2f} s after the claim; graces on node 1: {graces}", flush=True)
        await peer.close()
        await trio.sleep(3)  # heartbeats settle between rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=HERE.parent,
                        help="the checkout whose tests/ helpers start the nodes")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL URL allowed to create databases")
    args = parser.parse_args()
    trio.run(bench, args.root.resolve(), args.rounds, args.pg_admin)


if __name__ == "__main__":
    main()
