"""The five wire protocols, each a sans-IO module; see ``base``."""

from __future__ import annotations

from chatd.protocols.base import Protocol
from chatd.protocols.multichat import Multichat

PROTOCOL_CLASSES: dict[str, type[Protocol]] = {
    "multichat": Multichat,
}
