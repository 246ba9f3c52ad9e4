"""Prometheus metrics, exposed at ``/metrics`` with prometheus-client.

The hot paths (a frame received, a fan-out) only add to plain integers
here; a collector turns them into metric families when Prometheus
scrapes, so counting costs no lock and no call per delivery. The store
commit latency is a prometheus-client ``Histogram`` (observed once per
commit, not per message). Names and units follow Prometheus' naming
conventions (``_total`` counters, ``_seconds``).

Each server has its own registry (tests run several servers in one
process); process metrics (CPU, RSS, open files) come with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Close codes counted under their own label: those RFC 6455's registry
#: (section 11.7, IANA "WebSocket Close Code Number Registry") defines.
#: A client may close with any of ~4,000 codes; the rest are counted by
#: class, so the series stay bounded: ``3xxx`` (registered with IANA for
#: libraries and frameworks), ``4xxx`` (private use), ``other``.
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
                               1012, 1013, 1014, 1015})


def close_label(code: int) -> int | str:
    """The ``code`` label a close is counted under: the code itself if
    RFC 6455 registers it, else its class (``3xxx``, ``4xxx``, ``other``)."""
    if code in KNOWN_CLOSE_CODES:
        return code
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


class Metrics:
    """Counters for one server, and the registry that exposes them."""

    def __init__(self) -> None:
        #: Open WebSocket connections by protocol.
        self.connections: Counter[str] = Counter()
        #: Handshakes refused, by HTTP status.
        self.refused: Counter[int] = Counter()
        #: Complete messages received from clients, by protocol.
        self.received: Counter[str] = Counter()
        #: Frames handed to clients, by protocol.
        self.deliveries: Counter[str] = Counter()
        #: Connections closed, by close code (``close_label``: bounded).
        self.closes: Counter[int | str] = Counter()
        #: Reads the router's queue depth at scrape time.
        self.queue_depth: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self.commit_seconds = Histogram(
            "chatd_store_commit_seconds", "Time to commit one store transaction (group commit)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry)

    def closed(self, code: int) -> None:
        self.closes[close_label(code)] += 1

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("chatd_connections", "Open WebSocket connections",
                                  labels=["protocol"])
        for protocol, count in sorted(self.connections.items()):
            gauge.add_metric([protocol], count)
        yield gauge
        yield _counter("chatd_handshakes_refused", "Handshakes answered with an HTTP error",
                       "status", self.refused)
        yield _counter("chatd_messages_received", "Complete messages received from clients",
                       "protocol", self.received)
        yield _counter("chatd_deliveries", "Frames delivered to clients", "protocol",
                       self.deliveries)
        yield _counter("chatd_closes", "WebSocket connections closed, by close code", "code",
                       self.closes)
        yield GaugeMetricFamily("chatd_router_queue_depth", "Commands waiting for the router",
                                value=self.queue_depth())

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def _counter(name: str, documentation: str, label: str, values: Counter) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, count in sorted(values.items(), key=lambda item: str(item[0])):
        family.add_metric([str(key)], count)
    return family
