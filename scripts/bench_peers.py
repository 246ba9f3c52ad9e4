#!/usr/bin/env python3
"""chatd's lobby fan-out, idle memory and connect storm against minimal peers, in one run.

The peers are multichat broadcast servers as a careful small server would
be written: ``scripts/peer_server.py`` on the Python ``websockets``
library; ``scripts/peers/node_ws/server.js`` on Node.js and the npm ``ws``
package (installed with ``npm ci`` on first use); and the compiled ones,
``scripts/peers/go_ws`` in Go on gorilla/websocket, twice: ``go-ws``
writes once per delivery, ``go-coalesce`` frames once and writes each
connection's queued frames with one write (built offline on first use,
``GOMAXPROCS=1``). A peer that cannot run here (no ``websockets``
package, no ``node``, no ``go``) is named in one line and left out.

The bar (docs/performance.md): ``--subscribers`` (one or more S, e.g.
100,1000,10000) multichat subscribers in one lobby, one publisher,
100-byte messages. For each server, in turn,
``scripts/loadtest.py fanout --spawn SERVER`` measures

1. peak deliveries/s at each S: the publisher sends as fast as its window
   allows; with the load generator's own CPU per delivery and which side
   was the bottleneck;
2. p99 end-to-end latency at 80% of chatd's peak message rate (the same
   rate for every server), at ``--latency-subscribers``;

then ``scripts/loadtest.py idle --spawn SERVER`` the server's RSS per idle
authenticated connection at ``--idle-connections`` connections, and with
``--storm-rate`` ``scripts/loadtest.py connect`` a connect storm (register
included, connections held) for ``--storm-duration`` seconds. The load
runs on the compiled engine where it can (``--engine``).

The server is pinned to CPU 0 and the load to the other CPUs, so the two
never share a core. The machine may be busy with other work, so each
measurement is repeated (``--rounds``, the servers taking turns within a
round) and the median is reported; a fan-out run during which other
processes used more than ``--max-others`` of a core is repeated (the
quietest try is kept). Ratios are chatd's figure over the peer's.

    python scripts/bench_peers.py --full          # every table of docs/performance.md
    python scripts/bench_peers.py                 # the bar at S=1,000, ~8 minutes
    python scripts/bench_peers.py --duration 3 --rounds 1 --subscribers 200 --idle-connections 1000
    python scripts/bench_peers.py --peers node-ws  # chatd against one peer only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

from loadgen.report import others_pct
from loadgen.servers import PEERS, peer_problem

LOADTEST = Path(__file__).resolve().parent / "loadtest.py"


def machine() -> dict[str, object]:
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "node": node_version(), "go": go_version()}


def go_version() -> str | None:
    try:
        return subprocess.run(["go", "version"], capture_output=True,
                              text=True).stdout.split()[2]
    except (OSError, IndexError):
        return None


def node_version() -> str | None:
    try:
        return subprocess.run(["node", "--version"], capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def available_servers(peers: list[str]) -> list[str]:
    """chatd and each of ``peers`` that can run here; one line for each that cannot."""
    servers = ["chatd"]
    for peer in peers:
        problem = peer_problem(peer)
        if problem:
            print(f"bench_peers: {peer} peer left out: {problem}", file=sys.stderr)
        else:
            servers.append(peer)
    if len(servers) < 2:
        raise SystemExit("bench_peers: no peer can run here to compare chatd with")
    return servers


def pinning() -> tuple[str, str]:
    """(server CPUs, load CPUs): CPU 0 for the server, the rest for the load."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("bench_peers: one CPU only: server and load share it", file=sys.stderr)
        return str(cpus[0]), str(cpus[0])
    return str(cpus[0]), ",".join(str(c) for c in cpus[1:])


