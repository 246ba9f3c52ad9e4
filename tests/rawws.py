"""A bare WebSocket client on wsproto, for what a polite client never does."""

from __future__ import annotations

import socket

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request

from tests.conftest import GUARD


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    @classmethod
    async def connect(cls, port: int, path: str, *, rcvbuf: int | None = None) -> "RawClient":
        sock = trio.socket.socket()
        if rcvbuf is not None:
            # Set before connecting so the TCP window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        await client.send(Request(host="127.0.0.1", target=path))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event | None:
        """The next event, or None at end of stream."""
        with trio.fail_after(GUARD):
            while not self.pending:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def until_close(self) -> CloseConnection | None:
        """Skip frames until the server's close frame (None: stream just ended)."""
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return event

    async def aclose(self) -> None:
        await self.stream.aclose()
