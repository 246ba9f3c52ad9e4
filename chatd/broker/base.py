"""The broker interface: what crosses nodes, and how the router hears of it.

A broker carries events between the chatd nodes of a cluster and keeps
the cluster's name registry. Two backends implement it, one file each:
``LocalBroker`` (one node: nothing crosses, every claim is decided by the
lobby alone; today's behaviour) and ``RedisBroker`` (several nodes, on
Redis). ``chatd.broker.open_broker`` picks one by the ``broker`` config
value; the router never knows which is behind.

The router never awaits the network, so every method the router's
services call is synchronous and never blocks: it queues work for the
broker's own tasks, and answers come back into the router as commands
(below), handled like any other. One publisher task per node sends what
was queued in order (FIFO), so a node's events reach each other node in
the order it queued them; one subscriber task posts what other nodes sent.

Channels (names built here, so every backend agrees; docs/cluster.md):

- ``chatd:cluster``: every node (heartbeats, GradAgenda session changes);
- ``chatd:node:NODE``: one node (direct messages, presence replies);
- ``chatd:room:ROOM``: a lobby room (messages, joins and leaves);
- ``chatd:user:USER``: one GradAgenda user's stored messages.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

from chatd.broker.wire import Item
from chatd.events import Command

CLUSTER = "chatd:cluster"


def node_channel(node: str) -> str:
    return f"chatd:node:{node}"


def room_channel(room: str) -> str:
    return f"chatd:room:{room}"


def user_channel(user: str) -> str:
    return f"chatd:user:{user}"


def channel_user(channel: str) -> str | None:
    """The user whose channel ``channel`` is (``user_channel``), or None."""
    prefix = user_channel("")
    return channel[len(prefix):] if channel.startswith(prefix) else None


def owner(node: str, boot: str, client_id: int) -> str:
    """A name's owner in the cluster's registry: the client ``client_id``
    of ``node``'s process ``boot`` (``NamesLost.owners`` are these)."""
    return f"{node}:{boot}:{client_id}"


# --- what a broker posts to the router ---------------------------------------------


class Remote(Command, kw_only=True):
    """Items another node (``origin``, process ``boot``) published on ``channel``."""

    origin: str
    boot: str
    channel: str
    items: list[Any]

    @property
    def user(self) -> str | None:
        """The GradAgenda user whose channel carried the items, if any."""
        return channel_user(self.channel)


class ClaimDone(Command, kw_only=True):
    """The answer to ``Broker.claim``: ``ok`` if the names are this node's now."""

    token: Any
    ok: bool


class Released(Command, kw_only=True):
    """The answer to ``Broker.release`` with a ``token``: the keys are free
    in the cluster's registry now (or the broker went down meanwhile, and
    frees them once it is back, before any claim of this node)."""

    token: Any


class NamesLost(Command, kw_only=True):
    """Names this node held that another node holds now (they expired while
    this node could not refresh them): ``owners`` are the ``claim`` owners."""

    owners: list[str]


class Subscribed(Command, kw_only=True):
    """``channels`` asked for with ``Broker.subscribe`` now deliver."""

    channels: list[str]


class BrokerUp(Command, kw_only=True):
    """The broker delivers (again). ``resumed``: after an outage, during
    which events may have been lost (every subscription is active again)."""

    resumed: bool


class BrokerDown(Command, kw_only=True):
    """The broker stopped delivering; ``reason`` says why."""

    reason: str


class Tick(Command, kw_only=True):
    """Once a heartbeat interval: time to look for nodes gone silent."""


class Broker(abc.ABC):
    """``node``: this node's id; ``boot``: this process's incarnation;
    ``shared``: whether other nodes may exist (False for ``LocalBroker``:
    services then skip all cross-node work)."""

    node: str
    boot: str
    shared: bool
    #: Seconds after its last heartbeat that a silent node is taken for dead.
    node_timeout: float = 10.0

    @abc.abstractmethod
    async def run(self, router: Any, versions: Callable[[], dict[str, int]], *,
                  task_status: Any) -> None:
        """Run the broker's tasks, posting commands to ``router``, until
        cancelled. ``versions()`` gives the presence version per lobby room
        for heartbeats. Never raises for a broker that is down: it retries."""

    @abc.abstractmethod
    def publish(self, channel: str, item: Item) -> None:
        """Queue ``item`` for every node subscribed to ``channel`` (not this
        one). Dropped, and counted, if the broker is down or its queue full."""

    @abc.abstractmethod
    def claim(self, room: str, keys: Iterable[str], owner: str, token: Any,
              drop: Iterable[str] = (), share: str | None = None) -> bool | None:
        """Hold the look-alike ``keys`` of a name in ``room`` for ``owner``
        (``NODE:BOOT:CLIENT``), atomically, cluster-wide, and give up
        ``drop`` (keys of the name it held: a rename) in the same step, only
        if the claim succeeds. With ``share`` (a tag: the name as shown, for
        multichat bridges), the keys may also be held by other owners that
        claimed them with the same tag, and the claim succeeds if every
        holder of every key did so; each owner's hold is then released,
        renewed and expires on its own, and the keys are free once the last
        owner's hold is gone (docs/cluster.md, "Bridges sharing a name").
        True or False if known at once; None when ``ClaimDone(token, ok)``
        will tell."""

    @abc.abstractmethod
    def release(self, room: str, keys: Iterable[str], owner: str,
                token: Any = None) -> bool | None:
        """Give up ``owner``'s hold of ``keys`` in ``room``, where it still
        holds them (this node's client, or a client of a node gone; the
        other owners of a shared name keep theirs: the keys are free once
        the last one is gone). True if done now, or if it cannot be
        confirmed (the broker is down: it is done once the broker is back,
        before any claim of this node); None when ``Released(token)`` will
        tell (only with a ``token``). A departure is announced once its
        name is free (docs/cluster.md)."""

    @abc.abstractmethod
    def subscribe(self, channels: Iterable[str]) -> bool:
        """Receive ``channels``; True if they deliver now, else
        ``Subscribed`` tells when they do."""

    @abc.abstractmethod
    def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop receiving ``channels``."""

    @abc.abstractmethod
    def ready(self) -> str | None:
        """None when events cross nodes now, else why not (for /readyz)."""

    async def aclose(self) -> None:
        """Send what is queued (bounded in time), then stop."""

    def stats(self) -> dict[str, int]:
        """Counters for /metrics (items published, received, dropped ...)."""
        return {}
