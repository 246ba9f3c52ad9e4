"""The five wire protocols, each a sans-IO module; see ``base``."""

from __future__ import annotations

from chatd.protocols.base import Protocol
from chatd.protocols.gradagenda import GradAgenda
from chatd.protocols.multichat import Multichat
from chatd.protocols.socialvp import SocialVP
from chatd.protocols.wcp import Wcp
from chatd.protocols.wschat import WsChat

PROTOCOL_CLASSES: dict[str, type[Protocol]] = {
    "multichat": Multichat,
    "gradagenda": GradAgenda,
    "socialvp": SocialVP,
    "wschat": WsChat,
    "wcp": Wcp,
}
