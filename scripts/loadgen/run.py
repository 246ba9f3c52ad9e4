"""The parent's side of a run: fork the workers, step them through the phases, collect.

Phases (see ``worker.py``): connect, prepare, run (the measured window,
started at the same instant in every worker), finish. Around the window
the parent reads the server's CPU and RSS (``--spawn`` or
``--server-pid``) and the host's CPU, then hands everything to
``report.compile_result``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import trio

from .dialects import DIALECTS
from .engine import EnginePipe, EngineProcess
from .plan import Layout, Plan
from .process import read_cpu_seconds, read_host_seconds, read_rss_kib
from .progress import Progress
from .report import compile_result, host_figures
from .worker import worker_process

#: Seconds between the probes catching up and the final count.
SETTLE = 0.2


class Run:
    """The parent's side: start workers, step them through the phases, collect."""

    def __init__(self, args: argparse.Namespace, plans: list[Plan], layout: Layout,
                 server_pid: int | None) -> None:
        self.args = args
        self.plans = plans
        self.layout = layout
        self.server_pid = server_pid
        self.progress = Progress(args, len(plans))
        self.phase = "starting"
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        self.inbox: trio.MemoryReceiveChannel
        self.samples: dict[int, list[dict]] = {}
        self.setup: dict[int, tuple[int, int]] = {}

    def start_workers(self) -> None:
        if self.args.engine == "go":
            for plan in self.plans:
                proc = EngineProcess(plan)
                self.pipes.append(proc.pipe)
                self.procs.append(proc)
            return
        context = multiprocessing.get_context("fork")
        for plan in self.plans:
            mine, theirs = context.Pipe()
            proc = context.Process(target=worker_process, args=(plan, theirs, self.pipes[:]),
                                   daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def stop_workers(self, wait: float) -> None:
        """Give each worker ``wait`` seconds to exit, then kill it (workers
        ignore SIGTERM: see ``worker_process``)."""
        for proc in self.procs:
            proc.join(wait)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in self.pipes:
            if isinstance(pipe, EnginePipe):
                pipe.close()

    async def listen(self, index: int, pipe: Connection,
                     send: trio.MemorySendChannel) -> None:
        """Read one worker's messages as they come (a worker must never block
        on a full pipe): samples and progress here, phase replies to gather()."""
        async with send:
            while True:
                try:
                    while not pipe.poll():
                        await trio.lowlevel.wait_readable(pipe.fileno())
                    message = pipe.recv()
                except (EOFError, OSError):
                    send.send_nowait((index, ("exited",)))
                    return
                if message[0] == "setup":
                    self.setup[index] = message[1:]
                    self.progress.setup(self.phase, self.setup)
                elif message[0] == "sample":
                    self.samples.setdefault(message[1], []).append(message[2])
                    self.progress.interval_done(message[1], self.samples)
                else:
                    send.send_nowait((index, message))

    async def gather(self, kind: str) -> list[Any]:
        """Wait until every worker has sent ``kind``; show progress meanwhile."""
        got: dict[int, Any] = {}
        while len(got) < len(self.pipes):
            index, message = await self.inbox.receive()
            if message[0] == "exited" and index in got:
                continue  # it answered, then ended (a Go worker exits after its final)
            if message[0] in ("crashed", "exited"):
                detail = message[1] if len(message) > 1 else "exited"
                raise SystemExit(f"loadtest: worker {index} failed: {detail}")
            if message[0] == kind or (message[0] == "done" and message[1] == kind):
                got[index] = message[1:] if message[0] == kind else message[2:]
                if message[0] == "done":
                    self.setup[index] = message[2:]
        return [got[i] for i in range(len(self.pipes))]

    def broadcast(self, *message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    async def until(self, moment: float) -> None:
        """Sleep until ``moment`` on the time.monotonic() clock."""
        await trio.sleep_until(trio.current_time() + (moment - time.monotonic()))

    async def main(self) -> dict[str, Any]:
        """The whole run; its result (``report.compile_result``)."""
        args = self.args
        pid = self.server_pid
        send, self.inbox = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            for i, pipe in enumerate(self.pipes):
                nursery.start_soon(self.listen, i, pipe, send.clone())
            send.close()
            rss_before = read_rss_kib(pid) if pid else None
            setup_start = time.monotonic()
            self.phase = "connecting"
            self.broadcast("connect")
            await self.gather("connect")
            self.phase = "groups" if DIALECTS[args.protocol].groups else "publishers join"
            self.broadcast("prepare")
            await self.gather("prepare")
            setup_seconds = time.monotonic() - setup_start
            self.progress.clear()
            rss_after_setup = read_rss_kib(pid) if pid else None
            start = time.monotonic() + 0.05
            deadline = start + args.duration
            self.phase = "running"
            self.broadcast("run", start, deadline)
            await self.until(start)
            cpu_before = read_cpu_seconds(pid) if pid else None
            host_before = read_host_seconds()
            own_before = os.times()
            await self.until(deadline)
            cpu_after = read_cpu_seconds(pid) if pid else None
            host_after = read_host_seconds()
            own_after = os.times()
            ran = await self.gather("ran")  # storm stragglers done, probes caught up
            rss_end = read_rss_kib(pid) if pid else None
            # Every probe has caught up (or the grace ran out); let the other
            # subscribers' workers read what the server wrote them just before.
            self.phase = "draining"
            await trio.sleep(SETTLE)
            self.broadcast("finish")
            finals = [f[0] for f in await self.gather("final")]
            self.progress.clear()
            nursery.cancel_scope.cancel()
        server = None
        if pid:
            server = {"pid": pid, "rss_before_kib": rss_before,
                      "rss_after_setup_kib": rss_after_setup, "rss_end_kib": rss_end,
                      "cpu_pct": None if cpu_before is None or cpu_after is None
                      else round(100 * (cpu_after - cpu_before) / args.duration, 1)}
        own = own_after.user + own_after.system - own_before.user - own_before.system
        host = host_figures(args.duration, host_before, host_after, own)
        return compile_result(args, self.plans, self.layout, self.samples, finals,
                              [r[0] for r in ran], setup_seconds, server, host)
