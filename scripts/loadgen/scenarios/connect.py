"""connect: a connection storm, ``--connect-rate`` new connections a second.

Each connection goes through its protocol's auth stage and counts once
authenticated; it is held, or with ``--churn`` closed at once. Attempts
still under way at the end of the window may finish (within
``--connect-timeout``): they count as late connects, not as lost. The
server's memory is read at the end, with every held connection open.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

import trio

from ..histogram import describe
from .base import Scenario

if TYPE_CHECKING:
    from ..worker import Worker


class Connect(Scenario):
    name = "connect"
    help = "a connection storm: N connects a second, auth included"
    storm = True
    rss_reading = ("rss_end_kib", "at the end")

    def held(self, args: argparse.Namespace, connections: int) -> int:
        return 0 if args.churn else connections

    def shape(self, r: dict[str, Any]) -> str:
        return "connection storm"

    def rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        late = f", {r['late_connects']:,} more after the window" if r["late_connects"] else ""
        return [("connects", f"{r['connects']:,} of {r['connect_attempts']:,} attempts in the "
                             f"window ({r['connects_per_s']:,.1f}/s, auth included{late})"),
                ("connect time", describe(r["connect_latency_ms"]))]

    # --- a worker's side ------------------------------------------------------

    async def load(self, worker: Worker, start: float, deadline: float) -> None:
        """Connect at this worker's rate until the deadline; then wait for the
        attempts still under way."""
        rate = worker.plan.connect_rate
        async with trio.open_nursery() as attempts:
            if rate > 0:
                for k in range(math.ceil((deadline - start) * rate)):
                    await trio.sleep_until(start + k / rate)
                    worker.stats.attempts += 1
                    attempts.start_soon(self.attempt, worker, k)
            await trio.sleep_until(deadline)

    async def attempt(self, worker: Worker, k: int) -> None:
        client = await worker.open_client(f"{worker.name_prefix()}c{k}", 0)
        if client is not None and worker.plan.churn:
            with trio.CancelScope(shield=True):  # even at the end of the window
                await client.close()
