"""The live progress line on stderr: set-up counts, then one update per interval.

Shown when stderr is a terminal, or with ``--progress``; rewritten in place
with ``\\r`` and wiped before the summary.
"""

from __future__ import annotations

import argparse
import sys

from .report import timeline_point
from .scenarios import SCENARIOS

WIDTH = 110


class Progress:
    """Writes the progress line when enabled, else nothing."""

    def __init__(self, args: argparse.Namespace, workers: int) -> None:
        self.enabled = args.progress or sys.stderr.isatty()
        self.interval, self.duration = args.interval, args.duration
        self.storm = SCENARIOS[args.scenario].storm
        self.workers = workers

    def setup(self, phase: str, setup: dict[int, tuple[int, int]]) -> None:
        """While connecting: ``setup`` is each worker's (open, errors)."""
        if not self.enabled:
            return
        opened = sum(s[0] for s in setup.values())
        failed = sum(s[1] for s in setup.values())
        self._write(f"\r{phase}: {opened} open, {failed} errors   ")

    def interval_done(self, k: int, samples: dict[int, list[dict]]) -> None:
        """Once every worker has sent its sample ``k``: rates and p99 of that interval."""
        if (not self.enabled or len(samples[k]) < self.workers
                or k * self.interval > self.duration + 1e-9):
            return
        point = timeline_point(k, samples[k], self.interval)
        elapsed = min(k * self.interval, self.duration)
        filled = int(30 * elapsed / self.duration)
        errors = sum(s["errors"] for parts in samples.values() for s in parts)
        line = (f"\r[{'#' * filled}{'.' * (30 - filled)}] {elapsed:5.1f}/{self.duration:g}s "
                f"{point['deliveries_per_s']:9,.0f} deliveries/s")
        if self.storm:
            line += f" {point['connects_per_s']:7,.0f} connects/s"
        if point["latency_ms"]:
            line += f"  p99 {point['latency_ms']['p99']:.1f} ms"
        line += f"  {point['open']:,} open  {errors} errors "
        self._write(line)

    def clear(self) -> None:
        if self.enabled:
            self._write("\r" + " " * WIDTH + "\r")

    def _write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()
