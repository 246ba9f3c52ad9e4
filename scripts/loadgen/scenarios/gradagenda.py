"""gradagenda: stored group messages, ``--rooms`` groups of ``--room-size`` members.

The rooms scenario in GradAgenda: each group is a mutable session created
by its first publisher; every message is stored (chatd commits it before
broadcasting) and reaches every member device, the sender's too. Tokens
are minted from ``--jwt-secret`` (or the config's, or by ``chatd token``).
"""

from __future__ import annotations

from typing import Any

from .rooms import Rooms


class Gradagenda(Rooms):
    name = "gradagenda"
    help = "stored group messages: G groups of K members, P publishers each"
    protocol = "gradagenda"

    def shape(self, r: dict[str, Any]) -> str:
        return f"{r['rooms']} groups, {r['subscribers']} members, {r['publishers']} publishers"
