"""rooms: many small rooms of ``--room-size`` subscribers and ``--publishers`` publishers.

In the lobby protocols a room is an endpoint (chatd's ``room`` key), so
the rooms are the endpoint paths given with ``--paths``, or with
``--spawn`` the ``/room-0``, ``/room-1``, ... that the spawned chatd
mounts. In GradAgenda a room is a group, all on one endpoint.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..dialects import DIALECTS
from ..plan import Layout
from .messaging import MessagingScenario, rooms_layout


class Rooms(MessagingScenario):
    name = "rooms"
    help = ("many small rooms: one endpoint per room (``--paths``, or\n"
            "``--spawn`` writes such a config)")

    def check(self, args: argparse.Namespace) -> str | None:
        if args.spawn not in (None, "chatd"):  # a peer has one lobby
            return f"--spawn {args.spawn} speaks multichat in one lobby only"
        return super().check(args)

    def layout(self, args: argparse.Namespace, path: str, prefix: str) -> Layout:
        rooms, size = args.rooms or 10, args.room_size or 10
        if DIALECTS[args.protocol].groups:
            paths = [path] * rooms          # groups share one endpoint
        elif args.paths:
            paths = [p.strip() for p in args.paths.split(",") if p.strip()]
            rooms = len(paths)
        elif args.spawn == "chatd":
            paths = [f"/room-{r}" for r in range(rooms)]
        else:
            raise SystemExit("loadtest: rooms are per endpoint: give --paths /a,/b,... "
                             "(one per room) or --spawn")
        return rooms_layout(args, paths, rooms, size, prefix)

    def endpoints(self, args: argparse.Namespace, paths: list[str]) -> list[dict[str, Any]]:
        if DIALECTS[args.protocol].groups:
            return super().endpoints(args, paths)
        return [{"path": p, "protocol": args.protocol, "room": p.strip("/")} for p in paths]

    def shape(self, r: dict[str, Any]) -> str:
        return f"{r['rooms']} rooms, {r['subscribers']} subscribers, {r['publishers']} publishers"
