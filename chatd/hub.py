"""Fan-out: router events to their recipients, encoded once per protocol.

The one place where events become frames (docs/design.md, rule 2).
The services (``chatd.lobby``, ``chatd.sessions``, ``chatd.moderation``)
decide *who* gets an event; this module decides *how*: each protocol
present encodes it once (``Protocol.encode``: its wire JSON, or None when
the protocol has no form for it), the payload is framed once (an RFC 6455
section 5.2 text frame, ``chatd.transport.text_frame``) and the same
bytes go to every recipient of that protocol (``Client.deliver``, which
never blocks: the router never awaits a socket).

- ``broadcast``: a lobby room's receivers, grouped by protocol
  (``chatd.outbox.Receivers``: one C loop appends the frame to every
  member's outbox);
- ``Frames``: one event's frames by protocol, made on first use, for
  recipients that come one by one (a session's devices);
- ``send``: one recipient; ``answer``: the one answer to a client's
  ``Answered`` command; ``stream``: a large answer made as the client
  reads (``Client.stream``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.outbox import Client, Receivers
    from chatd.events import Event
    from chatd.protocols.base import Protocol


def broadcast(groups: Mapping[type[Protocol], Receivers], event: Event,
              exclude: Client | None = None) -> None:
    """Every client in ``groups`` (protocol -> its receivers) gets
    ``event``; ``exclude`` (the sender) gets it back only where its
    protocol echoes a sender's own messages (``Protocol.echo``: wschat)."""
    for protocol, members in groups.items():
        data = protocol.encode(event)
        if data is None:
            continue
        members.deliver(text_frame(data), None if protocol.echo else exclude)


class Frames:
    """``event``'s frame for each protocol, encoded on first use."""

    __slots__ = ("event", "_by_protocol")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._by_protocol: dict[type[Protocol], bytes | None] = {}

    def of(self, protocol: type[Protocol]) -> bytes | None:
        try:
            return self._by_protocol[protocol]
        except KeyError:
            data = protocol.encode(self.event)
            frame = self._by_protocol[protocol] = text_frame(data) if data is not None else None
            return frame

    def deliver(self, clients: Iterable[Client], exclude: Client | None = None) -> None:
        """Each of ``clients`` but ``exclude`` gets the event."""
        for client in clients:
            if client is not exclude:
                frame = self.of(client.protocol)
                if frame is not None:
                    client.deliver(frame)


def send(client: Client, event: Event) -> bool:
    """``client`` alone gets ``event``; False if its protocol has no form
    for it or the client is gone."""
    data = client.protocol.encode(event)
    return data is not None and client.deliver(text_frame(data))


def answer(client: Client, event: Event | None) -> None:
    """The one answer to an ``Answered`` command of ``client``: ``event``
    (None, or an event its protocol has no form for: no frame, the
    command still counts as answered)."""
    data = client.protocol.encode(event) if event is not None else None
    client.answered(text_frame(data) if data is not None else None)


def stream(client: Client, events: Iterable[Event]) -> None:
    """An answer sized by the room or the store (a roster): each event
    encoded only when the client's connection is ready to write it
    (``Client.stream``); events its protocol has no form for are left out."""
    client.stream(_payloads(client.protocol, events))


def _payloads(protocol: type[Protocol], events: Iterable[Event]) -> Iterator[bytes]:
    encode = protocol.encode
    for event in events:
        data = encode(event)
        if data is not None:
            yield data
