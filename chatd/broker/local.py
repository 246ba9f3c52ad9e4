"""The in-process broker: one node, nothing crosses.

Every name claim is decided by the lobby's own registry (this broker
agrees at once), nothing is published anywhere, and there are no tasks:
chatd behaves exactly as a single process always has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import trio

from chatd.broker.base import Broker
from chatd.broker.wire import Item


class LocalBroker(Broker):
    shared = False

    def __init__(self, node: str = "local", boot: str = "0") -> None:
        self.node = node
        self.boot = boot

    async def run(self, router: Any, versions: Callable[[], dict[str, int]], *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def publish(self, channel: str, item: Item) -> None:
        pass

    def claim(self, room: str, keys: Iterable[str], owner: str, token: Any,
              drop: Iterable[str] = (), share: str | None = None) -> bool:
        return True

    def release(self, room: str, keys: Iterable[str], owner: str, token: Any = None) -> bool:
        return True

    def subscribe(self, channels: Iterable[str]) -> bool:
        return True

    def unsubscribe(self, channels: Iterable[str]) -> None:
        pass

    def ready(self) -> str | None:
        return None
