#!/usr/bin/env python3
"""chatd's lobby fan-out against a minimal `websockets` server, in one run.

The bar (docs/performance.md): 1,000 multichat subscribers in one lobby,
one publisher, 100-byte messages. For each server, one after the other,
``scripts/loadtest.py fanout --spawn`` measures

1. peak deliveries/s: the publisher sends as fast as its window allows;
2. p99 end-to-end latency at 80% of chatd's peak message rate, the same
   rate for both servers.

The server is pinned to CPU 0 and the load to the other CPUs, so the two
never share a core. The machine may be busy with other work, so each
measurement is repeated (``--rounds``, alternating the servers) and the
median is reported; a run during which other processes used more than
``--max-others`` of a core is repeated (the quietest try is kept).

    python scripts/bench_peers.py                 # the bar, ~2 minutes
    python scripts/bench_peers.py --duration 3 --rounds 1 --subscribers 200
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

LOADTEST = Path(__file__).resolve().parent / "loadtest.py"
SERVERS = ("chatd", "websockets")


def machine() -> dict[str, object]:
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def pinning() -> tuple[str, str]:
    """(server CPUs, load CPUs): CPU 0 for the server, the rest for the load."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("bench_peers: one CPU only: server and load share it", file=sys.stderr)
        return str(cpus[0]), str(cpus[0])
    return str(cpus[0]), ",".join(str(c) for c in cpus[1:])


def loadtest(server: str, args: argparse.Namespace, cpus: tuple[str, str],
             extra: list[str]) -> dict:
    command = [sys.executable, str(LOADTEST), "fanout", "--spawn", server,
               "--server-cpus", cpus[0], "--cpus", cpus[1],
               "--subscribers", str(args.subscribers), "--publishers", str(args.publishers),
               "--size", str(args.size), "--duration", str(args.duration),
               "--workers", str(args.workers), "--json", *extra]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_peers: loadtest failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(["python", "scripts/loadtest.py", *command[2:]])
    return result


def others(result: dict) -> float:
    """CPU (% of a core) that processes other than the server and the client
    used during the run: a busy machine makes the run say little."""
    host = result["host"]
    # A process's own CPU time may include interrupts it served.
    return max(0.0, host["busy_pct"] + host["interrupts_pct"] - result["client"]["cpu_pct"]
               - host["parent_pct"] - (result["server"]["cpu_pct"] or 0))


def quiet_run(server: str, args: argparse.Namespace, cpus: tuple[str, str],
              extra: list[str], label: str) -> dict:
    """Repeat a run that other processes disturbed; keep the quietest."""
    tries = []
    for attempt in range(args.attempts):
        result = loadtest(server, args, cpus, extra)
        tries.append(result)
        print(f"{label} {server:>10}: {note(result)}", file=sys.stderr)
        if others(result) <= args.max_others:
            break
    best = min(tries, key=others)
    if others(best) > args.max_others:
        print(f"bench_peers: warning: every {server} run shared the machine "
              f"(others >= {others(best):.0f}% of a core)", file=sys.stderr)
    return best


def note(result: dict) -> str:
    server, client = result["server"], result["client"]
    latency = result["latency_ms"] or {}
    return (f"{result['deliveries_per_s']:>10,.0f} deliveries/s  {result['publish_rate']:>8,.1f} "
            f"msg/s  p99 {latency.get('p99', float('nan')):7.2f} ms  server CPU "
            f"{server['cpu_pct']:5.1f}%  client CPU {client['cpu_pct']:5.1f}%  "
            f"others {others(result):4.0f}%  errors {result['error_count']}")


def measure(args: argparse.Namespace, cpus: tuple[str, str], extra: list[str],
            label: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s: [] for s in SERVERS}
    for round_ in range(args.rounds):
        for server in SERVERS:
            runs[server].append(quiet_run(server, args, cpus, extra,
                                          f"{label} round {round_ + 1}"))
    return runs


def median(runs: list[dict], pick) -> float:
    return statistics.median(pick(r) for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--size", type=int, default=100, help="message bytes (default 100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per server (median)")
    parser.add_argument("--window", type=int, default=64,
                        help="peak runs: messages in flight per publisher (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="load-test client processes")
    parser.add_argument("--max-others", type=float, default=30.0,
                        help="repeat a run in which other processes used more than this "
                             "%% of a core (default 30)")
    parser.add_argument("--attempts", type=int, default=4, help="tries per run (default 4)")
    parser.add_argument("--json", action="store_true", help="print every result as JSON")
    args = parser.parse_args()
    cpus = pinning()

    peak = measure(args, cpus, ["--window", str(args.window)], "peak")
    peak_deliveries = {s: median(peak[s], lambda r: r["deliveries_per_s"]) for s in SERVERS}
    chatd_rate = median(peak["chatd"], lambda r: r["publish_rate"])
    rate = round(0.8 * chatd_rate, 1)
    paced = measure(args, cpus, ["--rate", str(rate)], f"{rate:g} msg/s")
    p99 = {s: median(paced[s], lambda r: r["latency_ms"]["p99"]) for s in SERVERS}

    ratio = peak_deliveries["chatd"] / peak_deliveries["websockets"]
    info = machine()
    quiet = [others(r) for runs in (peak, paced) for rs in runs.values() for r in rs]
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; "
          f"server on CPU {cpus[0]}, load on CPU {cpus[1]}")
    print(f"fan-out: {args.subscribers} subscribers, {args.publishers} publisher(s), "
          f"{args.size}-byte messages, {args.duration:g} s x {args.rounds} rounds (median); "
          f"other processes used {min(quiet):.0f}-{max(quiet):.0f}% of a core\n")
    print(f"  {'':34} {'chatd':>12} {'websockets':>12} {'chatd/ws':>9}")
    print(f"  {'peak deliveries/s':34} {peak_deliveries['chatd']:>12,.0f} "
          f"{peak_deliveries['websockets']:>12,.0f} {ratio:>9.2f}")
    print(f"  {f'p99 latency at {rate:g} msg/s (80%)':34} {p99['chatd']:>10.2f}ms "
          f"{p99['websockets']:>10.2f}ms {p99['chatd'] / p99['websockets']:>9.2f}")
    for label, runs in (("server CPU at peak", "server"), ("client CPU at peak", "client")):
        values = {s: median(peak[s], lambda r: r[runs]["cpu_pct"]) for s in SERVERS}
        print(f"  {label:34} {values['chatd']:>11.0f}% {values['websockets']:>11.0f}%")
    if args.json:
        print(json.dumps({"machine": info, "pinning": {"server": cpus[0], "load": cpus[1]},
                          "rate_80": rate, "peak_deliveries_per_s": peak_deliveries,
                          "ratio": round(ratio, 3), "p99_ms_at_80": p99,
                          "peak_runs": peak, "paced_runs": paced}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
