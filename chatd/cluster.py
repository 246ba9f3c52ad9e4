"""Several nodes as one service: the router service for cross-node traffic.

A router service beside the lobby and the GradAgenda sessions
(``chatd.router``). The broker's subscriber task posts what other nodes
publish as ``Remote`` commands; this service hands each item to the
service it concerns (``Lobby.remote_*``, ``Sessions.remote_*``), in the
router task like every local command, so state needs no locks and the
router never awaits the network. It also keeps the cluster's membership:

- **Nodes.** A node is known from the first thing it publishes; its
  heartbeat (every second) keeps it alive. A node silent for
  ``Broker.node_timeout`` seconds while this node's own subscription
  works is taken for dead (``kill -9``, a lost network): its names are
  announced as gone (``user_left``, ``quit``). A node whose ``boot``
  changed restarted: what it held before is gone the same way.
- **Presence.** Each node numbers its claims and releases per room; a
  heartbeat carries the numbers, so a node that missed one (a dropped
  pub/sub message) asks for that node's whole ``Presence`` again. When the
  broker (re)connects, this node publishes its own presence in each room
  and asks every node for theirs, so the wcp roster is complete.
- **Outages.** Each ``BrokerUp`` (the first, and every one after an
  outage): presence is exchanged again, the GradAgenda sessions reload
  from the store (changes made elsewhere meanwhile are applied and told)
  and every feed catches up (``Sessions.resumed``).

With ``LocalBroker`` the server installs no ``Cluster`` at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatd.broker import Broker
from chatd.broker.base import (
    CLUSTER, BrokerDown, BrokerUp, Remote, Subscribed, Tick, node_channel, room_channel,
    user_channel,
)
from chatd.broker.wire import (
    Heartbeat, Joined, Left, MarksMoved, Presence, Said, SessionChanged, Stored, SyncRequest,
    Whisper,
)

if TYPE_CHECKING:
    from chatd.lobby import Lobby
    from chatd.router import Router
    from chatd.sessions import Sessions

log = logging.getLogger("chatd.cluster")

#: Seconds before the same node is asked again for its presence in a room.
ASK_INTERVAL = 5.0


class _Node:
    __slots__ = ("boot", "heard")

    def __init__(self, boot: str, heard: float) -> None:
        self.boot = boot
        self.heard = heard


class Cluster:
    """``rooms``: the lobby rooms this node's endpoints serve (their
    channels are subscribed for the node's whole life); ``sessions`` is
    None when no GradAgenda endpoint is mounted."""

    def __init__(self, broker: Broker, lobby: Lobby, sessions: Sessions | None,
                 rooms: set[str]) -> None:
        self.broker = broker
        self.lobby = lobby
        self.sessions = sessions
        self.rooms = set(rooms)
        self.nodes: dict[str, _Node] = {}
        #: Whether the broker delivers now.
        self.up = False
        self.router: Router | None = None
        self._asked: dict[tuple[str, str], float] = {}
        self._user_prefix = user_channel("")

    # --- service life ------------------------------------------------------------

    def install(self, router: Router) -> None:
        self.router = router
        router.handle(Remote, self.remote)
        router.handle(Subscribed, self.subscribed)
        router.handle(BrokerUp, self.broker_up)
        router.handle(BrokerDown, self.broker_down)
        router.handle(Tick, self.tick)
        self.broker.subscribe(room_channel(room) for room in sorted(self.rooms))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.broker.run(self.router, self.versions, task_status=task_status)

    async def ready(self) -> str | None:
        return self.broker.ready()

    async def aclose(self) -> None:
        await self.broker.aclose()

    def versions(self) -> dict[str, int]:
        """This node's presence version in each room it serves (heartbeats)."""
        return {room: self.lobby.versions.get(room, 0) for room in sorted(self.rooms)}

    # --- what other nodes said ----------------------------------------------------------

    def remote(self, cmd: Remote) -> None:
        origin = cmd.origin
        self._heard(origin, cmd.boot)
        lobby = self.lobby
        for item in cmd.items:
            kind = type(item)
            if kind is Said:
                lobby.remote_said(item)
            elif kind is Stored:
                if self.sessions is not None and cmd.channel.startswith(self._user_prefix):
                    self.sessions.remote_stored(cmd.channel[len(self._user_prefix):], item)
            elif kind is Joined:
                if not lobby.remote_joined(origin, item):
                    self._ask(origin, [item.room])
            elif kind is Left:
                if not lobby.remote_left(origin, item):
                    self._ask(origin, [item.room])
            elif kind is Heartbeat:
                stale = lobby.stale_rooms(origin, item.rooms, self.rooms)
                if stale:
                    self._ask(origin, stale)
            elif kind is Presence:
                self._asked.pop((origin, item.room), None)
                lobby.remote_presence(origin, item)
            elif kind is Whisper:
                lobby.remote_whisper(item)
            elif kind is SyncRequest:
                for room in sorted(self.rooms.intersection(item.rooms or self.rooms)):
                    self.broker.publish(node_channel(origin), lobby.presence(room))
            elif kind is SessionChanged:
                if self.sessions is not None:
                    self.sessions.remote_changed(item)
            elif kind is MarksMoved:  # issue 23
                if self.sessions is not None and self.sessions.marks is not None:
                    self.sessions.marks.remote(item)

    def _heard(self, origin: str, boot: str) -> None:
        now = trio.current_time()
        node = self.nodes.get(origin)
        if node is None:
            log.info("node %s is in the cluster", origin)
            self.nodes[origin] = _Node(boot, now)
        elif node.boot != boot:
            log.warning("node %s restarted: the names it held before are gone", origin)
            self.lobby.node_gone(origin)
            node.boot, node.heard = boot, now
        else:
            node.heard = now

    def _ask(self, node: str, rooms: list[str]) -> None:
        """Ask ``node`` for its whole presence in ``rooms`` (not too often)."""
        now = trio.current_time()
        rooms = [room for room in rooms
                 if now - self._asked.get((node, room), -math.inf) >= ASK_INTERVAL]
        if rooms:
            for room in rooms:
                self._asked[(node, room)] = now
            self.broker.publish(node_channel(node), SyncRequest(rooms=rooms))

    # --- the broker's state --------------------------------------------------------------

    def tick(self, _: Tick) -> None:
        """Nodes silent too long are dead, if this node can hear at all."""
        if not self.up or self.broker.ready() is not None:
            return
        now = trio.current_time()
        for name, node in list(self.nodes.items()):
            if now - node.heard > self.broker.node_timeout:
                log.warning("node %s silent for %.0f s: taken for dead; its names are released",
                            name, now - node.heard)
                del self.nodes[name]
                self.lobby.node_gone(name)
                for key in [key for key in self._asked if key[0] == name]:
                    del self._asked[key]

    def broker_up(self, cmd: BrokerUp) -> None:
        self.up = True
        # Nobody could be heard meanwhile: give every node a fresh timeout.
        now = trio.current_time()
        for node in self.nodes.values():
            node.heard = now
        for room in sorted(self.rooms):
            self.broker.publish(room_channel(room), self.lobby.presence(room))
        self.broker.publish(CLUSTER, SyncRequest(rooms=sorted(self.rooms)))
        # Also the first time: sessions changed elsewhere between loading
        # them at start and subscribing were not heard of.
        if self.sessions is not None:
            self.sessions.resumed()

    def broker_down(self, _: BrokerDown) -> None:
        self.up = False
        if self.sessions is not None:
            self.sessions.broker_down()

    def subscribed(self, cmd: Subscribed) -> None:
        if self.sessions is not None:
            self.sessions.subscribed(cmd.channels)

    # --- metrics ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Prometheus families (registered in the server's registry)."""
        stats = self.broker.stats()
        events = CounterMetricFamily("chatd_cluster_events", "Events for or from other nodes",
                                     labels=["outcome"])
        for outcome in ("published", "received", "dropped", "malformed"):
            events.add_metric([outcome], stats.get(outcome, 0))
        yield events
        yield CounterMetricFamily("chatd_cluster_outages", "Times the broker went down",
                                  value=stats.get("outages", 0))
        yield GaugeMetricFamily("chatd_cluster_broker_up", "1 while the broker delivers",
                                value=1 if self.broker.ready() is None else 0)
        yield GaugeMetricFamily("chatd_cluster_nodes", "Other nodes heard from",
                                value=len(self.nodes))
        yield GaugeMetricFamily("chatd_cluster_names_held", "Names this node holds in the broker",
                                value=stats.get("names", 0))
        skipped = self.sessions.skipped if self.sessions is not None else 0
        yield CounterMetricFamily("chatd_cluster_gradagenda_gaps_skipped",
                                  "GradAgenda gaps the store could not fill", value=skipped)

    def describe(self) -> list[Any]:
        return []
