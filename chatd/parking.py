"""Idle connections wait for bytes without a task each.

A trio task waiting on a socket holds its ``Task``, its context, its
cancel status, a chain of suspended coroutine frames and trio's epoll
registration: ~4 KiB, most of an idle connection's memory. An
authenticated connection with nothing half-read and nothing to write
needs none of it while its socket is silent, so it *parks*: its task
ends, and its socket joins one epoll set (``select.epoll``, level-
triggered) that a single task watches through trio. When bytes (or the
end of the stream) arrive, or anything kills the connection, it is
unparked and given a new task, which carries on where the old one
stopped (``chatd.connection``). Writes never needed the task: a parked
connection still gets every frame, keepalive pings included.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Protocol

import trio


class Parkable(Protocol):
    def wake(self) -> None: ...


#: Parking needs ``select.epoll`` (Linux); elsewhere connections keep their tasks.
AVAILABLE = hasattr(select, "epoll")


class Parking:
    """Parked connections by socket descriptor; ``run`` wakes them.

    ``park(fd, connection)`` adds one (its ``wake()`` is called once,
    from ``run``'s task, when ``fd`` is readable or at its end);
    ``unpark(fd)`` takes one back (True if it was parked: then it is the
    caller's to wake). ``spawn`` starts a connection's new task.
    """

    __slots__ = ("_epoll", "_parked", "spawn")

    def __init__(self, spawn: Callable[..., None]) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, Parkable] = {}
        self.spawn = spawn

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, fd: int, connection: Parkable) -> None:
        # EPOLLIN also reports the end of the stream (a read returns b"").
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = connection

    def unpark(self, fd: int) -> bool:
        if self._parked.pop(fd, None) is None:
            return False
        if not self._epoll.closed:
            self._epoll.unregister(fd)
        return True

    async def run(self) -> None:
        """Wake parked connections as their sockets become readable, until
        cancelled (then the set is closed; the server wakes every
        connection it kills at shutdown)."""
        epoll, parked = self._epoll, self._parked
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0):
                    connection = parked.pop(fd, None)
                    if connection is not None:
                        epoll.unregister(fd)
                        connection.wake()
        finally:
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()