def uptime() -> str:
    """The load averages (``/proc/loadavg``): how busy the machine was."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def loadtest(scenario: str, server: str, args: argparse.Namespace, cpus: tuple[str, str],
             extra: list[str]) -> dict:
    """One ``loadtest.py SCENARIO --spawn SERVER --json`` run; its result."""
    command = [sys.executable, str(LOADTEST), scenario, "--spawn", server,
               "--server-cpus", cpus[0], "--cpus", cpus[1], "--engine", args.engine,
               "--workers", str(args.workers), "--json", *extra]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_peers: loadtest failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(["python", "scripts/loadtest.py", *command[2:]])
    result["loadavg"] = uptime()
    return result


def fanout_flags(args: argparse.Namespace, subscribers: int) -> list[str]:
    return ["--subscribers", str(subscribers), "--publishers", str(args.publishers),
            "--size", str(args.size), "--duration", str(args.duration)]


def quiet_run(server: str, args: argparse.Namespace, cpus: tuple[str, str],
              extra: list[str], label: str, subscribers: int) -> dict:
    """A fan-out run, repeated while other processes disturbed it; the quietest."""
    tries = []
    for attempt in range(args.attempts):
        result = loadtest("fanout", server, args, cpus,
                          fanout_flags(args, subscribers) + extra)
        tries.append(result)
        print(f"{label} {server:>10}: {note(result)}", file=sys.stderr)
        if others_pct(result) <= args.max_others:
            break
    best = min(tries, key=others_pct)
    if others_pct(best) > args.max_others:
        print(f"bench_peers: warning: every {server} run shared the machine "
              f"(others >= {others_pct(best):.0f}% of a core)", file=sys.stderr)
    return best


def note(result: dict) -> str:
    server, client = result["server"], result["client"]
    latency = result["latency_ms"] or {}
    return (f"{result['deliveries_per_s']:>10,.0f} deliveries/s  {result['publish_rate']:>8,.1f} "
            f"msg/s  p99 {latency.get('p99', float('nan')):7.2f} ms  server CPU "
            f"{server['cpu_pct']:5.1f}%  client CPU {client['cpu_pct']:5.1f}% "
            f"({result['engine']})  bottleneck {result['bottleneck']['side']}  "
            f"others {others_pct(result):4.0f}%  load {result['loadavg']}  "
            f"errors {result['error_count']}")


def measure(servers: list[str], args: argparse.Namespace, cpus: tuple[str, str],
            extra: list[str], label: str, subscribers: int) -> dict[str, list[dict]]:
    """``--rounds`` fan-out runs per server, the servers taking turns."""
    runs: dict[str, list[dict]] = {s: [] for s in servers}
    for round_ in range(args.rounds):
        for server in servers:
            runs[server].append(quiet_run(server, args, cpus, extra,
                                          f"S={subscribers} {label} round {round_ + 1}",
                                          subscribers))
    return runs


def measure_storm(servers: list[str], args: argparse.Namespace,
                  cpus: tuple[str, str]) -> dict[str, list[dict]]:
    """``--rounds`` connect storms per server, the servers taking turns."""
    runs: dict[str, list[dict]] = {s: [] for s in servers}
    for round_ in range(args.rounds):
        for server in servers:
            result = loadtest("connect", server, args, cpus,
                              ["--connect-rate", str(args.storm_rate),
                               "--duration", str(args.storm_duration),
                               *([] if args.storm_hold else ["--churn"])])
            runs[server].append(result)
            latency = result["connect_latency_ms"] or {}
            print(f"storm round {round_ + 1} {server:>11}: {result['connects']:,} of "
                  f"{result['connect_attempts']:,} in the window "
                  f"({result['connects_per_s']:,.0f}/s), p99 {latency.get('p99', 0):.1f} ms, "
                  f"server CPU {result['server']['cpu_pct']}%, client CPU "
                  f"{result['client']['cpu_pct']}%, load {result['loadavg']}, "
                  f"errors {result['error_count']}", file=sys.stderr)
    return runs


def load_us_per_delivery(r: dict) -> float:
    """The load generator's CPU per delivery (µs) in run ``r``."""
    return 1e6 * r["client"]["cpu_pct"] / 100 / r["deliveries_per_s"] if r["deliveries_per_s"] \
        else 0.0


def server_us_per_delivery(r: dict) -> float:
    """The server's CPU per delivery (µs) in run ``r``."""
    cpu = (r["server"] or {}).get("cpu_pct") or 0
    return 1e6 * cpu / 100 / r["deliveries_per_s"] if r["deliveries_per_s"] else 0.0


