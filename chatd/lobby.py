"""Lobby rooms: public broadcast rooms shared by every lobby protocol.

A room holds its receiving clients grouped by protocol, so a message is
encoded and framed once per protocol present, then the same bytes go to
every recipient of that protocol.

**One name, one owner.** Every name a message can appear under is held
by exactly one connection of the room, whatever its protocol: socialvp
names, wcp user ids (and display names), multichat client names (claimed
at ``register``) and wschat ``usr`` (claimed by the connection's first
message with it; a new ``usr`` renames). Names compare as ``chatd.names``
says, so a look-alike of a held name (``Alice``, ``аlice``) is held too.
A claim that fails is refused with the protocol's answer (``Join``'s
result), or, for a wschat message, the message is dropped and logged.
Claims and releases are announced (``UserJoined``/``UserLeft``): every
protocol asks for it, since every held name can appear on messages.

**Bridges share.** multichat bridges share one secret, and the original
server lets several register one name (a bridge run twice, or one that
reconnects while its old, half-open connection is still held). A claim
made with ``Join.shared`` joins a held claim that was made the same way
and is shown exactly alike: both clients hold the one ``Claim``
(``Claim.sharers``, the first in the indexes), the name is announced once,
when the first takes it, and its leave once, when the last gives it up.
A bridge registering while another's claim of the name is in flight
(cluster) waits for that claim's answer and shares it (``_Pending.followers``).
A look-alike (``Bridge`` for ``bridge``) is still refused, and so is any
claim of another protocol. With several nodes, bridges share a name
across nodes too: each node holds the name in the broker's registry
under its own owner, with the name as the share tag (``Broker.claim``'s
``share``), and the broker grants it only if every holder is such a
bridge (docs/cluster.md). Every node shows the name as ONE user, held
while this node or any other holds it (``_shown``): joined when the
first holder anywhere takes it, gone when the last one gives it up.

**Several nodes** (``chatd.broker``; docs/cluster.md). The lobby checks a
claim against this node's names first (a name held here is refused at
once), then asks the broker, whose registry spans the cluster
(``Broker.claim``). When that answer comes later (Redis), the name is
reserved here meanwhile, the ``Join`` is answered once it comes
(``DEFERRED``), and every later lobby command of that connection (a
wschat message, its ``Leave``) waits behind it, so each connection's
commands still take effect in the order sent. Messages, and every claim
and release, are published to the room's channel; what other nodes
publish arrives through ``chatd.cluster`` (the ``remote_*`` methods) and
is delivered here like local events, encoded once per protocol. The
lobby keeps a view of the names held on other nodes (for the wcp roster,
direct messages and announcements), numbered per node and room so that a
missed change is noticed and the whole view of that node asked for again.
With ``LocalBroker`` (one node) all of this reduces to the local registry.

**A departure is announced once its name is free**, on every path: a
client's leave is announced when the broker has released its name
(``Released``), a rename gives up the old name in the same atomic step
that claims the new one, a node gone (dead, restarted or stopped) has its
names released on its behalf before they are announced, and another
node's ``Left`` or ``Presence`` comes after that node's release (one
publisher per node, in order). So a name announced gone can be claimed at
once, on any node.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Any

import trio

from chatd import hub, names
from chatd.broker import Broker, LocalBroker
from chatd.broker.base import (
    CLUSTER, ClaimDone, NamesLost, Released, Remote, node_channel, owner, room_channel,
)
from chatd.broker.wire import Heartbeat, Joined, Left, Member, Presence, Said, SyncRequest, Whisper
from chatd.events import Direct, Event, Join, Leave, Message, Publish, SendDirect, UserJoined, UserLeft
from chatd.logs import charged_to
from chatd.outbox import Receivers
from chatd.router import DEFERRED, Router, Service

if TYPE_CHECKING:
    from chatd.outbox import Client
    from chatd.protocols.base import Protocol

log = logging.getLogger("chatd.lobby")

#: Seconds before the same node is asked again for its presence in a room.
ASK_INTERVAL = 5.0

#: The close code and reason for a holder whose name another node took
#: while this node could not renew it (docs/cluster.md): reconnect.
NAME_LOST = (1012, "name lost while this node was cut off from the cluster: reconnect")


class Claim:
    """What one client (or several bridges sharing it) holds in a room: its
    name, its display name if it has its own (wcp), and every look-alike
    key of both."""

    __slots__ = ("name", "display_name", "keys", "announced", "shared", "sharers", "owner",
                 "member")

    def __init__(self, name: names.Name, display_name: names.Name | None,
                 announced: bool, shared: bool = False) -> None:
        self.name = name
        self.display_name = display_name
        self.keys = name.keys | display_name.keys if display_name is not None else name.keys
        #: Whether its join (and so its leave) is told to the room.
        self.announced = announced
        #: Whether other ``shared`` claims of the same name may join it.
        self.shared = shared
        #: The clients holding it, in the order they came; the first is the
        #: one the room's indexes (``holders``, ``names``) point to.
        self.sharers: list[Client] = []
        #: Its owner in the broker's registry, and its member id for other
        #: nodes: the first holder's, kept while anyone holds it.
        self.owner = ""
        self.member = 0

    def announcement(self) -> UserJoined:
        shown = self.display_name.shown if self.display_name is not None else None
        return UserJoined(name=self.name.shown, display_name=shown)

    def alike(self, other: Claim) -> bool:
        """Whether ``other`` may hold this name beside this one: both shared,
        shown exactly alike, neither with a display name (so their keys
        are the same)."""
        return (self.shared and other.shared and self.display_name is None
                and other.display_name is None and self.name.shown == other.name.shown)

    @property
    def share(self) -> str | None:
        """The broker's share tag for this claim (``Broker.claim``), if shared."""
        return self.name.shown if self.shared and self.display_name is None else None


