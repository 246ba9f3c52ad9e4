"""The server under test when ``--spawn`` starts it: chatd or a peer.

- ``chatd``: ``python -m chatd serve`` with a config written for the run
  (:func:`spawn_config`): loopback, a free port, the abuse limits lifted.
- ``websockets``: ``scripts/peer_server.py``, a minimal multichat server on
  the Python ``websockets`` library (the ``bench`` extra).
- ``node-ws``: ``scripts/peers/node_ws/server.js``, the same on Node.js and
  the npm ``ws`` package; :func:`node_peer_problem` installs ``ws`` with
  ``npm ci`` on first use.
- ``go-ws`` and ``go-coalesce``: ``scripts/peers/go_ws``, the same in Go on
  gorilla/websocket, writing once per delivery (``--mode gorilla``) or
  framing once and writing each connection's queued frames at once
  (``--mode coalesce``); built on first use (``gobuild.py``) and run with
  ``GOMAXPROCS=1``, one core like the others.

Each runs in a temporary directory, pinned to ``--server-cpus`` if given,
and dies with the load test (``process.die_with_parent``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .gobuild import go_binary, go_problem
from .process import spawned_server_setup, stop_process

REPO = Path(__file__).resolve().parents[2]
NODE_PEER = REPO / "scripts" / "peers" / "node_ws"
#: What ``--spawn`` can start: chatd, then the peers it is compared with.
SERVERS = ("chatd", "websockets", "node-ws", "go-ws", "go-coalesce")
PEERS = SERVERS[1:]
#: The Go peers: --spawn name -> the program's --mode.
GO_MODES = {"go-ws": "gorilla", "go-coalesce": "coalesce"}


def peer_problem(peer: str) -> str | None:
    """Why ``peer`` cannot run here, in a few words; None if it can."""
    if peer == "websockets":
        import importlib.util
        if importlib.util.find_spec("websockets") is None:
            return "the websockets package is missing (pip install -e '.[bench]')"
    elif peer == "node-ws":
        return node_peer_problem()
    elif peer in GO_MODES:
        return go_problem("go-ws")
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started next that
    must be told its port (a spawned chatd, redis-server, PostgreSQL).

    Picked at random below the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``), not with ``bind(0)``: a port the
    kernel just handed out here is the one it hands next to whatever
    binds port 0 — another worker's server — before ours takes it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            first_ephemeral = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    low = 10_000 if first_ephemeral > 11_000 else 1024
    for _ in range(200):
        port = random.randrange(low, first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


def spawn_config(args: argparse.Namespace, endpoints: list[dict], secret_key: str,
                 jwt_secret: str | None) -> dict:
    """A chatd config for this run: loopback, a free port, the abuse limits lifted
    (the load comes from one host, at rates no single client would reach)."""
    config = {
        "secret-key": secret_key, "endpoints": endpoints,
        "store": "chatd.db", "log-level": args.server_log_level,
        "max-connections": 1_000_000, "max-connections-per-ip": 1_000_000,
        "connect-rate-per-ip": 1e9, "connect-burst-per-ip": 1_000_000,
        "message-rate": 1e9, "message-burst": 1_000_000,
    }
    if jwt_secret:
        config["jwt-secret"] = jwt_secret
    return config


def _node_peer_installed() -> bool:
    """node_modules holds the ``ws`` version that package-lock.json names."""
    try:
        locked = json.loads((NODE_PEER / "package-lock.json").read_text())
        wanted = locked["packages"]["node_modules/ws"]["version"]
        have = json.loads((NODE_PEER / "node_modules" / "ws" / "package.json").read_text())
    except (OSError, ValueError, KeyError):
        return False
    return have.get("version") == wanted


def node_peer_problem() -> str | None:
    """Why the Node ``ws`` peer cannot run here, in a few words; None if it can.

    Installs its locked dependency with ``npm ci`` when node_modules lacks
    it (once; a lock file keeps concurrent runs from installing together).
    """
    if shutil.which("node") is None:
        return "node not found"
    if _node_peer_installed():
        return None
    if shutil.which("npm") is None:
        return "npm not found (needed once, to install ws)"
    with open(NODE_PEER / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _node_peer_installed():
            print("loadtest: installing the Node peer's dependency (npm ci in "
                  "scripts/peers/node_ws)", file=sys.stderr)
            proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                                  cwd=NODE_PEER, capture_output=True, text=True)
            if proc.returncode:
                detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                return f"npm ci failed: {detail}"
    return None


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (EC P-256), made
    with ``openssl`` for one run: (cert.pem, key.pem) in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                           "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                           "-keyout", str(key), "-out", str(cert)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"loadtest: --tls: openssl could not make a certificate: "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return cert, key


class ServerProcess:
    """chatd or a peer started by ``--spawn``, in a temporary directory."""

    def __init__(self, kind: str, config: dict | None, secret_key: str,
                 cpus: list[int] | None, tls: bool = False) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix="chatd-loadtest-"))
        if tls:
            cert, key = self_signed(self.dir)
            if kind == "chatd":
                config = {**config, "wss": {"certfile": str(cert), "keyfile": str(key)}}
        self.log_path = self.dir / "server.log"
        # A free port picked here: chatd logs its address at info level only,
        # and the run's server logs at warning.
        self.port = free_port()
        if kind == "chatd":
            config = {**config, "host": f"127.0.0.1:{self.port}"}
            (self.dir / "config.json").write_text(json.dumps(config, indent=2))
            args = [sys.executable, "-m", "chatd", "serve", "--config", "config.json"]
        elif kind == "websockets":
            args = [sys.executable, str(REPO / "scripts" / "peer_server.py"),
                    "--port", str(self.port), "--secret-key", secret_key]
        elif kind == "node-ws":
            problem = node_peer_problem()
            if problem:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise SystemExit(f"loadtest: cannot start the Node ws peer: {problem}")
            args = ["node", str(NODE_PEER / "server.js"),
                    "--port", str(self.port), "--secret-key", secret_key]
        elif kind in GO_MODES:
            args = [str(go_binary("go-ws")), "--port", str(self.port),
                    "--secret-key", secret_key, "--mode", GO_MODES[kind]]
            if tls:
                args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        else:
            raise ValueError(f"unknown server {kind!r}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        env.pop("JWT_SECRET", None)
        env["GOMAXPROCS"] = "1"  # one core, like chatd and the other peers
        self.log = open(self.log_path, "wb")

        def setup() -> None:
            spawned_server_setup()
            if cpus:  # before exec: every thread the runtime starts is pinned too
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(args, cwd=self.dir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=setup)
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)  # polling for the listener to come up
        output = self.output()
        self.stop()
        raise SystemExit(f"loadtest: {self.kind} did not start:\n{output}")

    def output(self) -> str:
        """The end of the server's log (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; remove the temporary directory."""
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
