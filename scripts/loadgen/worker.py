"""A worker process: its share of the clients, stepped through the run's phases.

The parent (``run.py``) forks one worker per ``--workers`` and talks to
it over a pipe. Phases, each answered with ``("done", phase, open,
errors)``:

- ``connect``: open and authenticate the clients present from the start;
- ``prepare``: the scenario's set-up (publishers join, groups are made);
- ``run`` (start, deadline): the measured window, the scenario's load;
  a ``("sample", k, {...})`` every interval, then ``("ran", cpu)``;
- ``finish``: send the totals (``("final", {...})``), close every connection.

While connecting it also sends ``("setup", open, errors)`` for the
progress line. What happens inside ``prepare`` and ``run`` is the
scenario's (``scenarios/``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from . import histogram
from .client import WsClient
from .dialects import DIALECTS, LoadError
from .plan import Plan
from .process import die_with_parent, raise_fd_limit
from .receiver import Receiver
from .scenarios import SCENARIOS
from .tokens import mint_token

NEVER = 2**63


@dataclass
class Stats:
    """What a worker counts; latencies are ``histogram`` dicts over µs."""

    deliveries: int = 0
    late: int = 0                # deliveries after the window
    publishes: int = 0
    connects: int = 0
    late_connects: int = 0
    attempts: int = 0
    open: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    latency_max: int = 0
    connect_latency: dict[int, int] = field(default_factory=dict)
    connect_latency_max: int = 0
    errors: Counter = field(default_factory=Counter)
    close_codes: Counter = field(default_factory=Counter)
    close_reasons: dict[int, str] = field(default_factory=dict)
    deadline_ns: int = NEVER     # monotonic ns: the end of the measured window


class Worker:
    """One process's share of the clients, driven phase by phase by the parent."""

    def __init__(self, plan: Plan, pipe: Connection) -> None:
        self.plan = plan
        self.pipe = pipe
        self.stats = Stats()
        self.scenario = SCENARIOS[plan.scenario]
        self.dialect = DIALECTS[plan.protocol](plan)
        self.clients: list[WsClient] = []
        self.pairs: list[tuple[WsClient, WsClient]] = []   # (publisher, probe)
        self.connected: Counter = Counter()                 # room -> clients in it
        self.room_publishes: Counter = Counter()
        self._source = 0
        self.receiver = Receiver()
        self.sampling = trio.CancelScope()
        self.nursery: trio.Nursery

    # --- plumbing -------------------------------------------------------------

    def report(self, *message: Any) -> None:
        self.pipe.send(message)

    async def next_message(self) -> Any:
        while not self.pipe.poll():
            await trio.lowlevel.wait_readable(self.pipe.fileno())
        return self.pipe.recv()

    def error(self, kind: str) -> None:
        """Count one error of category ``kind`` (reported by name)."""
        self.stats.errors[kind] += 1

    def next_source(self) -> str | None:
        """The source address for the next connection (round-robin), if any."""
        sources = self.plan.sources
        if not sources:
            return None
        self._source += 1
        return sources[self._source % len(sources)]

    def name_prefix(self) -> str:
        """A prefix for client names this worker makes up (unique per run and worker)."""
        return f"lt{os.getpid() % 100000}w{self.plan.worker_index}"

    def token_for(self, name: str) -> str | None:
        if name in self.plan.tokens:
            return self.plan.tokens[name]
        if self.plan.jwt_secret:
            return mint_token(self.plan.jwt_secret, name)
        return None

    # --- opening clients --------------------------------------------------------

    async def open_client(self, name: str, room: int) -> WsClient | None:
        """Connect and authenticate one client; None (error counted) if it fails."""
        client = WsClient(self, name, room)
        started = time.monotonic_ns()
        opened = False
        try:
            with trio.fail_after(self.plan.connect_timeout):
                await client.open(self.plan.paths[room])
                self.receiver.add(client)
                await self.dialect.authenticate(client)
            opened = True
        except trio.TooSlowError:
            self.error("timeout: connect and auth took over %gs" % self.plan.connect_timeout)
        except LoadError as exc:
            self.error(str(exc))
        except OSError as exc:
            self.error(f"connect: {type(exc).__name__}")
        finally:
            if not opened:  # failed, or cancelled at the end of a storm
                with trio.CancelScope(shield=True):
                    await client.abort()
        if not opened:
            return None
        us = (time.monotonic_ns() - started) // 1000
        stats = self.stats
        histogram.record(stats.connect_latency, us)
        stats.connect_latency_max = max(stats.connect_latency_max, us)
        if time.monotonic_ns() < stats.deadline_ns:
            stats.connects += 1
        else:
            stats.late_connects += 1
        self.clients.append(client)
        self.connected[room] += 1
        return client

    async def open_many(self, wanted: list[tuple[str, int]]) -> list[WsClient | None]:
        """Open clients with at most ``concurrency`` handshakes in flight."""
        limiter = trio.CapacityLimiter(self.plan.concurrency)
        result: list[WsClient | None] = [None] * len(wanted)

        async def one(i: int, name: str, room: int) -> None:
            async with limiter:
                result[i] = await self.open_client(name, room)

        async def progress() -> None:
            while True:
                await trio.sleep(0.25)
                self.report("setup", self.stats.open, sum(self.stats.errors.values()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as openers:
                for i, (name, room) in enumerate(wanted):
                    openers.start_soon(one, i, name, room)
            nursery.cancel_scope.cancel()
        return result

    # --- the phases -------------------------------------------------------------

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.receiver.run)
            while True:
                message = await self.next_message()
                kind = message[0]
                if kind == "connect":
                    await self.scenario.connect(self)
                elif kind == "prepare":
                    await self.scenario.prepare(self)
                elif kind == "run":
                    await self.run(*message[1:])
                    continue  # "run" reports itself
                elif kind == "finish":
                    await self.finish()
                    nursery.cancel_scope.cancel()
                    return
                self.report("done", kind, self.stats.open, sum(self.stats.errors.values()))

    async def run(self, start: float, deadline: float) -> None:
        """The measured window (``start``, ``deadline``: time.monotonic() seconds):
        the scenario's load, sampled each interval."""
        stats = self.stats
        offset = trio.current_time() - time.monotonic()
        start_t, deadline_t = start + offset, deadline + offset
        await trio.sleep_until(start_t)
        stats.deadline_ns = int(deadline * 1e9)
        # Connects and their times count from here on (set-up is reported apart).
        stats.connects, stats.connect_latency, stats.connect_latency_max = 0, {}, 0
        cpu_start = os.times()
        self.nursery.start_soon(self.sample, start_t)
        await self.scenario.load(self, start_t, deadline_t)
        cpu_end = os.times()
        self.report("ran", {"user": cpu_end.user - cpu_start.user,
                            "system": cpu_end.system - cpu_start.system,
                            "seconds": trio.current_time() - start_t})

    async def sample(self, start: float) -> None:
        """Every interval, send the parent what happened since the last one."""
        last = (0, 0, 0, 0, sum(self.stats.errors.values()))
        k = 0
        with self.sampling:
            while True:
                k += 1
                await trio.sleep_until(start + k * self.plan.interval)
                last = self.send_sample(k, last)

    def send_sample(self, k: int, last: tuple) -> tuple:
        stats = self.stats
        now = (stats.deliveries, stats.late, stats.publishes, stats.connects + stats.late_connects,
               sum(stats.errors.values()))
        latency, stats.latency = stats.latency, {}
        connect_latency, stats.connect_latency = stats.connect_latency, {}
        self.report("sample", k, {
            "deliveries": now[0] - last[0] + now[1] - last[1], "publishes": now[2] - last[2],
            "connects": now[3] - last[3], "errors": now[4] - last[4], "open": stats.open,
            "latency": latency, "connect_latency": connect_latency})
        return now

    async def finish(self) -> None:
        stats = self.stats
        self.sampling.cancel()
        # What the last interval sample has not carried yet goes in the final.
        times = os.times()
        self.report("final", {
            "deliveries": stats.deliveries, "late": stats.late, "publishes": stats.publishes,
            "connects": stats.connects, "late_connects": stats.late_connects,
            "attempts": stats.attempts, "open": stats.open,
            "latency": stats.latency, "latency_max": stats.latency_max,
            "connect_latency": stats.connect_latency,
            "connect_latency_max": stats.connect_latency_max,
            "errors": dict(stats.errors), "close_codes": dict(stats.close_codes),
            "close_reasons": stats.close_reasons,
            "connected": dict(self.connected), "room_publishes": dict(self.room_publishes),
            "cpu_total": times.user + times.system})
        limiter = trio.CapacityLimiter(self.plan.concurrency * 4)

        async def close(client: WsClient) -> None:
            async with limiter:
                await client.close()

        with trio.move_on_after(5):
            async with trio.open_nursery() as closing:
                for client in self.clients:
                    closing.start_soon(close, client)


def worker_process(plan: Plan, pipe: Connection, inherited: list[Connection]) -> None:
    """A worker's body: its own trio loop. SIGINT and SIGTERM are the
    parent's business: it stops the workers (SIGKILL after a grace time),
    and the kernel kills them if it dies. (The parent's SIGTERM handler,
    inherited through fork, once turned a stray SIGTERM into a worker's
    KeyboardInterrupt in the middle of a run.)"""
    die_with_parent(signal.SIGKILL)
    # The parent's ends of earlier workers' pipes came along with the fork:
    # holding them would keep those workers from seeing the parent go.
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    random.seed()
    raise_fd_limit()
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    try:
        trio.run(Worker(plan, pipe).main)
    except BaseException as exc:  # the parent reports it and stops the run
        pipe.send(("crashed", f"{type(exc).__name__}: {exc}"))
        raise