def bottleneck_of(runs: list[dict]) -> str:
    """The side most runs named (``server``, ``load``, ``neither``)."""
    sides = [r["bottleneck"]["side"] for r in runs]
    return max(set(sides), key=sides.count)


def measure_idle(servers: list[str], args: argparse.Namespace,
                 cpus: tuple[str, str]) -> dict[str, list[dict]]:
    """``--rounds`` idle runs per server (memory: no quietness needed)."""
    runs: dict[str, list[dict]] = {s: [] for s in servers}
    workers = ["--workers", str(max(args.workers, 2))] if args.idle_connections > 5000 else []
    for round_ in range(args.rounds):
        for server in servers:
            result = loadtest("idle", server, args, cpus,
                              ["--connections", str(args.idle_connections), "--duration", "1",
                               *workers])
            runs[server].append(result)
            server_figures = result["server"]
            print(f"idle round {round_ + 1} {server:>10}: {result['connections']:,} connections  "
                  f"RSS {server_figures['rss_before_kib'] / 1024:.1f} -> "
                  f"{server_figures['rss_after_setup_kib'] / 1024:.1f} MiB  "
                  f"{server_figures['rss_per_connection_kib']} KiB each  "
                  f"errors {result['error_count']}", file=sys.stderr)
    return runs


def median(runs: list[dict], pick: Callable[[dict], float]) -> float:
    return statistics.median(pick(r) for r in runs)