class Room:
    __slots__ = ("name", "receivers", "names", "holders", "claims", "reserved")

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: dict[type[Protocol], Receivers] = {}
        #: Held names by their address form (RFC 8266 comparison), for ``SendDirect``.
        self.names: dict[str, Client] = {}
        #: Every look-alike key of every held (or reserved) name -> its holder.
        self.holders: dict[str, Client] = {}
        #: client id -> what it holds.
        self.claims: dict[int, Claim] = {}
        #: client id -> the claim the broker is asked for (cluster).
        self.reserved: dict[int, Claim] = {}

    def __len__(self) -> int:
        return sum(len(m) for m in self.receivers.values())


class RemoteMember:
    """A name held on another node: ``key`` is (node, client id there).
    ``departing``: its node is gone and its release is under way; it is
    announced gone once done (``Lobby.released``)."""

    __slots__ = ("key", "claim", "protocol", "departing")

    def __init__(self, key: tuple[str, int], claim: Claim, protocol: str) -> None:
        self.key = key
        self.claim = claim
        self.protocol = protocol
        self.departing = False


class RemoteRoom:
    """What this node knows of a room's names on other nodes. A name is
    held by one member, or by several that share it (bridges on several
    nodes): the indexes list every holder, in the order learnt of."""

    __slots__ = ("members", "addresses", "holders", "versions")

    def __init__(self) -> None:
        self.members: dict[tuple[str, int], RemoteMember] = {}
        #: Address form of a name -> its holders.
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        #: Look-alike key -> its holders.
        self.holders: dict[str, list[tuple[str, int]]] = {}
        #: node -> the last presence version applied from it.
        self.versions: dict[str, int] = {}

    def index(self, member: RemoteMember) -> None:
        self.addresses.setdefault(member.claim.name.address, []).append(member.key)
        for look in member.claim.keys:
            self.holders.setdefault(look, []).append(member.key)

    def unindex(self, member: RemoteMember) -> None:
        for index, key in [(self.addresses, member.claim.name.address),
                           *((self.holders, look) for look in member.claim.keys)]:
            keys = index.get(key)
            if keys is not None and member.key in keys:
                keys.remove(member.key)
                if not keys:
                    del index[key]


class _Pending:
    """A claim the broker has not answered yet, and the command behind it;
    ``followers``: bridges that registered the same name (shared) here
    meanwhile, with their ``Join``: they share the claim if it is granted."""

    __slots__ = ("command", "room", "client", "claim", "keys", "followers")

    def __init__(self, command: Any, room: Room, client: Client, claim: Claim,
                 keys: frozenset[str]) -> None:
        self.command = command
        self.room = room
        self.client = client
        self.claim = claim
        self.keys = keys
        self.followers: list[tuple[Client, Join]] = []


