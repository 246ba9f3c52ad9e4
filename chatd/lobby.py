"""Lobby rooms: public broadcast rooms shared by every lobby protocol.

A room holds its receiving clients grouped by protocol, so a message is
encoded and framed once per protocol present, then the same bytes go to
every recipient of that protocol. Names claimed with ``register``
(socialvp, wcp) share one registry per room, whatever the protocol.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from chatd.events import Direct, Event, Join, Leave, Message, Publish, SendDirect, UserJoined, UserLeft
from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.client import Client
    from chatd.protocols.base import Protocol
    from chatd.router import Router

log = logging.getLogger("chatd.lobby")


class Room:
    __slots__ = ("name", "receivers", "names", "announced")

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: dict[type[Protocol], dict[int, Client]] = {}
        self.names: dict[str, Client] = {}
        self.announced: set[int] = set()

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
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None:
            room = self.rooms[client.room] = Room(client.room)
        if cmd.register and cmd.name is not None:
            holder = room.names.get(cmd.name)
            if holder is not None and holder is not client:
                return False
            if client.name is not None and room.names.get(client.name) is client:
                del room.names[client.name]
            room.names[cmd.name] = client
        old_name = client.name
        client.name = cmd.name
        client.display_name = cmd.display_name
        room.receivers.setdefault(client.protocol, {})[client.id] = client
        if cmd.announce:
            joined = UserJoined(name=cmd.name or "", display_name=cmd.display_name)
            if client.id not in room.announced:
                room.announced.add(client.id)
                self.fanout(room, joined, exclude=client)
            elif old_name != cmd.name:
                # A rename (socialvp may identify again): the old name leaves.
                self.fanout(room, UserLeft(name=old_name or ""), exclude=client)
                self.fanout(room, joined, exclude=client)
        return True

    def publish(self, cmd: Publish) -> None:
        client = cmd.client
        room = self.rooms.get(client.room)
        if room is None or client.id not in room.receivers.get(client.protocol, ()):
            log.debug("publish from %r, which has not joined", client)
            return
        event = Message(room=room.name, sender=cmd.sender if cmd.sender is not None else client.name,
                        payload=cmd.payload, time_ns=time.time_ns(),
                        client_timestamp=cmd.client_timestamp)
        self.fanout(room, event, exclude=client)

    def send_direct(self, cmd: SendDirect) -> bool:
        client = cmd.client
        room = self.rooms.get(client.room)
        target = room.names.get(cmd.to) if room is not None else None
        if target is None:
            return False
        data = target.protocol.encode(Direct(sender=client.name or "", to=cmd.to,
                                             payload=cmd.payload, time_ns=time.time_ns()))
        if data is not None:
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
        if client.name is not None and room.names.get(client.name) is client:
            del room.names[client.name]
        if client.id in room.announced:
            room.announced.discard(client.id)
            self.fanout(room, UserLeft(name=client.name or ""), exclude=client)
        if not room.receivers:
            del self.rooms[room.name]

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
