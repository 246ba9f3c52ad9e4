"""Cross-node traffic: one interface, a backend per file.

- ``base.py``: ``Broker``, the interface the router's services use, the
  commands a broker posts to the router, and the channel names;
- ``wire.py``: the envelopes that cross nodes and their JSON encoding;
- ``local.py``: ``LocalBroker``, one node, nothing crosses (the default);
- ``redis.py``: ``RedisBroker``, several nodes on one Redis.

``open_broker(config)`` picks the backend from the ``broker`` config
value; ``chatd.cluster`` is the router service that applies what other
nodes send. docs/cluster.md describes it for operators.
"""

from __future__ import annotations

import re
import secrets
import socket

from chatd.broker.base import Broker
from chatd.broker.local import LocalBroker

__all__ = ["Broker", "LocalBroker", "broker_class", "generated_node_id", "open_broker"]


def generated_node_id() -> str:
    """``HOSTNAME-XXXXXX``: the host's name (characters a node id may not
    hold dropped) and six random hex digits, so two nodes on one host differ."""
    host = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname())[:40] or "chatd"
    return f"{host}-{secrets.token_hex(3)}"


def open_broker(url: str | None, node: str, **options: float) -> Broker:
    """The broker the ``broker`` config value names: None is in-process;
    ``redis://`` / ``rediss://`` is Redis (needs ``pip install 'chatd[cluster]'``).
    ``options`` are ``RedisBroker``'s timings (seconds)."""
    boot = secrets.token_hex(4)
    if url is None:
        return LocalBroker(node, boot)
    return broker_class(url)(url, node, boot, **options)


def broker_class(url: str) -> type[Broker]:
    """The backend class for a ``broker`` URL; RuntimeError naming what to
    install if it is missing (``chatd check-config`` asks this too)."""
    try:
        from chatd.broker.redis import RedisBroker
    except ImportError:
        raise RuntimeError("broker: Redis needs coredis: pip install 'chatd[cluster]'") from None
    return RedisBroker
