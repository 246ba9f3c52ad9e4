"""Several nodes as one service: the router service for cross-node traffic.

A router service beside the others (``chatd.router``). Cross-node
traffic is symmetric: each service sends what it has to tell other nodes
with ``Broker.publish`` (one call out), and says what it handles of
theirs in ``Service.remote_items`` (item type -> handler). The broker's
subscriber task posts what other nodes publish as ``Remote`` commands;
``Cluster.remote`` hands each item to the one service that registered
its type (one dispatch in), in the router task like every local command,
so state needs no locks and the router never awaits the network. What
happens when a remote X arrives is in the ``remote_items`` of the
service that owns X:

- ``Lobby``: ``said``, ``whisper``, ``joined``, ``left``, ``presence``,
  ``heartbeat`` (presence versions), ``syncrequest``;
- ``Sessions``: ``sessionchanged``, ``stored``;
- ``Marks``: ``marksmoved``;
- ``Moderation``: ``moderated``;
- this service: ``bye``.

It also keeps the cluster's membership, and tells every service of it
(``Service.node_gone``, ``broker_up``, ``broker_down``, ``subscribed``):

- **Nodes.** A node is known from the first thing it publishes; its
  heartbeat (every second) keeps it alive. A node silent for
  ``Broker.node_timeout`` seconds while this node's own subscription
  works is taken for dead (``kill -9``, a lost network): its names are
  released on its behalf, then announced as gone (``user_left``,
  ``quit``), so a name announced gone can be claimed at once. A node whose
  ``boot`` changed restarted: what it held before is gone the same way. A
  node that stops (SIGTERM) says ``Bye``: it is forgotten at once, its
  names likewise (logged at INFO, not taken for dead), and anything of
  that process that comes later is ignored.
- **Outages.** Each ``BrokerUp`` (the first, and every one after an
  outage): the lobby exchanges presence again, the GradAgenda sessions
  reload from the store (changes made elsewhere meanwhile are applied and
  told) and every feed catches up.

With ``LocalBroker`` the server installs no ``Cluster`` at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatd.broker import Broker
from chatd.broker.base import BrokerDown, BrokerUp, Remote, Subscribed, Tick, channel_user
from chatd.broker.wire import Bye
from chatd.router import Service

if TYPE_CHECKING:
    from chatd.router import Router

log = logging.getLogger("chatd.cluster")


class _Node:
    __slots__ = ("boot", "heard")

    def __init__(self, boot: str, heard: float) -> None:
        self.boot = boot
        self.heard = heard


class Cluster(Service):
    """``services``: the node's other router services, whose
    ``remote_items`` it dispatches to; ``heartbeat``: what this node's
    heartbeat carries (the lobby's presence versions per room)."""

    def __init__(self, broker: Broker, services: Iterable[Service],
                 heartbeat: Callable[[], dict[str, int]]) -> None:
        self.broker = broker
        self.services = list(services)
        self.heartbeat = heartbeat
        self.nodes: dict[str, _Node] = {}
        #: Whether the broker delivers now.
        self.up = False
        self.router: Router | None = None
        #: node -> the boot of its process that said ``Bye``.
        self.departed: dict[str, str] = {}
        #: item type -> its handler, from every service's ``remote_items``.
        self.handlers: dict[type, Callable[[Remote, Any], None]] = {Bye: self._bye}
        for service in self.services:
            for kind, handler in service.remote_items().items():
                if kind in self.handlers:
                    raise RuntimeError(f"two services handle remote {kind.__name__} items")
                self.handlers[kind] = handler

    # --- service life ------------------------------------------------------------

    def install(self, router: Router) -> None:
        self.router = router
        router.handle(Remote, self.remote)
        router.handle(Subscribed, self.subscribed)
        router.handle(BrokerUp, self.broker_up)
        router.handle(BrokerDown, self.broker_down)
        router.handle(Tick, self.tick)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.broker.run(self.router, self.heartbeat, task_status=task_status)

    async def ready(self) -> str | None:
        return self.broker.ready()

    async def aclose(self) -> None:
        await self.broker.aclose()

    # --- what other nodes said ----------------------------------------------------------

    def remote(self, cmd: Remote) -> None:
        """One dispatch in: each item to the service that handles its type."""
        origin = cmd.origin
        if self.departed.get(origin) == cmd.boot:
            return  # that process said Bye: nothing of it is news any more
        self._heard(origin, cmd.boot)
        handlers = self.handlers
        for item in cmd.items:
            handler = handlers.get(type(item))
            if handler is not None:
                handler(cmd, item)
            if self.departed.get(origin) == cmd.boot:
                return  # it said Bye: what follows is not news either

    def _bye(self, cmd: Remote, _: Bye) -> None:
        """``cmd.origin`` stopped (SIGTERM), and released its names."""
        log.info("node %s left the cluster (stopped): its clients' departures are announced",
                 cmd.origin)
        self.departed[cmd.origin] = cmd.boot
        self._forget(cmd.origin, cmd.boot)

    def _heard(self, origin: str, boot: str) -> None:
        now = trio.current_time()
        node = self.nodes.get(origin)
        if node is None:
            log.info("node %s is in the cluster", origin)
            self.nodes[origin] = _Node(boot, now)
            self.departed.pop(origin, None)
        elif node.boot != boot:
            log.warning("node %s restarted: the names it held before are gone", origin)
            for service in self.services:
                service.node_gone(origin, node.boot)
            node.boot, node.heard = boot, now
        else:
            node.heard = now

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
                self._forget(name, node.boot)

    def _forget(self, name: str, boot: str) -> None:
        self.nodes.pop(name, None)
        for service in self.services:
            service.node_gone(name, boot)

    def broker_up(self, cmd: BrokerUp) -> None:
        self.up = True
        # Nobody could be heard meanwhile: give every node a fresh timeout.
        now = trio.current_time()
        for node in self.nodes.values():
            node.heard = now
        for service in self.services:
            service.broker_up()

    def broker_down(self, _: BrokerDown) -> None:
        self.up = False
        for service in self.services:
            service.broker_down()

    def subscribed(self, cmd: Subscribed) -> None:
        users = [user for channel in cmd.channels if (user := channel_user(channel)) is not None]
        if users:
            for service in self.services:
                service.subscribed(users)

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
        yield CounterMetricFamily("chatd_cluster_name_graces",
                                  "Graces after an outage every node shared, during which new "
                                  "names waited while nodes claimed their own again",
                                  value=stats.get("graces", 0))
        yield GaugeMetricFamily("chatd_cluster_claims_waiting",
                                "Name claims waiting for the broker or for a grace",
                                value=stats.get("claims_waiting", 0))
        yield GaugeMetricFamily("chatd_cluster_broker_up", "1 while the broker delivers",
                                value=1 if self.broker.ready() is None else 0)
        yield GaugeMetricFamily("chatd_cluster_nodes", "Other nodes heard from",
                                value=len(self.nodes))
        yield GaugeMetricFamily("chatd_cluster_names_held", "Names this node holds in the broker",
                                value=stats.get("names", 0))

    def describe(self) -> list[Any]:
        return []
