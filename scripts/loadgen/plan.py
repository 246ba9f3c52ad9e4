"""Who connects where, and each worker process's share of it.

The parent lays the run out once (:class:`Layout`: rooms and the names of
the clients in them, made by the scenario) and deals it round-robin over
the workers as :class:`Plan`\\ s, which travel to the worker processes
with everything a worker needs to act alone: target, secrets, pacing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .process import cpu_list


@dataclass
class Layout:
    """Who is where: rooms (endpoint paths or groups) and their clients."""

    #: One endpoint path per room.
    paths: list[str]
    #: (name, room)
    subscribers: list[tuple[str, int]] = field(default_factory=list)
    #: (name, probe's name or None when the publisher is its own probe, room)
    publishers: list[tuple[str, str | None, int]] = field(default_factory=list)
    #: GradAgenda: room -> member names, its creator first.
    groups: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class Plan:
    """One worker's orders: its clients, the target and how to pace the load."""

    scenario: str
    protocol: str
    family: int
    address: str
    port: int
    host_header: str
    paths: list[str]                 # one per room
    secret_key: str | None
    jwt_secret: str | None
    tokens: dict[str, str]
    sources: list[str]
    size: int
    window: int
    rate_per_publisher: float        # messages a second
    connect_rate: float              # this worker's share, connects a second
    churn: bool
    connect_timeout: float           # seconds
    concurrency: int
    interval: float                  # seconds per sample
    grace: float                     # seconds
    tls: bool                        # wss (the Go engine only)
    cpus: list[int] | None
    worker_index: int
    # This worker's share of the Layout's clients, in its shapes.
    subscribers: list[tuple[str, int]] = field(default_factory=list)
    publishers: list[tuple[str, str | None, int]] = field(default_factory=list)
    groups: dict[int, list[str]] = field(default_factory=dict)


def make_plans(args: argparse.Namespace, layout: Layout, target: tuple, secrets: dict,
               tokens: dict[str, str]) -> list[Plan]:
    """Deal ``layout`` over ``args.workers`` plans; ``target`` is
    ``target.resolve_target()``'s (family, address, Host header, port)."""
    family, address, host_header, port = target
    sources: list[str] = []
    if address == "127.0.0.1" and args.source_ips > 0:
        sources = [f"127.0.0.{k}" for k in range(1, min(args.source_ips, 254) + 1)]
    publishers_total = max(1, len(layout.publishers))
    window = args.window or (1000 if args.rate else 64)
    plans = []
    for w in range(args.workers):
        plan = Plan(
            scenario=args.scenario, protocol=args.protocol, family=family, address=address,
            port=port, host_header=host_header, paths=layout.paths,
            secret_key=secrets.get("secret-key"), jwt_secret=secrets.get("jwt-secret"),
            tokens={}, sources=sources, size=args.size, window=window,
            rate_per_publisher=args.rate / publishers_total,
            connect_rate=args.connect_rate / args.workers, churn=args.churn,
            connect_timeout=args.connect_timeout, concurrency=args.concurrency,
            interval=args.interval, grace=args.grace, tls=args.tls, cpus=cpu_list(args.cpus),
            worker_index=w)
        plan.subscribers = layout.subscribers[w::args.workers]
        plan.publishers = layout.publishers[w::args.workers]
        mine = {n for n, _, _ in plan.publishers}
        # A group's creator is its first publisher, so its worker creates it.
        plan.groups = {r: names for r, names in layout.groups.items() if names[0] in mine}
        wanted = {n for n, _ in plan.subscribers} | mine | {
            p for _, p, _ in plan.publishers if p}
        plan.tokens = {n: tokens[n] for n in wanted if n in tokens}
        plans.append(plan)
    return plans
