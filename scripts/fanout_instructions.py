"""chatd's Python cost per delivery of a lobby fan-out, without sockets:
instructions, counted by valgrind (repeatable on a shared machine).

Builds one lobby room of ``--subscribers`` multichat clients and one
publisher (``chatd.lobby.Lobby``, ``chatd.outbox``), then runs
``--passes`` router passes of ``--per-pass`` messages each as the router
does: ``Lobby.publish`` per message, ``Flusher.flush`` per pass. The
transports are stand-ins that take every write, so what is counted is
chatd's own Python path (the hub, the outboxes, the flush), not the
kernel's ``write(2)``, which ``scripts/profile_peak.py`` shows. Run it
twice under callgrind, with and without passes, and divide the
difference by the deliveries::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python scripts/fanout_instructions.py --subscribers 1000 --passes 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python scripts/fanout_instructions.py --subscribers 1000 --passes 200

(the ``Collected`` line of each; ``--per-pass`` is the messages a pass
carries at the peak: up to the router's 64 commands). Any chatd checkout
runs it (``PYTHONPATH=/path/to/checkout``), to compare two.
"""

from __future__ import annotations

import argparse
import time

from chatd.broker import LocalBroker
from chatd.events import Join, Publish
from chatd.lobby import Lobby
from chatd.outbox import Client, Flusher
from chatd.protocols.multichat import Multichat


class _Transport:
    """Takes every write at once, as a socket with room would."""

    waiting_frames = 0
    waiting_bytes = 0
    broken = False

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes, frames: int = 1, counted: bool = True) -> bool:
        self.writes += 1
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--per-pass", type=int, default=16)
    args = parser.parse_args()
    lobby, flusher = Lobby(LocalBroker()), Flusher()
    transports = [_Transport() for _ in range(args.subscribers + 1)]
    clients = [Client(Multichat, "lobby", "peer", "/multichat", 512, t, flusher) for t in transports]
    for n, client in enumerate(clients):
        assert lobby.join(Join(client=client, name=f"u{n}", register=True, announce=False,
                               shared=True))
        flusher.flush()
    publisher, payload = clients[0], "x" * 100
    before = sum(flusher.deliveries.values())
    start = time.perf_counter()
    for _ in range(args.passes):
        for _ in range(args.per_pass):
            lobby.publish(Publish(client=publisher, payload=payload))
        flusher.flush()
    elapsed = time.perf_counter() - start
    deliveries = sum(flusher.deliveries.values()) - before
    writes = sum(t.writes for t in transports)
    print(f"{deliveries} deliveries, {writes} writes in all, {elapsed:.3f} s"
          + (f" ({elapsed / deliveries * 1e9:.0f} ns per delivery)" if deliveries else ""))


if __name__ == "__main__":
    main()
