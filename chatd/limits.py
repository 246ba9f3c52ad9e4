"""Abuse limits: token buckets and the per-address connection ledger.

Pure bookkeeping with the clock passed in, so it is tested without
sockets or sleeps; the server asks before accepting a handshake and the
connection asks before handling each frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatd.handshake import Refusal
from chatd.proxy import in_networks


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1:
            self.tokens = tokens - 1
            return True
        self.tokens = tokens
        return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


@dataclass
class ConnectionLedger:
    """Open connections in total and per client address, and connect rates.

    Addresses in ``exempt`` (loopback by default, as Ergo exempts
    localhost) skip the per-address limits; the total cap applies to all.
    A connection from a trusted proxy is counted in the total at once and
    against its client's address once the proxy has said who that is
    (``admit`` with ``ip=None``, then ``admit_address``).
    """

    max_total: int
    max_per_ip: int
    rate_per_ip: float
    burst_per_ip: float
    exempt: tuple = ()
    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    #: Refused handshakes still being answered, per address: bounded too,
    #: or refusals themselves would hold unbounded sockets.
    refusing: dict[str, int] = field(default_factory=dict)
    refusing_total: int = 0

    def is_exempt(self, ip: str | None) -> bool:
        return ip is None or in_networks(ip, self.exempt)

    def admit(self, ip: str | None, now: float) -> Refusal | None:
        """Count a new connection from ``ip`` (None: not known yet), or say
        why it is refused (then nothing is counted)."""
        if self.total >= self.max_total:
            return Refusal(503, "server is at its connection limit")
        refusal = self._check_address(ip, now)
        if refusal is None:
            self.total += 1
            self._count(ip)
        return refusal

    def admit_address(self, ip: str, now: float) -> Refusal | None:
        """Count a connection already in the total against its client's
        address, learnt late (from a trusted proxy)."""
        refusal = self._check_address(ip, now)
        if refusal is None:
            self._count(ip)
        return refusal

    def _check_address(self, ip: str | None, now: float) -> Refusal | None:
        if self.is_exempt(ip):
            return None
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return Refusal(429, "too many connections from this address")
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= 4 * self.max_total:
                self._forget_idle(now)
            bucket = self.buckets[ip] = TokenBucket(self.rate_per_ip, self.burst_per_ip, now)
        if not bucket.take(now):
            return Refusal(429, "connecting too fast from this address")
        return None

    def _count(self, ip: str | None) -> None:
        if not self.is_exempt(ip):
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def hold_refusal(self, ip: str) -> bool:
        """Count a refused handshake that will be answered; False if this
        address already has as many as it may have connections."""
        held = self.refusing.get(ip, 0)
        if held >= self.max_per_ip or self.refusing_total >= self.max_total:
            return False
        self.refusing[ip] = held + 1
        self.refusing_total += 1
        return True

    def release_refusal(self, ip: str) -> None:
        self.refusing_total -= 1
        left = self.refusing[ip] - 1
        if left:
            self.refusing[ip] = left
        else:
            del self.refusing[ip]

    def release(self, ip: str | None) -> None:
        """Forget a connection counted with ``admit``; ``ip`` is the address
        it was counted against (None if none was)."""
        self.total -= 1
        if self.is_exempt(ip):
            return
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def _forget_idle(self, now: float) -> None:
        # A full bucket remembers nothing a fresh one would not.
        for ip in [ip for ip, b in self.buckets.items() if b.full(now)]:
            del self.buckets[ip]
