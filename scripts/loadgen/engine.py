"""The compiled load engine: a Go worker process in place of a Python one.

``--engine go`` (or ``auto``, the default, where it applies) runs each
worker as ``scripts/loadgen/engine`` (Go, built on first use by
``gobuild.py``) instead of forking ``worker.py``. The parent (``run.py``)
cannot tell them apart: :class:`EngineProcess` looks like the
``multiprocessing.Process`` and :class:`EnginePipe` like the pipe a Python
worker has, carrying the same phase messages as JSON lines (the plan
first, then ``connect``, ``prepare``, ``run``, ``finish``; see the Go
source's head).

Why: a worker in Python pays ~6.8 µs of CPU per delivery and saturates its
core before chatd does; the Go engine reads every socket from one epoll
loop on one thread (``GOMAXPROCS=1``) and pays well under a microsecond,
so the server, not the client, is what a run measures
(docs/performance.md, "Is the client the bottleneck?").

It covers multichat in the fanout, rooms, connect and idle scenarios;
other protocols and the gradagenda scenario run on the Python engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

from .gobuild import go_binary, go_problem
from .plan import Plan
from .process import die_with_parent, raise_fd_limit

#: What the Go engine covers.
SCENARIOS = ("fanout", "rooms", "connect", "idle")
PROTOCOLS = ("multichat",)
#: Keys of a worker's messages whose dicts are keyed by integers.
INT_KEYED = ("latency", "connect_latency", "close_codes", "close_reasons", "connected",
             "room_publishes")


def engine_problem(scenario: str, protocol: str) -> str | None:
    """Why the Go engine cannot run this scenario here; None if it can."""
    if scenario not in SCENARIOS:
        return f"the {scenario} scenario runs on the Python engine only"
    if protocol not in PROTOCOLS:
        return f"{protocol} runs on the Python engine only (the Go engine speaks multichat)"
    return go_problem("loadgen-engine")


def choose_engine(wanted: str, scenario: str, protocol: str, tls: bool = False) -> str:
    """``go`` or ``python`` for ``--engine wanted`` (auto, go, python); wss
    (``tls``) runs on the Go engine only."""
    if wanted == "python":
        if tls:
            raise SystemExit("loadtest: --tls runs on the Go engine only (--engine go)")
        return "python"
    problem = engine_problem(scenario, protocol)
    if problem is None:
        return "go"
    if wanted == "go" or tls:
        raise SystemExit(f"loadtest: --engine go{' (--tls)' if tls else ''}: {problem}")
    if problem.startswith("go not found"):
        print(f"loadtest: Python engine ({problem})", file=sys.stderr)
    return "python"


class EnginePipe:
    """The parent's end of a Go worker: ``send``/``poll``/``recv``/``fileno``
    as on a ``multiprocessing.connection.Connection``."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.eof = False

    def fileno(self) -> int:
        return self.fd

    def send(self, message: tuple) -> None:
        try:
            self.proc.stdin.write(json.dumps(list(message)).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the worker is gone: its pipe's EOF reports it

    def poll(self) -> bool:
        """A whole message (or the end) is there to be received."""
        if b"\n" in self.buffer or self.eof:
            return True
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return False
        if not data:
            self.eof = True
        self.buffer += data
        return b"\n" in self.buffer or self.eof

    def recv(self) -> tuple:
        while b"\n" not in self.buffer:
            if self.eof:
                raise EOFError
            if not self.poll():
                os.set_blocking(self.fd, True)
                try:
                    data = os.read(self.fd, 1 << 20)
                finally:
                    os.set_blocking(self.fd, False)
                self.eof = not data
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = json.loads(line)
        for part in message[1:]:
            if isinstance(part, dict):
                for key in INT_KEYED:
                    if isinstance(part.get(key), dict):
                        part[key] = {int(k): v for k, v in part[key].items()}
        return tuple(message)

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class EngineProcess:
    """A Go worker, with the ``multiprocessing.Process`` calls run.py makes."""

    def __init__(self, plan: Plan) -> None:
        binary = go_binary("loadgen-engine")
        cpus = plan.cpus

        def setup() -> None:
            raise_fd_limit()
            die_with_parent(signal.SIGKILL)
            if cpus:  # before exec, so every thread of the runtime is pinned
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, preexec_fn=setup,
                                     env={**os.environ, "GOMAXPROCS": "1", "GOGC": "400"})
        self.pipe = EnginePipe(self.proc)
        self.proc.stdin.write(json.dumps(plan_json(plan)).encode() + b"\n")
        self.proc.stdin.flush()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as the Go engine reads it (tokens are not needed: multichat)."""
    fields = dataclasses.asdict(plan)
    fields["tokens"] = {}
    return fields
