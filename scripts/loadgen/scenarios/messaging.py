"""Publishers, probes and deliveries: what the fanout, rooms and gradagenda scenarios share.

Each room has subscribers and ``--publishers`` publishers. Publishers join
after every subscriber, each with a probe: a client of the same room that
joins last, so the server serves it last, and counts its publisher's
messages (by the tag in each message). A publisher is paced by ``--rate``
(messages a second, all publishers together) or, with ``--rate 0``, by a
window: at most ``--window`` of its messages not yet seen by its probe.
In a protocol that echoes to the sender (wschat, GradAgenda) the publisher
is its own probe. GradAgenda rooms are groups: members, publishers
included, connect first, then each room's first publisher creates it.

After the window every probe gets ``--grace`` seconds to see every message
its publisher sent; deliveries counted then are "late".
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import trio

from ..client import WsClient
from ..dialects import DIALECTS, LoadError, message_content
from ..histogram import describe, percent_floor
from ..plan import Layout
from ..wire import client_frame
from .base import Scenario

if TYPE_CHECKING:
    from ..worker import Worker


def rooms_layout(args: argparse.Namespace, paths: list[str], rooms: int, size: int,
                 prefix: str) -> Layout:
    """``rooms`` rooms of ``size`` subscribers and ``--publishers`` publishers
    each (room r on ``paths[r]``); names say room and role (s, p, q: probe)."""
    dialect = DIALECTS[args.protocol]
    layout = Layout(paths)
    for r in range(rooms):
        subs = [f"{prefix}r{r}s{k}" for k in range(size)]
        pubs = [f"{prefix}r{r}p{k}" for k in range(args.publishers)]
        layout.subscribers += [(n, r) for n in subs]
        if dialect.groups:
            layout.groups[r] = [*pubs, *subs]
        layout.publishers += [(n, None if dialect.echo else f"{prefix}r{r}q{k}", r)
                              for k, n in enumerate(pubs)]
    return layout


class MessagingScenario(Scenario):
    """Rooms of subscribers, publishers and their probes (see the module doc)."""

    messages = True

    def check(self, args: argparse.Namespace) -> str | None:
        if args.publishers < 1:
            return "--publishers must be at least 1"
        return None

    def rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        ratio = percent_floor(r["delivered_ratio"]) if r["delivered_ratio"] is not None else "-"
        late = f" + {r['late_deliveries']:,} after the window" if r["late_deliveries"] else ""
        return [("publishes", f"{r['publishes']:,} ({r['publish_rate']:,.1f}/s, "
                              f"{r['message_bytes']} B, window {r['window']})"),
                ("deliveries", f"{r['deliveries']:,} ({r['deliveries_per_s']:,.0f}/s){late}; "
                               f"{ratio} of {r['expected_deliveries']:,} expected arrived"),
                ("latency", describe(r["latency_ms"]))]

    # --- a worker's side ------------------------------------------------------

    async def connect(self, worker: Worker) -> None:
        wanted = list(worker.plan.subscribers)
        if worker.dialect.groups:  # members before the group exists
            wanted += [(name, room) for name, _, room in worker.plan.publishers]
        await worker.open_many(wanted)

    async def prepare(self, worker: Worker) -> None:
        """Publishers join after every subscriber (so probes are served last)."""
        if worker.dialect.groups:
            await self.prepare_groups(worker)
            return
        plan = worker.plan
        wanted: list[tuple[str, int]] = []
        for name, probe, room in plan.publishers:
            wanted.append((name, room))
            if probe:
                wanted.append((probe, room))
        opened = iter(await worker.open_many(wanted))
        for name, probe, room in plan.publishers:
            publisher = next(opened)
            watcher = next(opened) if probe else publisher
            if publisher is not None and watcher is not None:
                watcher.ack_tag = publisher.name.encode() + b":"
                worker.pairs.append((publisher, watcher))

    async def prepare_groups(self, worker: Worker) -> None:
        """Creators make one group per room; publishers learn its session id."""
        plan = worker.plan
        members = {c.name: c for c in worker.clients}

        async def create(names: list[str]) -> None:
            creator = members.get(names[0])
            if creator is None:
                return
            try:
                with trio.fail_after(plan.connect_timeout):
                    await worker.dialect.create_group(creator, names)
            except (LoadError, trio.TooSlowError) as exc:
                worker.error(str(exc) or "timeout: group creation")

        async with trio.open_nursery() as nursery:
            for names in plan.groups.values():
                nursery.start_soon(create, names)
        for name, _, _ in plan.publishers:
            publisher = members.get(name)
            if publisher is None:
                continue
            with trio.move_on_after(plan.connect_timeout):
                await publisher.session_known.wait()
            if not publisher.session:
                worker.error("group: session info never arrived")
                continue
            publisher.ack_tag = publisher.name.encode() + b":"
            worker.pairs.append((publisher, publisher))

    async def load(self, worker: Worker, start: float, deadline: float) -> None:
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as publishing:
                for publisher, probe in worker.pairs:
                    publishing.start_soon(self.publish, worker, publisher, probe, start, deadline)
                await trio.sleep_forever()
        await self.drain(worker)

    async def publish(self, worker: Worker, publisher: WsClient, probe: WsClient, start: float,
                      deadline: float) -> None:
        """Send as the rate or the window allows, until the connection ends."""
        plan, stats = worker.plan, worker.stats
        rate, window, size = plan.rate_per_publisher, plan.window, plan.size
        tag = publisher.name.encode()
        make = worker.dialect.publish
        while not (publisher.done.is_set() or probe.done.is_set()):
            now = trio.current_time()
            sent = publisher.sent
            room = window - (sent - probe.acked)
            due = int((now - start) * rate) + 1 - sent if rate else room
            n = min(due, room)
            if n > 0:
                frames = b"".join(client_frame(make(publisher, message_content(tag, size)))
                                  for _ in range(n))
                try:
                    await publisher.send_raw(frames)
                except LoadError as exc:
                    worker.error(str(exc))
                    return
                publisher.sent += n
                stats.publishes += n
                worker.room_publishes[publisher.room] += n
            elif due > 0 or not rate:
                probe.ack_event = trio.Event()
                await probe.ack_event.wait()
            else:
                await trio.sleep_until(min(deadline, start + sent / rate))

    async def drain(self, worker: Worker) -> None:
        """Wait (at most ``grace`` seconds) until each probe has seen every
        message its publisher sent: the probe is served last."""
        with trio.move_on_after(worker.plan.grace):
            for publisher, probe in worker.pairs:
                while probe.acked < publisher.sent and not probe.done.is_set():
                    probe.ack_event = trio.Event()
                    await probe.ack_event.wait()
