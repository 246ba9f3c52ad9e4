"""idle: hold ``--connections`` authenticated connections for the window.

What it measures is the server's memory: RSS per connection, from the
RSS before anyone connected and with every connection open (``--spawn``
or ``--server-pid``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..plan import Layout
from .base import Scenario


class Idle(Scenario):
    name = "idle"
    help = "hold N authenticated connections"

    def layout(self, args: argparse.Namespace, path: str, prefix: str) -> Layout:
        return Layout([path], subscribers=[(f"{prefix}i{k}", 0) for k in range(args.connections)])

    def shape(self, r: dict[str, Any]) -> str:
        return "idle connections"
