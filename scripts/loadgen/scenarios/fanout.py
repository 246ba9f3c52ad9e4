"""fanout: ``--subscribers`` and ``--publishers`` in one lobby (or one GradAgenda group).

The bar in docs/performance.md: every message reaches every other client
of the room, so deliveries/s is the publish rate times the room's size.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..plan import Layout
from .messaging import MessagingScenario, rooms_layout


class Fanout(MessagingScenario):
    name = "fanout"
    help = "S subscribers and P publishers in one lobby"

    def layout(self, args: argparse.Namespace, path: str, prefix: str) -> Layout:
        return rooms_layout(args, [path], 1, args.subscribers or 100, prefix)

    def shape(self, r: dict[str, Any]) -> str:
        return f"{r['subscribers']} subscribers, {r['publishers']} publishers"
