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
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from chatd import names
from chatd.events import Direct, Event, Join, Leave, Message, Publish, SendDirect, UserJoined, UserLeft
from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.client import Client
    from chatd.protocols.base import Protocol
    from chatd.router import Router

log = logging.getLogger("chatd.lobby")


class Claim:
    """What one client holds in a room: its name, its display name if it
    has its own (wcp), and every look-alike key of both."""

    __slots__ = ("name", "display_name", "keys", "announced")

    def __init__(self, name: names.Name, display_name: names.Name | None,
                 announced: bool) -> None:
        self.name = name
        self.display_name = display_name
        self.keys = name.keys | display_name.keys if display_name is not None else name.keys
        #: Whether its join (and so its leave) is told to the room.
        self.announced = announced

    def announcement(self) -> UserJoined:
        shown = self.display_name.shown if self.display_name is not None else None
        return UserJoined(name=self.name.shown, display_name=shown)


class Room:
    __slots__ = ("name", "receivers", "names", "holders", "claims")

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: dict[type[Protocol], dict[int, Client]] = {}
        #: Held names by their address form (RFC 8266 comparison), for ``SendDirect``.
        self.names: dict[str, Client] = {}
        #: Every look-alike key of every held name -> its holder.
        self.holders: dict[str, Client] = {}
        #: client id -> what it holds.
        self.claims: dict[int, Claim] = {}

    def __len__(self) -> int:
        return sum(len(m) for m in self.receivers.values())


class Lobby:
    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}

    def install(self, router: Router) -> None:
        router.handle(Join, self.join)
        router.handle(Publish, self.publish)
        router.handle(SendDirect, self.send_direct)
        router.handle(Leave, self.leave)

    # --- handlers ----------------------------------------------------------

    def join(self, cmd: Join) -> bool:
        """Enter the room (claiming ``cmd.name`` if ``register``); False if
        the name, or one that looks like it, is held by another client."""
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            room = self.rooms[client.room] = Room(client.room)
        if cmd.register and cmd.name is not None:
            if not self._claim(room, client, cmd.name, cmd.display_name, cmd.announce):
                return False
        else:
            client.name = cmd.name
            client.display_name = cmd.display_name
        room.receivers.setdefault(client.protocol, {})[client.id] = client
        if cmd.roster:
            self._send_roster(room, client)
        return True

    def publish(self, cmd: Publish) -> None:
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None or client.id not in room.receivers.get(client.protocol, ()):
            log.debug("publish from %r, which has not joined", client)
            return
        if cmd.sender is not None and cmd.sender != client.name:
            if not self._claim(room, client, cmd.sender, None, announce=True):
                log.info("%s message as %r dropped: the name (or one like it) is held by "
                         "another connection in room %s", client.peer, cmd.sender, room.name)
                return
        event = Message(room=room.name, sender=client.name, payload=cmd.payload,
                        time_ns=time.time_ns(), client_timestamp=cmd.client_timestamp)
        self.fanout(room, event, exclude=client)

    def send_direct(self, cmd: SendDirect) -> bool:
        """Deliver to the holder of ``cmd.to`` (compared as RFC 8266 says:
        ``Wendy`` reaches ``wendy``); False if nobody holds it or the
        holder's protocol has no direct messages (multichat, wschat)."""
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
            return False
        data = target.protocol.encode(Direct(sender=client.name or "", to=target.name or cmd.to,
                                             payload=cmd.payload, time_ns=time.time_ns()))
        if data is None:
            return False
        target.deliver(text_frame(data))
        return True

    def leave(self, cmd: Leave) -> None:
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            return
        members = room.receivers.get(client.protocol)
        if members is None or members.pop(client.id, None) is None:
            return
        if not members:
            del room.receivers[client.protocol]
        claim = self._release(room, client)
        if claim is not None and claim.announced:
            self.fanout(room, UserLeft(name=claim.name.shown), exclude=client)
        if not room.receivers:
            del self.rooms[room.name]

    @staticmethod
    def _send_roster(room: Room, client: Client) -> None:
        """A ``UserJoined`` for every name held in ``room`` by others, to
        ``client`` alone, in the order they were claimed. The frames go as
        one outbox item, so a big room cannot make the joiner look like a
        slow consumer (the outbox counts items, not bytes)."""
        encode = client.protocol.encode
        frames = [text_frame(data) for other_id, claim in room.claims.items()
                  if other_id != client.id and (data := encode(claim.announcement())) is not None]
        if frames:
            client.deliver(b"".join(frames))

    # --- the name registry -------------------------------------------------------

    def _claim(self, room: Room, client: Client, name: str, display_name: str | None,
               announce: bool) -> bool:
        """Hold ``name`` (and ``display_name``) for ``client`` in ``room``,
        giving up what it held before (a rename: announced as a leave and a
        join, if ``announce``); False, changing nothing, if another client
        holds a look-alike."""
        try:
            parsed = names.parse(name)
            display = names.parse(display_name) if display_name is not None else None
        except names.InvalidName:
            # Protocols check names before claiming them; this is a bug.
            log.warning("%r claimed the invalid name %r / %r", client, name, display_name)
            return False
        if display is not None and display.shown == parsed.shown:
            display = None
        claim = Claim(parsed, display, announce)
        for key in claim.keys:
            holder = room.holders.get(key)
            if holder is not None and holder is not client:
                return False
        old = self._release(room, client)
        room.claims[client.id] = claim
        room.names[parsed.address] = client
        for key in claim.keys:
            room.holders[key] = client
        client.name = parsed.shown
        client.display_name = display.shown if display is not None else None
        if old is not None and old.announced and old.announcement() != claim.announcement():
            self.fanout(room, UserLeft(name=old.name.shown), exclude=client)
        if announce and (old is None or not old.announced
                         or old.announcement() != claim.announcement()):
            self.fanout(room, claim.announcement(), exclude=client)
        return True

    @staticmethod
    def _release(room: Room, client: Client) -> Claim | None:
        """Give up what ``client`` holds in ``room``; what it held, if anything."""
        claim = room.claims.pop(client.id, None)
        if claim is None:
            return None
        if room.names.get(claim.name.address) is client:
            del room.names[claim.name.address]
        for key in claim.keys:
            if room.holders.get(key) is client:
                del room.holders[key]
        return claim

    # --- fan-out -------------------------------------------------------------

    @staticmethod
    def fanout(room: Room, event: Event, exclude: Client | None = None) -> None:
        """Encode once per protocol present, then hand the same frame to each."""
        for protocol, members in room.receivers.items():
            data = protocol.encode(event)
            if data is None:
                continue
            frame = text_frame(data)
            skip = None if protocol.echo else exclude
            for client in members.values():
                if client is not skip:
                    client.deliver(frame)
