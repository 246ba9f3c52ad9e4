"""A worker's single reader: every connection's socket over one private epoll.

Measured cheaper than a trio task per connection: one wake-up serves
every socket that has data, with one ``read(2)`` each, and no per-socket
re-registration (docs/performance.md, "Is the client the bottleneck?").
Linux only (``select.epoll``).
"""

from __future__ import annotations

import os
import select
import time
from typing import TYPE_CHECKING

import trio

from .client import RECEIVE_SIZE

if TYPE_CHECKING:
    from .client import WsClient


class Receiver:
    """Reads every connection of a worker in one task, over a private epoll."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.clients: dict[int, WsClient] = {}

    def __contains__(self, client: WsClient) -> bool:
        return self.clients.get(client.fd) is client

    def add(self, client: WsClient) -> None:
        """Start reading an opened connection (and feed what came with the handshake)."""
        client.fd = client.stream.socket.fileno()
        self.clients[client.fd] = client
        self.epoll.register(client.fd, select.EPOLLIN)
        if client.buffer:  # frames that came with the handshake response
            data, client.buffer = client.buffer, b""
            client.feed(data, time.monotonic_ns())

    def remove(self, client: WsClient) -> None:
        if self.clients.get(client.fd) is client:
            del self.clients[client.fd]
            try:
                self.epoll.unregister(client.fd)
            except OSError:
                pass

    async def run(self) -> None:
        """Forever: wait for the epoll, read each ready socket once, feed its client."""
        clients = self.clients
        poll = self.epoll.poll
        read = os.read  # on a socket, read(2) is recv(2); trio keeps it non-blocking
        while True:
            await trio.lowlevel.wait_readable(self.epoll.fileno())
            ready = poll(0, 4096)
            now_ns = time.monotonic_ns()
            for fd, _ in ready:
                client = clients.get(fd)
                if client is None:
                    continue
                try:
                    data = read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    client.lost("connection lost")
                    continue
                if data:
                    client.feed(data, now_ns)
                else:
                    client.lost("closed without a close frame")