class Lobby(Service):
    """``rooms``: the rooms this node's endpoints serve; with a shared
    broker, their channels are subscribed for the node's whole life."""

    def __init__(self, broker: Broker | None = None, rooms: Iterable[str] = ()) -> None:
        self.broker: Broker = broker if broker is not None else LocalBroker()
        self.served = set(rooms)
        self.rooms: dict[str, Room] = {}
        #: Other nodes' names, by room (cluster).
        self.remote: dict[str, RemoteRoom] = {}
        #: This node's presence version per room: claims and releases so far.
        self.versions: dict[str, int] = {}
        #: client id -> lobby commands waiting behind its claim in flight.
        self.waiting: dict[int, deque[Any]] = {}
        self._pending: dict[int, _Pending] = {}
        #: release token -> the departure to announce once it is done: a
        #: local leave (room name, event, leaver) or another node's member
        #: (room name, member).
        self._departures: dict[int, tuple[str, UserLeft, Client] | tuple[str, RemoteMember]] = {}
        self._tokens = itertools.count(1)
        #: (room name, name as shown) -> local departures of it not told yet
        #: (their release is under way): still shown to the room.
        self._leaving: Counter[tuple[str, str]] = Counter()
        #: (node, room) -> when this node last asked it for its presence there.
        self._asked: dict[tuple[str, str], float] = {}
        self._handlers = {Join: self.join, Publish: self.publish, SendDirect: self.send_direct,
                          Leave: self.leave}

    def install(self, router: Router) -> None:
        for command_type, handler in self._handlers.items():
            router.handle(command_type, handler)
        router.handle(ClaimDone, self.claim_done)
        router.handle(Released, self.released)
        router.handle(NamesLost, self.names_lost)
        if self.broker.shared:
            self.broker.subscribe(room_channel(room) for room in sorted(self.served))

    def remote_items(self) -> dict[type, Any]:
        """Other nodes' lobby traffic (docs/cluster.md): messages, direct
        messages, presence changes and snapshots, heartbeats' presence
        versions, and requests for this node's presence."""
        return {
            Said: lambda _, item: self.remote_said(item),
            Whisper: lambda _, item: self.remote_whisper(item),
            Joined: lambda remote, item: self._heard_of(remote.origin, item.room,
                                                        self.remote_joined(remote.origin, item)),
            Left: lambda remote, item: self._heard_of(remote.origin, item.room,
                                                      self.remote_left(remote.origin, item)),
            Presence: self._on_presence,
            Heartbeat: self._on_heartbeat,
            SyncRequest: self._on_sync_request,
        }

    # --- handlers ----------------------------------------------------------

    def join(self, cmd: Join) -> bool | object:
        """Enter the room (claiming ``cmd.name`` if ``register``); False if
        the name, or one that looks like it, is held by another client."""
        if self._queued(cmd):
            return DEFERRED
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            room = self.rooms[client.room] = Room(client.room)
        if cmd.register and cmd.name is not None:
            ok = self._claim(room, client, cmd.name, cmd.display_name, cmd.announce, cmd,
                             shared=cmd.shared)
            if ok is None:
                return DEFERRED
            if not ok:
                self._forget_if_empty(room)
                return False
        else:
            client.name = cmd.name
            client.display_name = cmd.display_name
        return self._enter(room, cmd)

    def _enter(self, room: Room, cmd: Join) -> bool:
        client = cmd.client
        members = room.receivers.get(client.protocol)
        if members is None:
            members = room.receivers[client.protocol] = Receivers(client.protocol.name)
        members.add(client)
        if cmd.roster:
            self._send_roster(room, client)
        return True

    def publish(self, cmd: Publish) -> None:
        if self._queued(cmd):
            return
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None or client.id not in room.receivers.get(client.protocol, ()):
            log.debug("publish from %r, which has not joined", client)
            return
        if cmd.sender is not None and cmd.sender != client.name:
            ok = self._claim(room, client, cmd.sender, None, True, cmd)
            if ok is None:
                return
            if not ok:
                self._refused_sender(room, client, cmd)
                return
        self._say(room, client, cmd)

    def _say(self, room: Room, client: Client, cmd: Publish) -> None:
        event = Message(room=room.name, sender=client.name, payload=cmd.payload,
                        time_ns=time.time_ns(), client_timestamp=cmd.client_timestamp)
        self.fanout(room, event, exclude=client)
        if self.broker.shared:
            self.broker.publish(room_channel(room.name), Said(
                room=room.name, sender=event.sender, payload=event.payload, time_ns=event.time_ns,
                client_timestamp=event.client_timestamp))

    @staticmethod
    def _refused_sender(room: Room, client: Client, cmd: Publish) -> None:
        with charged_to(getattr(client, "log_source", None)):  # logged in the router
            log.info("%s message as %r dropped: the name (or one like it) is held by "
                     "another connection in room %s", client.peer, cmd.sender, room.name,
                     extra={"peer": client.peer})

    def send_direct(self, cmd: SendDirect) -> bool | object:
        """Deliver to the holder of ``cmd.to`` (compared as RFC 8266 says:
        ``Wendy`` reaches ``wendy``), here or on another node; False if
        nobody holds it or the holder's protocol has no direct messages
        (multichat, wschat)."""
        if self._queued(cmd):
            return DEFERRED
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            return False
        try:
            address = names.parse(cmd.to).address
        except names.InvalidName:
            return False
        target = room.names.get(address)
        if target is None:
            return self._send_remote(room, client, address, cmd)
        return hub.send(target, Direct(sender=client.name or "", to=target.name or cmd.to,
                                       payload=cmd.payload, time_ns=time.time_ns()))

    def _send_remote(self, room: Room, client: Client, address: str, cmd: SendDirect) -> bool:
        remote = self.remote.get(room.name)
        keys = remote.addresses.get(address) if remote is not None else None
        if not keys:
            return False
        key = keys[0]
        member = remote.members[key]
        if not _takes_direct(member.protocol):
            return False
        self.broker.publish(node_channel(key[0]), Whisper(
            room=room.name, client=key[1], sender=client.name or "", to=member.claim.name.shown,
            payload=cmd.payload, time_ns=time.time_ns()))
        return True

    def leave(self, cmd: Leave) -> None:
        if self._queued(cmd):
            return
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            return
        members = room.receivers.get(client.protocol)
        if members is None or not members.remove(client):
            return
        if not members:
            del room.receivers[client.protocol]
        claim, token = self._release(room, client)
        if claim is not None and claim.announced:
            event = UserLeft(name=claim.name.shown)
            if token is not None:  # announced once the name is free (``released``)
                self._depart_later(token, room.name, event, client)
            elif not self._shown(room, claim.name.address):
                self.fanout(room, event, exclude=client)
        self._forget_if_empty(room)

    def _forget_if_empty(self, room: Room) -> None:
        if not room.receivers and not room.reserved and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def _send_roster(self, room: Room, client: Client) -> None:
        """A ``UserJoined`` for every name held in ``room`` by others, to
        ``client`` alone: names held on this node in the order they were
        claimed, then those held on other nodes, in the order this node
        learnt of them. The roster is the room as it is now (a list of
        references, taken here), but its frames are made and written by
        the client's connection as it reads (``Client.stream``): however
        big the room, a joiner that reads gets all of it and is never
        taken for a slow consumer; events after the join follow it."""
        own = room.claims.get(client.id)
        # dict.fromkeys: a claim bridges share is listed once.
        claims = list(dict.fromkeys(claim for claim in room.claims.values() if claim is not own))
        remote = self.remote.get(room.name)
        if remote is not None:
            for member in remote.members.values():
                # A name bridges share on several nodes is one user.
                if not any(member.claim.alike(other) for other in claims) and not (
                        own is not None and member.claim.alike(own)):
                    claims.append(member.claim)
        if claims:
            hub.stream(client, (claim.announcement() for claim in claims))

    # --- commands behind a claim in flight ---------------------------------------

    def drop_waiting(self, client: Client) -> None:
        """Forget the messages ``client`` sent while its claim waits (it is
        being refused: moderation's ban); its leave still runs after the
        claim's answer."""
        waiting = self.waiting.get(client.id)
        if waiting:
            kept = [cmd for cmd in waiting if not isinstance(cmd, (Publish, SendDirect))]
            for cmd in waiting:
                if isinstance(cmd, SendDirect):
                    Router.resolve(cmd, False)
            waiting.clear()
            waiting.extend(kept)

    def _queued(self, cmd: Any) -> bool:
        """Keep ``cmd`` for later if its client waits for a claim's answer."""
        waiting = self.waiting.get(cmd.client.id)
        if waiting is None:
            return False
        waiting.append(cmd)
        return True

    def claim_done(self, done: ClaimDone) -> None:
        """The broker's answer to a claim: finish the command behind it, then
        run the commands its client sent meanwhile, in order."""
        pending = self._pending.pop(done.token, None)
        if pending is None:
            return
        room, client, claim, cmd = pending.room, pending.client, pending.claim, pending.command
        room.reserved.pop(client.id, None)
        for key in pending.keys:
            if room.holders.get(key) is client:
                del room.holders[key]
        if done.ok:
            self._take(room, client, claim)
        if isinstance(cmd, Join):
            Router.resolve(cmd, self._enter(room, cmd) if done.ok else False)
        elif done.ok:
            self._say(room, client, cmd)
        else:
            self._refused_sender(room, client, cmd)
        for follower, join in pending.followers:
            if done.ok:
                claim.sharers.append(follower)
                room.claims[follower.id] = claim
                follower.name = claim.name.shown
                follower.display_name = None
            Router.resolve(join, self._enter(room, join) if done.ok else False)
        if not done.ok:
            self._forget_if_empty(room)
        for waiter in [client, *(follower for follower, _ in pending.followers)]:
            self._resume(waiter)

    def _resume(self, client: Client) -> None:
        """Run the lobby commands ``client`` sent while its claim was in
        flight, in order, until one waits for a claim again."""
        waiting = self.waiting.pop(client.id, None)
        while waiting:
            command = waiting.popleft()
            result = self._handlers[type(command)](command)
            if result is not DEFERRED:
                Router.resolve(command, result)
            if client.id in self.waiting:  # another claim began: the rest waits for it
                self.waiting[client.id].extend(waiting)
                break

    # --- the name registry -------------------------------------------------------

    def _claim(self, room: Room, client: Client, name: str, display_name: str | None,
               announce: bool, cmd: Any, shared: bool = False) -> bool | None:
        """Hold ``name`` (and ``display_name``) for ``client`` in ``room``,
        giving up what it held before (a rename: announced as a leave and a
        join, if ``announce``). With ``shared``, join a shared claim of the
        same name held here (quietly: it is announced already). False,
        changing nothing, if another client holds a look-alike; None if the
        broker answers later (``claim_done`` then finishes ``cmd``)."""
        try:
            parsed = names.parse(name)
            display = names.parse(display_name) if display_name is not None else None
        except names.InvalidName:
            # Protocols check names before claiming them; this is a bug.
            log.warning("%r claimed the invalid name %r / %r", client, name, display_name)
            return False
        if display is not None and display.shown == parsed.shown:
            display = None
        claim = Claim(parsed, display, announce, shared)
        if shared and client.id not in room.claims:
            held = self._shareable(room, claim)
            if held is not None:
                held.sharers.append(client)
                room.claims[client.id] = held
                client.name = held.name.shown
                client.display_name = None
                return True
            pending = self._shareable_pending(room, claim)
            if pending is not None and isinstance(cmd, Join):
                # Another bridge's claim of the name is in flight: this one
                # shares its answer.
                pending.followers.append((client, cmd))
                self.waiting[client.id] = deque()
                return None
        for key in claim.keys:
            holder = room.holders.get(key)
            if holder is not None and holder is not client:
                return False
        old = room.claims.get(client.id)
        new_keys = claim.keys - old.keys if old is not None else claim.keys
        # A rename gives up the old name's other keys in the same step: its
        # leave, announced with the new join, comes once it is free.
        drop = old.keys - claim.keys if old is not None else frozenset()
        if new_keys or drop:
            token = next(self._tokens)
            ok = self.broker.claim(room.name, new_keys, self._owner(client), token, drop=drop,
                                   share=claim.share)
            if ok is None:
                self._pending[token] = _Pending(cmd, room, client, claim, new_keys)
                self.waiting[client.id] = deque()
                room.reserved[client.id] = claim
                for key in new_keys:
                    room.holders[key] = client
                return None
            if not ok:
                return False
        self._take(room, client, claim)
        return True

    @staticmethod
    def _shareable(room: Room, claim: Claim) -> Claim | None:
        """The claim held here that ``claim`` (shared) may join: shared too,
        shown exactly alike, no display name; else None."""
        holder = room.holders.get(next(iter(claim.keys)))
        held = room.claims.get(holder.id) if holder is not None else None
        if (held is not None and held.shared and held.display_name is None
                and claim.display_name is None and held.name.shown == claim.name.shown
                and held.keys == claim.keys):
            return held
        return None

    def _shareable_pending(self, room: Room, claim: Claim) -> _Pending | None:
        """The claim in flight here (reserved) that ``claim`` (shared) may
        join, as ``_shareable`` says; else None."""
        holder = room.holders.get(next(iter(claim.keys)))
        reserved = room.reserved.get(holder.id) if holder is not None else None
        if reserved is None or not reserved.alike(claim) or reserved.keys != claim.keys:
            return None
        for pending in self._pending.values():
            if pending.client is holder and pending.claim is reserved:
                return pending
        return None

    def _take(self, room: Room, client: Client, claim: Claim) -> None:
        """Make ``claim`` the client's, announcing what changed."""
        self._supersede(room, claim)
        old, _ = self._release(room, client, keep=claim.keys, freed=True)
        claim.sharers = [client]
        claim.owner = self._owner(client)
        claim.member = client.id
        room.claims[client.id] = claim
        room.names[claim.name.address] = client
        for key in claim.keys:
            room.holders[key] = client
        client.name = claim.name.shown
        client.display_name = claim.display_name.shown if claim.display_name is not None else None
        if old is not None and old.announced and old.announcement() != claim.announcement():
            self.fanout(room, UserLeft(name=old.name.shown), exclude=client)
        if claim.announced and (old is None or not old.announced
                                or old.announcement() != claim.announcement()) and not (
                                    self._shared_remotely(room.name, claim)):
            self.fanout(room, claim.announcement(), exclude=client)
        if self.broker.shared:
            self._tell(room.name, Joined(room=room.name, member=Member(
                client.id, claim.name.shown, client.display_name, client.protocol.name,
                claim.announced, claim.shared), version=0))

    def _release(self, room: Room, client: Client, keep: frozenset[str] = frozenset(), *,
                 freed: bool = False) -> tuple[Claim | None, int | None]:
        """Give up what ``client`` holds in ``room`` (but ``keep``, the keys
        of its new claim; ``freed``: the broker has freed the others
        already, with the claim). What it held, if that is now free, and
        the token of the release under way (None if the name is free now:
        its departure may be announced at once); (None, None) if it held
        nothing, or shares a claim others still hold: nothing to announce."""
        claim = room.claims.pop(client.id, None)
        if claim is None:
            return None, None
        if len(claim.sharers) > 1:
            claim.sharers.remove(client)
            heir = claim.sharers[0]
            if room.names.get(claim.name.address) is client:
                room.names[claim.name.address] = heir
            for key in claim.keys:
                if room.holders.get(key) is client:
                    room.holders[key] = heir
            return None, None
        if room.names.get(claim.name.address) is client:
            del room.names[claim.name.address]
        for key in claim.keys:
            if key not in keep and room.holders.get(key) is client:
                del room.holders[key]
        token = None
        if self.broker.shared:
            if not freed:
                token = next(self._tokens)
                if self.broker.release(room.name, claim.keys - keep,
                                       claim.owner or self._owner(client), token):
                    token = None
            if not keep:
                self._tell(room.name, Left(room=room.name, client=claim.member or client.id,
                                           version=0))
        return claim, token

    def _depart_later(self, token: int, room_name: str, event: UserLeft, client: Client) -> None:
        """Announce ``event`` once the release ``token`` is done (``released``)."""
        self._departures[token] = (room_name, event, client)
        self._leaving[(room_name, event.name)] += 1

    def released(self, done: Released) -> None:
        """A release is done: announce the departure that waited for it."""
        departure = self._departures.pop(done.token, None)
        if departure is None:
            return
        if len(departure) == 3:
            room_name, event, client = departure
            leaving = (room_name, event.name)
            self._leaving[leaving] -= 1
            if not self._leaving[leaving]:
                del self._leaving[leaving]
            room = self.rooms.get(room_name)
            if room is None:
                return
            # Another holder's join may have come first (its claim was
            # granted once the release ran): the name is not gone then.
            if not self._shown(room, names.parse(event.name).address):
                self.fanout(room, event, exclude=client)
            return
        room_name, member = departure
        remote = self.remote.get(room_name)
        if remote is not None and member.departing and remote.members.get(member.key) is member:
            self._drop_remote(room_name, remote, member.key)

    def _owner(self, client: Client) -> str:
        return owner(self.broker.node, self.broker.boot, client.id)

    def names_lost(self, lost: NamesLost) -> None:
        """Names another node took while this one could not renew them: their
        holders here are disconnected (``NAME_LOST``), since the name is
        someone else's now."""
        owners = set(lost.owners)
        for room in list(self.rooms.values()):
            for claim in list(dict.fromkeys(room.claims.values())):
                if claim.owner in owners and claim.sharers:
                    self._lose(room, claim.sharers[0])

    def _lose(self, room: Room, client: Client, taken: frozenset[str] = frozenset()) -> None:
        """``client``'s name went to another node (which holds ``taken``,
        if known): it and every bridge sharing the name with it are
        disconnected, and the leave announced, at once if the other claim
        covers every key of it (the other's join follows), else once the
        rest is released."""
        claim = room.claims.get(client.id)
        holders = list(claim.sharers) if claim is not None and claim.sharers else [client]
        log.warning("%r lost its name %r in room %s to another node: disconnecting %s",
                    client, client.name, room.name,
                    "it" if len(holders) == 1 else f"its {len(holders)} holders")
        for holder in holders:
            released, token = self._release(room, holder)
            if released is not None and released.announced:
                event = UserLeft(name=released.name.shown)
                if token is None or released.keys <= taken:
                    if token is not None or not self._shown(room, released.name.address):
                        self.fanout(room, event, exclude=holder)
                else:
                    self._depart_later(token, room.name, event, holder)
            holder.kill(*NAME_LOST)

    # --- other nodes (``remote_items``; docs/cluster.md) -------------------------------

    def _tell(self, room: str, item: Joined | Left) -> None:
        """Publish a presence change of this node, numbered."""
        version = self.versions[room] = self.versions.get(room, 0) + 1
        item.version = version
        self.broker.publish(room_channel(room), item)

    def presence(self, room: str) -> Presence:
        """Every name this node holds in ``room``, for another node."""
        local = self.rooms.get(room)
        members = []
        if local is not None:
            for claim in dict.fromkeys(local.claims.values()):  # a shared claim once
                client = local.names[claim.name.address]
                members.append(Member(claim.member, claim.name.shown, client.display_name,
                                      client.protocol.name, claim.announced, claim.shared))
        return Presence(room=room, version=self.versions.get(room, 0), members=members)

    def remote_said(self, item: Said) -> None:
        room = self.rooms.get(item.room)
        if room is not None:
            self.fanout(room, Message(room=item.room, sender=item.sender, payload=item.payload,
                                      time_ns=item.time_ns,
                                      client_timestamp=item.client_timestamp))

    def remote_whisper(self, item: Whisper) -> None:
        room = self.rooms.get(item.room)
        if room is None:
            return
        try:
            target = room.names.get(names.parse(item.to).address)
        except names.InvalidName:
            return
        if target is None or target.id != item.client:
            log.info("a direct message from another node for %r in room %s is lost: its holder "
                     "left", item.to, item.room)
            return
        hub.send(target, Direct(sender=item.sender, to=item.to, payload=item.payload,
                                time_ns=item.time_ns))

    def remote_joined(self, node: str, item: Joined) -> bool:
        """Apply another node's claim; False if a change of that node was
        missed (ask it for its ``presence``)."""
        missed = self._count(node, item.room, item.version)
        self._add_remote(node, item.room, item.member)
        return not missed

    def remote_left(self, node: str, item: Left) -> bool:
        missed = self._count(node, item.room, item.version)
        remote = self.remote.get(item.room)
        if remote is not None:
            self._drop_remote(item.room, remote, (node, item.client))
        return not missed

    def remote_presence(self, node: str, item: Presence) -> None:
        """Replace what this node knew of ``node``'s names in the room."""
        remote = self.remote.setdefault(item.room, RemoteRoom())
        remote.versions[node] = item.version
        now = {(node, member.client) for member in item.members}
        for key in [key for key in remote.members if key[0] == node and key not in now]:
            self._drop_remote(item.room, remote, key)
        for member in item.members:
            self._add_remote(node, item.room, member)

    def node_gone(self, node: str, boot: str) -> None:
        """``node`` (its process ``boot``) died, restarted or stopped: its
        names are released on its behalf (so no claim waits for them to
        expire), then announced gone (``released``)."""
        for key in [key for key in self._asked if key[0] == node]:
            del self._asked[key]
        for room, remote in self.remote.items():
            remote.versions.pop(node, None)
            for key, member in list(remote.members.items()):
                if key[0] != node or member.departing:
                    continue
                member.departing = True
                token = next(self._tokens)
                if self.broker.release(room, member.claim.keys, owner(node, boot, key[1]), token):
                    self._drop_remote(room, remote, key)
                else:
                    self._departures[token] = (room, member)

    # --- presence kept in step with other nodes' ------------------------------------

    def broker_up(self) -> None:
        """This node's presence to every node, and everyone's asked for."""
        for room in sorted(self.served):
            self.broker.publish(room_channel(room), self.presence(room))
        self.broker.publish(CLUSTER, SyncRequest(rooms=sorted(self.served)))

    def heartbeat(self) -> dict[str, int]:
        """This node's presence version in each room it serves."""
        return {room: self.versions.get(room, 0) for room in sorted(self.served)}

    def _heard_of(self, node: str, room: str, in_step: bool) -> None:
        if not in_step:
            self._ask(node, [room])

    def _on_presence(self, remote: Remote, item: Presence) -> None:
        self._asked.pop((remote.origin, item.room), None)
        self.remote_presence(remote.origin, item)

    def _on_heartbeat(self, remote: Remote, item: Heartbeat) -> None:
        stale = self.stale_rooms(remote.origin, item.rooms, self.served)
        if stale:
            self._ask(remote.origin, stale)

    def _on_sync_request(self, remote: Remote, item: SyncRequest) -> None:
        for room in sorted(self.served.intersection(item.rooms or self.served)):
            self.broker.publish(node_channel(remote.origin), self.presence(room))

    def _ask(self, node: str, rooms: list[str]) -> None:
        """Ask ``node`` for its whole presence in ``rooms`` (not more often
        than every ``ASK_INTERVAL`` seconds a room)."""
        now = trio.current_time()
        rooms = [room for room in rooms
                 if now - self._asked.get((node, room), -math.inf) >= ASK_INTERVAL]
        if rooms:
            for room in rooms:
                self._asked[(node, room)] = now
            self.broker.publish(node_channel(node), SyncRequest(rooms=rooms))

    def stale_rooms(self, node: str, versions: dict[str, int], served: set[str]) -> list[str]:
        """The rooms of ``served`` whose view of ``node`` is behind the
        ``versions`` its heartbeat gives (or was never had)."""
        stale = []
        for room in served:
            version = versions.get(room, 0)
            remote = self.remote.get(room)
            applied = remote.versions.get(node) if remote is not None else None
            if applied != version and (applied is not None or version):
                stale.append(room)
        return stale

    def _count(self, node: str, room: str, version: int) -> bool:
        """Note ``version`` of ``node``'s presence in ``room``: True if one
        before it was missed."""
        remote = self.remote.setdefault(room, RemoteRoom())
        applied = remote.versions.get(node, 0)
        remote.versions[node] = max(applied, version)
        return version != applied + 1

    def _add_remote(self, node: str, room_name: str, member: Member) -> None:
        try:
            name = names.parse(member.name)
            display = names.parse(member.display_name) if member.display_name is not None else None
        except names.InvalidName as exc:
            log.warning("node %s holds the invalid name %r in room %s: %s", node, member.name,
                        room_name, exc.reason)
            return
        if display is not None and display.shown == name.shown:
            display = None
        key = (node, member.client)
        claim = Claim(name, display, member.announce, member.shared)
        remote = self.remote.setdefault(room_name, RemoteRoom())
        room = self.rooms.get(room_name)
        old = remote.members.get(key)
        if old is not None and old.claim.announcement() == claim.announcement():
            # Its node is back (it was taken for dead): it still holds it.
            old.departing = False
            return
        # The broker gave these names to ``node``: whoever else shows them
        # here lost them (a departure not heard of yet, or a name that
        # expired while this node was cut off), unless they share it.
        for look in claim.keys:
            for other in list(remote.holders.get(look, ())):
                if other != key and not claim.alike(remote.members[other].claim):
                    self._drop_remote(room_name, remote, other)
            if room is not None:
                holder = room.holders.get(look)
                held = room.claims.get(holder.id) if holder is not None else None
                # Only a name granted here is lost; a claim still asked for
                # (a rename under way) will simply be refused.
                if held is not None and look in held.keys and not claim.alike(held):
                    self._lose(room, holder, claim.keys)
        if old is not None:
            remote.unindex(old)
            del remote.members[key]
        # Whether the names are held otherwise (bridges sharing it): no
        # news then.
        old_shown = old is not None and room is not None and self._shown(
            room, old.claim.name.address)
        shown = room is not None and (self._shown(room, name.address) or (
            claim.shared and (room_name, name.shown) in self._leaving))
        remote.members[key] = added = RemoteMember(key, claim, member.protocol)
        remote.index(added)
        if room is not None:
            if old is not None and old.claim.announced and (
                    old.claim.announcement() != claim.announcement()) and not old_shown:
                self.fanout(room, UserLeft(name=old.claim.name.shown))
            if claim.announced and not shown:
                self.fanout(room, claim.announcement())

    def _drop_remote(self, room_name: str, remote: RemoteRoom, key: tuple[str, int]) -> None:
        """Forget another node's member; its leave is announced unless the
        name is still held (bridges sharing it, here or on other nodes) or
        a bridge of this node that shared it is still releasing it: that
        release announces the leave once the name is free (``released``)."""
        member = remote.members.pop(key, None)
        if member is None:
            return
        remote.unindex(member)
        room = self.rooms.get(room_name)
        shown = member.claim.name.shown
        if (room is not None and member.claim.announced
                and not self._shown(room, member.claim.name.address)
                and (room_name, shown) not in self._leaving):
            self.fanout(room, UserLeft(name=shown))

    def _shown(self, room: Room, address: str) -> bool:
        """Whether a name (its address form) is held in ``room``, here or
        on another node, as far as this node knows: its leave is not told
        while it is."""
        if address in room.names:
            return True
        remote = self.remote.get(room.name)
        return remote is not None and address in remote.addresses

    def _shared_remotely(self, room_name: str, claim: Claim) -> bool:
        """Whether another node holds ``claim``'s name, shared alike (it is
        shown already: a join here is not news)."""
        remote = self.remote.get(room_name)
        keys = remote.addresses.get(claim.name.address, ()) if remote is not None else ()
        return any(claim.alike(remote.members[key].claim) for key in keys)

    def _supersede(self, room: Room, claim: Claim) -> None:
        """A claim the broker granted here: any other node's holder of its
        keys in the view has gone (its leave is on its way), unless it
        shares the name alike: drop it now, so its late leave cannot be
        announced after this join."""
        remote = self.remote.get(room.name)
        if remote is None:
            return
        for look in claim.keys:
            for other in list(remote.holders.get(look, ())):
                if not claim.alike(remote.members[other].claim):
                    self._drop_remote(room.name, remote, other)

    # --- fan-out -------------------------------------------------------------

    @staticmethod
    def fanout(room: Room, event: Event, exclude: Client | None = None) -> None:
        """Everyone in ``room`` gets ``event`` (``exclude``, the sender, only
        where its protocol echoes): ``chatd.hub`` encodes it."""
        hub.broadcast(room.receivers, event, exclude)


@cache
def _takes_direct(protocol: str) -> bool:
    """Whether clients of ``protocol`` can receive a direct message."""
    from chatd.protocols import PROTOCOL_CLASSES

    cls = PROTOCOL_CLASSES.get(protocol)
    return cls is not None and cls.encode(Direct(sender="", to="", payload="", time_ns=0)) is not None