def table(servers: list[str], rows: list[tuple[str, dict[str, float], str, bool]]) -> str:
    """Each row: label, a figure per server, its format, whether ratios make sense."""
    peers = servers[1:]
    head = f"  {'':40}" + "".join(f" {s:>12}" for s in servers)
    head += "".join(f" {'chatd/' + p:>18}" for p in peers)
    lines = [head]
    for label, values, fmt, ratios in rows:
        line = f"  {label:40}" + "".join(
            f" {format(values[s], fmt) if fmt else values[s]:>12}" for s in servers)
        if ratios:
            line += "".join(f" {values['chatd'] / values[p]:>18.2f}" if values[p] else
                            f" {'-':>18}" for p in peers)
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--full", action="store_true",
                        help="every table of docs/performance.md: S = 100,1000,10000, p99 at "
                             "S = 1000, idle at 10000, a storm of 5000/s for 10 s, 3 rounds")
    parser.add_argument("--subscribers", default="1000",
                        help="comma-separated S, each measured at its peak (default 1000)")
    parser.add_argument("--latency-subscribers", type=int,
                        help="the S of the p99-at-80%% runs (default: 1000 if measured, else "
                             "the first S; 0: skip)")
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--size", type=int, default=100, help="message bytes (default 100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per server (median)")
    parser.add_argument("--window", type=int, default=64,
                        help="peak runs: messages in flight per publisher (default 64)")
    parser.add_argument("--idle-connections", type=int, default=10000,
                        help="idle connections for the memory figure (default 10000; 0: skip)")
    parser.add_argument("--storm-rate", type=float, default=0.0,
                        help="connect storm: connects a second (default 0: skip)")
    parser.add_argument("--storm-duration", type=float, default=10.0,
                        help="connect storm: seconds (default 10)")
    parser.add_argument("--storm-hold", action="store_true",
                        help="connect storm: hold every connection (default: close each once "
                             "registered, so rate x duration may exceed the open-file limit)")
    parser.add_argument("--tls-subscribers", type=int, default=0,
                        help="also the peak over wss at this S, TLS terminated by chatd and by "
                             "the Go peers (default 0: skip)")
    parser.add_argument("--workers", type=int, default=1, help="load-test client processes")
    parser.add_argument("--engine", choices=("auto", "go", "python"), default="auto",
                        help="loadtest.py's engine (default auto: the compiled one if it can run)")
    parser.add_argument("--max-others", type=float, default=30.0,
                        help="repeat a run in which other processes used more than this "
                             "%% of a core (default 30)")
    parser.add_argument("--attempts", type=int, default=4, help="tries per run (default 4)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to compare with (default {','.join(PEERS)})")
    parser.add_argument("--json", action="store_true", help="print every result as JSON")
    args = parser.parse_args()
    if args.full:
        args.subscribers, args.latency_subscribers = "100,1000,10000", 1000
        args.idle_connections, args.storm_rate, args.storm_duration = 10000, 5000.0, 10.0
        args.tls_subscribers = 1000
        args.rounds, args.duration = 3, 10.0
    sizes = [int(x) for x in args.subscribers.split(",") if x.strip()]
    if args.latency_subscribers is None:
        args.latency_subscribers = 1000 if 1000 in sizes else sizes[0]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    servers = available_servers(peers)
    cpus = pinning()
    load_start = uptime()

    peak = {n: measure(servers, args, cpus, ["--window", str(args.window)], "peak", n)
            for n in sizes}
    paced: dict[str, list[dict]] = {}
    rate = None
    if args.latency_subscribers:
        n = args.latency_subscribers
        if n not in peak:
            peak[n] = measure(servers, args, cpus, ["--window", str(args.window)], "peak", n)
        rate = round(0.8 * median(peak[n]["chatd"], lambda r: r["publish_rate"]), 1)
        paced = measure(servers, args, cpus, ["--rate", str(rate)], f"{rate:g} msg/s", n)
    p99 = {s: median(paced[s], lambda r: r["latency_ms"]["p99"]) for s in paced}
    idle = measure_idle(servers, args, cpus) if args.idle_connections > 0 else {}
    rss = {s: median(idle[s], lambda r: r["server"]["rss_per_connection_kib"] or 0.0)
           for s in idle}
    storm = measure_storm(servers, args, cpus) if args.storm_rate > 0 else {}
    wss: dict[str, list[dict]] = {}
    if args.tls_subscribers:
        tls_servers = [s for s in servers if s not in ("websockets", "node-ws")]
        for s in servers:
            if s not in tls_servers:
                print(f"bench_peers: {s} left out of the wss runs: it serves ws only",
                      file=sys.stderr)
        wss = measure(tls_servers, args, cpus, ["--window", str(args.window), "--tls"],
                      "wss peak", args.tls_subscribers)
    load_end = uptime()

    info = machine()
    quiet = [others_pct(r) for runs in (*peak.values(), paced) for rs in runs.values()
             for r in rs]
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
          f"Node {info['node'] or '-'}, Go {info['go'] or '-'}; server on CPU {cpus[0]}, "
          f"load on CPU {cpus[1]}; load average {load_start} at the start, {load_end} at "
          f"the end")
    print(f"fan-out: {args.publishers} publisher(s), {args.size}-byte messages, "
          f"{args.duration:g} s x {args.rounds} rounds (median); other processes used "
          f"{min(quiet):.0f}-{max(quiet):.0f}% of a core")
    by_size: dict[int, dict] = {}
    for n, runs in peak.items():
        figures = {
            "peak_deliveries_per_s": {s: median(runs[s], lambda r: r["deliveries_per_s"])
                                      for s in servers},
            "server_cpu_pct": {s: median(runs[s], lambda r: r["server"]["cpu_pct"])
                               for s in servers},
            "load_cpu_pct": {s: median(runs[s], lambda r: r["client"]["cpu_pct"])
                             for s in servers},
            "server_us_per_delivery": {s: median(runs[s], server_us_per_delivery)
                                       for s in servers},
            "load_us_per_delivery": {s: median(runs[s], load_us_per_delivery)
                                     for s in servers},
            "bottleneck": {s: bottleneck_of(runs[s]) for s in servers}}
        by_size[n] = figures
        print(f"\nS = {n:,} subscribers ({runs['chatd'][0]['engine']} load engine)")
        rows = [("peak deliveries/s", figures["peak_deliveries_per_s"], ",.0f", True),
                ("server CPU at peak (%)", figures["server_cpu_pct"], ".0f", False),
                ("load CPU at peak (%)", figures["load_cpu_pct"], ".0f", False),
                ("server CPU per delivery (us)", figures["server_us_per_delivery"], ".2f",
                 False),
                ("load CPU per delivery (us)", figures["load_us_per_delivery"], ".2f", False),
                ("bottleneck at peak", figures["bottleneck"], "", False)]
        if n == args.latency_subscribers and p99:
            rows.append((f"p99 latency (ms) at {rate:g} msg/s (80%)", p99, ".2f", True))
        print(table(servers, rows))
    if rss:
        print(f"\nidle: {args.idle_connections:,} authenticated connections")
        print(table(servers, [(f"idle RSS/connection (KiB) at {args.idle_connections:,}",
                               rss, ".1f", True)]))
    storm_figures: dict[str, dict] = {}
    if storm:
        storm_figures = {
            "connects_per_s": {s: median(storm[s], lambda r: r["connects_per_s"])
                               for s in servers},
            "connect_p99_ms": {s: median(storm[s], lambda r: (r["connect_latency_ms"] or {})
                                         .get("p99", 0.0)) for s in servers},
            "server_cpu_pct": {s: median(storm[s], lambda r: r["server"]["cpu_pct"])
                               for s in servers},
            "errors": {s: median(storm[s], lambda r: r["error_count"]) for s in servers}}
        print(f"\nconnect storm: {args.storm_rate:,.0f} connects/s for "
              f"{args.storm_duration:g} s, register included, connections "
              f"{'held' if args.storm_hold else 'closed once registered'}")
        print(table(servers, [
            ("connects/s within the window", storm_figures["connects_per_s"], ",.0f", True),
            ("connect + register p99 (ms)", storm_figures["connect_p99_ms"], ".1f", True),
            ("server CPU (%)", storm_figures["server_cpu_pct"], ".0f", False),
            ("errors", storm_figures["errors"], ".0f", False)]))
    wss_figures: dict[str, dict] = {}
    if wss:
        tls_servers = list(wss)
        wss_figures = {
            "peak_deliveries_per_s": {s: median(wss[s], lambda r: r["deliveries_per_s"])
                                      for s in tls_servers},
            "server_cpu_pct": {s: median(wss[s], lambda r: r["server"]["cpu_pct"])
                               for s in tls_servers},
            "server_us_per_delivery": {s: median(wss[s], server_us_per_delivery)
                                       for s in tls_servers},
            "load_us_per_delivery": {s: median(wss[s], load_us_per_delivery)
                                     for s in tls_servers},
            "bottleneck": {s: bottleneck_of(wss[s]) for s in tls_servers}}
        print(f"\nwss: S = {args.tls_subscribers:,}, TLS terminated by each server "
              "(self-signed P-256 certificate, TLS 1.3)")
        print(table(tls_servers, [
            ("peak deliveries/s over wss", wss_figures["peak_deliveries_per_s"], ",.0f", True),
            ("server CPU at peak (%)", wss_figures["server_cpu_pct"], ".0f", False),
            ("server CPU per delivery (us)", wss_figures["server_us_per_delivery"], ".2f",
             False),
            ("load CPU per delivery (us)", wss_figures["load_us_per_delivery"], ".2f", False),
            ("bottleneck at peak", wss_figures["bottleneck"], "", False)]))
    print("\n  ratios: chatd's figure over the peer's (deliveries: higher is better; "
          "latency and memory: lower is better)")
    first = by_size[sizes[0]]
    if args.json:
        print(json.dumps({"machine": info, "pinning": {"server": cpus[0], "load": cpus[1]},
                          "loadavg": {"start": load_start, "end": load_end},
                          "servers": servers, "rate_80": rate,
                          "latency_subscribers": args.latency_subscribers,
                          "peak_deliveries_per_s": first["peak_deliveries_per_s"],
                          "ratios": {p: round(first["peak_deliveries_per_s"]["chatd"]
                                              / first["peak_deliveries_per_s"][p], 3)
                                     if first["peak_deliveries_per_s"][p] else None
                                     for p in servers[1:]},
                          "by_subscribers": by_size, "storm": storm_figures,
                          "wss": wss_figures, "wss_runs": wss,
                          "p99_ms_at_80": p99, "idle_rss_per_connection_kib": rss,
                          "peak_runs": peak, "paced_runs": paced, "idle_runs": idle,
                          "storm_runs": storm}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
