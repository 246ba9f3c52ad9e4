"""Load-test a running chatd (or one this script starts) over real WebSockets.

Examples (each against 127.0.0.1 only, bounded by ``--duration``)::

  python scripts/loadtest.py fanout --spawn --subscribers 1000 --duration 10
  python scripts/loadtest.py rooms --spawn --protocol wcp --rooms 50 --room-size 10
  python scripts/loadtest.py connect --port 8765 --secret-key S --connect-rate 1000
  python scripts/loadtest.py idle --spawn --connections 10000 --workers 2
  python scripts/loadtest.py gradagenda --port 8765 --jwt-secret J --plot out.png
  python scripts/loadtest.py fanout --spawn node-ws --subscribers 1000

The client is deliberately cheap, because the machine that drives the load
is usually the machine being measured: raw WebSocket frames on trio sockets
(hand-rolled handshake and masking), one reader per worker over a private
epoll, and on the receiving side no JSON parsing at all for chat messages:
frames are counted from their headers and the send time is read by a byte
search for the ``~lt`` marker each message carries. Its CPU is reported in
the summary; if a worker is near 100% of a core, the result measures the
client (add ``--workers``). docs/performance.md says how the numbers were
taken.

Publishers are paced by ``--rate`` (messages a second, all publishers
together) or, with ``--rate 0``, by a window: each publisher keeps at most
``--window`` messages in flight, counted until its probe (a connection that
joined the room after every subscriber, so it is served last) has seen them.

Results: a live progress line on stderr (when it is a TTY, or with
``--progress``), a summary table, ``--json`` (one JSON line on stdout; the
table then goes to stderr) and ``--plot FILE.png`` (matplotlib). Traffic
goes to loopback addresses only, unless ``--host`` names another host
explicitly.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import sys
from typing import Any

import trio

from .dialects import PROTOCOLS
from .engine import choose_engine
from .plan import make_plans
from .plot import check_plotting, plot
from .process import cpu_list, listening_pid, raise_fd_limit
from .report import summary_table
from .run import Run
from .scenarios import SCENARIOS
from .servers import PEERS, SERVERS, ServerProcess, spawn_config
from .target import default_path, load_config_file, resolve_target
from .tokens import tokens_from_chatd


def usage() -> tuple[str, str]:
    """(description, epilog) for --help: the scenarios listed from their modules."""
    first, rest = __doc__.split("\n\n", 1)
    lines = ["Scenarios (``python scripts/loadtest.py SCENARIO --help`` lists the options):", ""]
    for name, scenario in SCENARIOS.items():
        head, *more = scenario.help.splitlines()
        lines.append(f"  {name:<10}  {head}")
        lines += [f"  {'':<10}  {line}" for line in more]
    return first, "\n".join(lines) + "\n\n" + rest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    description, epilog = usage()
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=tuple(SCENARIOS))
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="default: multichat (gradagenda for the gradagenda scenario)")
    t = p.add_argument_group("target")
    t.add_argument("--host", help="server host; anything not loopback must be given here "
                                  "explicitly (default: from --config, else 127.0.0.1)")
    t.add_argument("--port", type=int, help="default: from --config, else 8765")
    t.add_argument("--config", help="the server's chatd config file: host, secrets, endpoints")
    t.add_argument("--path", help="endpoint path (default: the protocol's in --config, "
                                  "else /PROTOCOL)")
    t.add_argument("--paths", help="rooms scenario: comma-separated endpoint paths, one per room")
    t.add_argument("--spawn", nargs="?", const="chatd", choices=SERVERS,
                   help="start the server for this run on a free port, and stop it after: "
                        "chatd (the default), or a peer it is compared with: websockets "
                        "(scripts/peer_server.py) or node-ws (scripts/peers/node_ws, "
                        "installed with npm ci on first use)")
    t.add_argument("--server-pid", type=_server_pid, metavar="PID|port",
                   help="the server's pid, or 'port': the process listening on the target "
                        "port (robust with several servers running); RSS and CPU are reported")
    t.add_argument("--server-cpus", help="with --spawn: pin the server to these CPUs (e.g. 0)")
    t.add_argument("--server-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"), help="with --spawn")
    t.add_argument("--secret-key", help="multichat shared secret (default: from --config)")
    t.add_argument("--jwt-secret", help="HS256 key for GradAgenda/wschat tokens (default: "
                                        "from --config or JWT_SECRET; else `chatd token`)")
    t.add_argument("--tls", action="store_true",
                   help="wss: TLS to the server (with --spawn: chatd terminates it with a "
                        "self-signed certificate made for the run, as do the Go peers); "
                        "runs on the Go engine")
    t.add_argument("--source-ips", type=int, default=64,
                   help="spread connections over this many 127.0.0.x source addresses when "
                        "the target is 127.0.0.1 (per-address limits, port ranges); 0: off")
    s = p.add_argument_group("shape")
    s.add_argument("--subscribers", type=int, help="fanout: default 100")
    s.add_argument("--publishers", type=int, default=1, help="per room/group (default 1)")
    s.add_argument("--rooms", type=int, help="rooms/gradagenda: default 10")
    s.add_argument("--room-size", type=int, help="subscribers per room/group (default 10)")
    s.add_argument("--connections", type=int, default=1000, help="idle: default 1000")
    s.add_argument("--connect-rate", type=float, default=100.0,
                   help="connect: new connections a second (default 100)")
    s.add_argument("--churn", action="store_true",
                   help="connect: close each connection once authenticated (default: hold)")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=0.0,
                      help="messages a second, all publishers together (0: as fast as "
                           "the window allows)")
    load.add_argument("--window", type=int,
                      help="messages each publisher may have in flight (default: 64, "
                           "or 1000 with --rate)")
    load.add_argument("--size", type=int, default=100, help="message text bytes (default 100)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    load.add_argument("--workers", type=int, default=1, help="client processes (default 1)")
    load.add_argument("--cpus", help="pin the client workers to these CPUs (e.g. 1)")
    load.add_argument("--engine", choices=("auto", "go", "python"), default="auto",
                      help="the workers: go (scripts/loadgen/engine, built on first use; "
                           "multichat in fanout, rooms, connect and idle), python "
                           "(scripts/loadgen/worker.py, every protocol and scenario), or "
                           "auto (go where it applies and Go is installed; the default)")
    load.add_argument("--interval", type=float, help="seconds per sample (default: 1, "
                                                     "or less for short runs)")
    load.add_argument("--grace", type=float, default=2.0,
                      help="at most this many seconds after the window for messages still "
                           "in flight to arrive (default 2)")
    load.add_argument("--connect-timeout", type=float, default=10.0,
                      help="seconds one connect plus auth may take")
    load.add_argument("--concurrency", type=int, default=200,
                      help="handshakes in flight per worker while setting up")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the result as one JSON line "
                                                         "on stdout (the table goes to stderr)")
    out.add_argument("--progress", action="store_true", help="progress line even without a TTY")
    out.add_argument("--plot", metavar="FILE.png", help="latency and throughput over time")
    args = p.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if scenario.protocol:
        if args.protocol not in (None, scenario.protocol):
            p.error(f"the {scenario.name} scenario uses --protocol {scenario.protocol}")
        args.protocol = scenario.protocol
    args.protocol = args.protocol or "multichat"
    if args.spawn in PEERS and args.protocol != "multichat":
        p.error(f"--spawn {args.spawn} speaks multichat in one lobby only")
    if args.duration <= 0 or args.workers < 1 or args.size < 1:
        p.error("--duration, --workers and --size must be positive")
    problem = scenario.check(args)
    if problem:
        p.error(problem)
    args.engine = choose_engine(args.engine, args.scenario, args.protocol, args.tls)
    if args.tls and args.spawn in ("websockets", "node-ws"):
        p.error(f"--tls: the {args.spawn} peer serves ws only (the Go peers and chatd "
                "terminate TLS)")
    if args.interval is None:
        args.interval = min(1.0, max(0.1, args.duration / 10))
    return args


def _server_pid(text: str) -> int | str:
    if text == "port":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a pid nor 'port' (an empty "
                                         "$(pgrep ...) finds no server)") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    # SIGTERM unwinds like Ctrl-C, so the server and workers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.plot:
        check_plotting()
    config = load_config_file(args.config)
    raise_fd_limit()
    secrets = {"secret-key": args.secret_key or config.get("secret-key"),
               "jwt-secret": args.jwt_secret or os.environ.get("JWT_SECRET")
               or config.get("jwt-secret")}
    if args.spawn and (args.config or args.port or args.host):
        raise SystemExit("loadtest: --spawn starts its own server: drop --config/--port/--host")
    layout = scenario.layout(args, args.path or default_path(args.protocol, config),
                             f"lt{os.getpid() % 100000}")
    server: ServerProcess | None = None
    if args.spawn:
        secrets["secret-key"] = (secrets["secret-key"]
                                 or base64.b32encode(random.randbytes(10)).decode())
        if args.protocol == "gradagenda" or (args.protocol == "wschat" and args.jwt_secret):
            secrets["jwt-secret"] = secrets["jwt-secret"] or random.randbytes(16).hex()
        else:
            secrets["jwt-secret"] = None
        endpoints = scenario.endpoints(args, sorted(set(layout.paths)))
        server = ServerProcess(args.spawn, spawn_config(args, endpoints, secrets["secret-key"],
                                                        secrets["jwt-secret"]),
                               secrets["secret-key"], cpu_list(args.server_cpus), tls=args.tls)
        args.port = server.port
        args.server_pid = server.proc.pid
    try:
        target = resolve_target(args, config)
        if args.server_pid == "port":
            args.server_pid = listening_pid(target[3])
            if args.server_pid is None:
                raise SystemExit(f"loadtest: no process of this user listens on port {target[3]}")
        if args.protocol == "multichat" and not secrets["secret-key"]:
            raise SystemExit("loadtest: multichat needs --secret-key (or --config)")
        tokens: dict[str, str] = {}
        if args.protocol == "gradagenda" and not secrets["jwt-secret"]:
            names = [n for n, _ in layout.subscribers] + [n for n, _, _ in layout.publishers]
            tokens = tokens_from_chatd(sorted(set(names)), args.config)
        plans = make_plans(args, layout, target, secrets, tokens)
        run = Run(args, plans, layout, args.server_pid)
        run.start_workers()
        wait = 0.0
        try:
            result = trio.run(run.main)
            wait = 10.0  # workers close their connections, then exit
        finally:
            run.stop_workers(wait)
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
    # What the server's flood control lets one connection send (report.py's
    # throttle note): the config's, else chatd's defaults; --spawn lifts it.
    result["server_message_rate"] = None if args.spawn else config.get("message-rate", 100.0)
    result["server_message_burst"] = None if args.spawn else config.get("message-burst", 200)
    table = summary_table(result)
    if args.plot:
        plot(args.plot, result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    else:
        print(table)
    return 0
