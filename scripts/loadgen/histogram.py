"""Latency histograms: log-linear buckets over microseconds and their percentiles.

A bucket keeps 1/64 relative precision: below 128 µs one bucket per
microsecond, above it 64 buckets per power of two. Cheap to fill per
delivery (the receive hot path in ``client.py`` inlines :func:`bucket`),
and histograms from several workers and intervals merge by adding counts.
A histogram is a ``dict[bucket, count]``.
"""

from __future__ import annotations

import math


def bucket(us: int) -> int:
    """The bucket of a latency of ``us`` microseconds (negative counts as 0)."""
    if us < 128:
        return us if us > 0 else 0
    e = us.bit_length() - 7
    return (e << 6) + (us >> e)


def bucket_value(b: int) -> float:
    """The middle of bucket ``b``, in microseconds."""
    if b < 128:
        return float(b)
    e = (b >> 6) - 1
    return ((b - (e << 6)) << e) + (1 << e) / 2


def record(hist: dict[int, int], us: int) -> None:
    """Count one sample of ``us`` microseconds into ``hist``."""
    b = bucket(us)
    hist[b] = hist.get(b, 0) + 1


def merge_into(total: dict[int, int], part: dict[int, int]) -> None:
    """Add the counts of ``part`` to ``total``."""
    for b, n in part.items():
        total[b] = total.get(b, 0) + n


def merged(parts: list[dict[int, int]]) -> dict[int, int]:
    """One histogram holding the counts of all ``parts``."""
    total: dict[int, int] = {}
    for part in parts:
        merge_into(total, part)
    return total


def summarize(hist: dict[int, int], max_us: int | None = None) -> dict[str, float] | None:
    """``{"p50", "p90", "p99", "max"}`` in milliseconds and ``"count"``; None if empty.

    A percentile is the middle of the bucket holding it, capped at the
    maximum (``max_us`` when the exact maximum is known, else the middle of
    the highest bucket).
    """
    count = sum(hist.values())
    if not count:
        return None
    out: dict[str, float] = {}
    ordered = sorted(hist.items())
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        target, seen = math.ceil(q * count), 0
        for b, n in ordered:
            seen += n
            if seen >= target:
                out[name] = round(bucket_value(b) / 1000, 3)
                break
    top = max_us if max_us is not None else bucket_value(ordered[-1][0])
    out["max"] = round(top / 1000, 3)
    for name in ("p50", "p90", "p99"):  # a bucket's middle may lie past the maximum
        out[name] = min(out[name], out["max"])
    out["count"] = count
    return out


def describe(summary: dict[str, float] | None) -> str:
    """One line for a summary table: ``p50 .. p90 .. p99 .. max .. ms (N samples)``."""
    if not summary:
        return "-"
    return (f"p50 {summary['p50']:.2f}  p90 {summary['p90']:.2f}  p99 {summary['p99']:.2f}  "
            f"max {summary['max']:.2f} ms  ({summary['count']:,} samples)")


def percent_floor(ratio: float) -> str:
    """``ratio`` as a percentage with one decimal, rounded down: 4,000,448 of
    4,006,912 is 99.8%, and only all of them is 100.0%."""
    tenths = int(ratio * 1000 + 1e-9)  # floor; the epsilon keeps 0.5 at 50.0
    return f"{tenths / 10:.1f}%"
