"""The scenarios, one module each; :data:`SCENARIOS` maps a name to its instance.

To add one: subclass ``base.Scenario`` (or ``messaging.MessagingScenario``
for one with publishers) in a module of its own and list it here.
"""

from __future__ import annotations

from .base import Scenario
from .connect import Connect
from .fanout import Fanout
from .gradagenda import Gradagenda
from .idle import Idle
from .rooms import Rooms

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Fanout(), Rooms(), Connect(), Idle(), Gradagenda())}
