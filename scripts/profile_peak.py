#!/usr/bin/env python3
"""Where chatd's time goes at its fan-out peak: py-spy over a ``loadtest.py fanout`` run.

Starts ``scripts/loadtest.py fanout --spawn`` (chatd pinned to CPU 0, the
load to CPU 1, the compiled load engine), waits until the measured window
has begun, samples chatd with ``py-spy record --format raw`` (idle
samples, waiting in epoll, are not counted; ``--gil`` keeps only those
holding the GIL, leaving out system calls), and prints the share of the
samples by function, self and inclusive, and by module (a sample in a
C function such as ``os.write`` counts for the Python function calling
it). Needs ``py-spy``
(``pip install py-spy``; it reads the process's memory, so it needs
ptrace rights over it: same user, or root).

    python scripts/profile_peak.py --subscribers 1000 --seconds 8
    python scripts/profile_peak.py --subscribers 1000 --tls     # wss terminated by chatd
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

LOADTEST = Path(__file__).resolve().parent / "loadtest.py"


def chatd_pid(parent: int, deadline: float) -> int:
    """The pid of the ``chatd serve`` that the load test ``parent`` spawned."""
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(parent)],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, command = line.strip().partition(" ")
            if "chatd serve" in command:
                return int(pid)
        time.sleep(0.1)  # a script polling for a child process
    raise SystemExit("profile_peak: chatd did not start")


def short(frame: str) -> str:
    """``func (path/to/file.py:LINE)`` -> ``func (path/to/file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def module(frame: str) -> str:
    """chatd's file, or the package (trio, websockets, ...) of a frame."""
    path = frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if path.startswith("chatd/"):
        return path
    if path.startswith("<") or "/" not in path:
        return "stdlib"
    return path.split("/", 1)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds sampled")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument("--tls", action="store_true", help="wss, terminated by chatd")
    parser.add_argument("--storm", type=float, default=0.0, metavar="RATE",
                        help="profile a connect storm of RATE connects/s (each closed once "
                             "registered) instead of the fan-out")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL (leaves out system calls such as "
                             "write(2), which release it)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("profile_peak: py-spy not found (pip install py-spy)")
    command = [sys.executable, str(LOADTEST), "fanout", "--spawn", "--server-cpus", "0",
               "--cpus", "1", "--subscribers", str(args.subscribers), "--window",
               str(args.window), "--duration", str(args.seconds + 4), "--json"]
    if args.storm:
        command[2:3] = ["connect", "--churn", "--connect-rate", str(args.storm)]
    if args.tls:
        command.append("--tls")
    load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    raw = Path(tempfile.mkdtemp(prefix="chatd-profile-")) / "profile.txt"
    try:
        pid = chatd_pid(load.pid, time.monotonic() + 60)
        time.sleep(3 + args.subscribers / 2000)  # set-up, then into the window
        subprocess.run(["py-spy", "record", "--pid", str(pid), *(["--gil"] if args.gil else []),
                        "--format", "raw",
                        "--rate", str(args.rate), "--duration", str(int(args.seconds)),
                        "--output", str(raw), "--nonblocking"],
                       capture_output=True, check=True)
        out, _ = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
    import json
    result = json.loads(out.strip().splitlines()[-1])
    selfs: Counter = Counter()
    inclusive: Counter = Counter()
    modules: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        selfs[short(frames[-1])] += n
        modules[module(frames[-1])] += n
        for f in {short(f) for f in frames}:
            inclusive[f] += n
    what = (f"a connect storm: {result['connects_per_s']:,.0f} of {args.storm:,.0f} "
            "connects/s (closed once registered)" if args.storm else
            f"its fan-out peak: {result['deliveries_per_s']:,.0f} deliveries/s, "
            f"S = {args.subscribers:,}, window {args.window}")
    print(f"chatd at {what}{', wss' if args.tls else ''}; "
          f"server CPU {result['server']['cpu_pct']}%, load CPU {result['client']['cpu_pct']}% "
          f"({result['engine']} engine); {total:,} samples"
          f"{' holding the GIL' if args.gil else ' of the running thread'}")
    print(f"\n  {'self':>6}  module")
    for name, n in modules.most_common(12):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\n  {'self':>6}  function")
    for name, n in selfs.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\n  {'incl.':>6}  function")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
