"""What a scenario is: the hooks the parent and the workers call.

A scenario decides who connects (its :class:`~loadgen.plan.Layout`), what
a spawned chatd mounts, what each worker does once everyone is connected
and during the measured window, and its own lines of the summary table.
Everything else (connecting, sampling, collecting, reporting) is shared.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import trio

from ..plan import Layout

if TYPE_CHECKING:
    from ..worker import Worker


class Scenario:
    """The default: clients connect, nothing happens in the window."""

    name = ""
    #: One line for ``--help``.
    help = ""
    #: The only protocol this scenario speaks (None: any, multichat by default).
    protocol: str | None = None
    #: Publishers send chat messages whose deliveries are measured.
    messages = False
    #: Connects during the window are what is measured.
    storm = False
    #: The server RSS reading that memory per connection is computed from,
    #: and how the summary names it.
    rss_reading = ("rss_after_setup_kib", "connected")

    # --- the parent's side ----------------------------------------------------

    def check(self, args: argparse.Namespace) -> str | None:
        """A command-line error for this scenario, if any."""
        return None

    def layout(self, args: argparse.Namespace, path: str, prefix: str) -> Layout:
        """Who is where; ``path`` is the protocol's endpoint, ``prefix`` starts
        every client name of this run."""
        return Layout([path])

    def endpoints(self, args: argparse.Namespace, paths: list[str]) -> list[dict[str, Any]]:
        """The ``endpoints`` of a chatd config written by ``--spawn``."""
        return [{"path": paths[0], "protocol": args.protocol}]

    def shape(self, r: dict[str, Any]) -> str:
        """What ran, for the summary's ``run`` line (``r``: the JSON result)."""
        return self.name

    def rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """This scenario's own summary rows."""
        return []

    def held(self, args: argparse.Namespace, connections: int) -> int:
        """Connections the server held at the ``rss_reading``."""
        return connections

    # --- a worker's side ------------------------------------------------------

    async def connect(self, worker: Worker) -> None:
        """The first phase: open the clients present from the start."""
        await worker.open_many(list(worker.plan.subscribers))

    async def prepare(self, worker: Worker) -> None:
        """After every worker has connected: set-up before the window."""

    async def load(self, worker: Worker, start: float, deadline: float) -> None:
        """The measured window (trio clock seconds); return when its work is done."""
        await trio.sleep_until(deadline)
