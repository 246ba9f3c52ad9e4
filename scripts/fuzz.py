#!/usr/bin/env python3
"""Long fuzzing runs: the suite's fuzzers with the limits raised.

Runs, round after round until --minutes have passed (the round under way
finishes first):

- the connection state-machine fuzz of tests/test_stateful_fuzz.py, once
  per protocol, each example against a fresh chatd started in-process on
  127.0.0.1 (ephemeral port, in-memory store) and stopped after it;
- every sans-IO decoder fuzzer in tests/ (the plain ``@given`` tests that
  take no fixtures), found by importing the test modules.

Each round runs up to --examples examples per fuzzer. A fuzzer that fails
is reported (with the falsifying example and hypothesis' reproduction
blob) and not run again; the others go on. Ends with a summary table and
exit status 1 if anything failed.

    python scripts/fuzz.py --minutes 10
    python scripts/fuzz.py --minutes 60 --examples 2000 --only stateful
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import HypothesisWarning  # noqa: E402

PROFILE = "chatd-long-fuzz"


@dataclass
class Fuzzer:
    name: str
    run: Callable[[], None]
    calls: list[int]  # examples tried (shrinking included), as a mutable counter
    rounds: int = 0
    seconds: float = 0.0
    failure: str | None = None


def counting(fn: Callable, counter: list[int]) -> Callable:
    def counted(*args, **kwargs):
        counter[0] += 1
        return fn(*args, **kwargs)
    return counted


def stateful_fuzzers(max_actions: int) -> list[Fuzzer]:
    import tests.rawws
    import tests.test_stateful_fuzz
    from tests.test_stateful_fuzz import PROTOCOLS, actions, run_actions

    # Each shrinking step that reproduces a missing frame waits out the
    # hang guard; on loopback a frame arrives within milliseconds or never.
    tests.rawws.GUARD = tests.test_stateful_fuzz.GUARD = 2

    def fuzzer(protocol: str) -> Fuzzer:
        counter = [0]

        @given(actions(protocol, max_size=max_actions))
        def example(sequence):
            counter[0] += 1
            trio.run(run_actions, protocol, sequence)

        return Fuzzer(f"stateful {protocol}", example, counter)

    return [fuzzer(protocol) for protocol in PROTOCOLS]


def sans_io_fuzzers() -> list[Fuzzer]:
    """Every synchronous ``@given`` test in tests/ that needs no fixture."""
    fuzzers = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.stem == "test_stateful_fuzz":
            continue
        try:
            module = importlib.import_module(f"tests.{path.stem}")
        except Exception as exc:  # someone's work in progress: say so, go on
            print(f"skipped tests/{path.name}: {type(exc).__name__}: {exc}")
            continue
        for name, fn in vars(module).items():
            handle = getattr(fn, "hypothesis", None)
            if not name.startswith("test_") or handle is None:
                continue
            if inspect.iscoroutinefunction(handle.inner_test) or inspect.signature(fn).parameters:
                continue  # async or needs fixtures: the suite runs those
            counter = [0]
            handle.inner_test = counting(handle.inner_test, counter)
            fuzzers.append(Fuzzer(f"{path.stem}::{name}", fn, counter))
    return fuzzers


def run_round(fuzzer: Fuzzer) -> None:
    start = time.monotonic()
    try:
        fuzzer.run()
    except KeyboardInterrupt:
        raise
    except BaseException:
        fuzzer.failure = traceback.format_exc()
        print(f"\nFAILED {fuzzer.name}\n{fuzzer.failure}", flush=True)
    finally:
        fuzzer.rounds += 1
        fuzzer.seconds += time.monotonic() - start


def summary(fuzzers: list[Fuzzer], elapsed: float) -> str:
    width = max(len(f.name) for f in fuzzers)
    lines = [f"{'fuzzer':<{width}}  rounds  examples  seconds  result",
             f"{'-' * width}  ------  --------  -------  ------"]
    for f in fuzzers:
        result = "FAILED" if f.failure else "ok"
        lines.append(f"{f.name:<{width}}  {f.rounds:>6}  {f.calls[0]:>8}  {f.seconds:>7.1f}  {result}")
    total = sum(f.calls[0] for f in fuzzers)
    failed = sum(1 for f in fuzzers if f.failure)
    lines.append(f"{total} examples in {elapsed:.0f} s; {failed} of {len(fuzzers)} fuzzers failed")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="keep starting rounds until this much time has passed (default 5)")
    parser.add_argument("--examples", type=int, default=500,
                        help="examples per fuzzer per round (default 500)")
    parser.add_argument("--max-actions", type=int, default=60,
                        help="longest action sequence for the state-machine fuzz (default 60)")
    parser.add_argument("--only", choices=["stateful", "sans-io"],
                        help="run one kind of fuzzer only")
    args = parser.parse_args()

    # Tests with their own @settings keep what they set; everything else
    # (and the stateful fuzz) takes this profile. Loaded before the test
    # modules are imported, so their settings inherit from it.
    settings.register_profile(PROFILE, max_examples=args.examples, deadline=None,
                              suppress_health_check=list(HealthCheck), print_blob=True,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
    settings.load_profile(PROFILE)
    warnings.filterwarnings("ignore", message="The HMAC key is")  # test secrets are short
    warnings.filterwarnings("ignore", category=HypothesisWarning)

    fuzzers: list[Fuzzer] = []
    if args.only in (None, "stateful"):
        fuzzers += stateful_fuzzers(args.max_actions)
    if args.only in (None, "sans-io"):
        fuzzers += sans_io_fuzzers()
    print(f"{len(fuzzers)} fuzzers, {args.examples} examples a round, "
          f"for {args.minutes:g} minutes", flush=True)

    start = time.monotonic()
    deadline = start + args.minutes * 60
    try:
        while time.monotonic() < deadline:
            live = [f for f in fuzzers if f.failure is None]
            if not live:
                break
            for fuzzer in live:
                run_round(fuzzer)
                if time.monotonic() >= deadline:
                    break
            print(f"[{time.monotonic() - start:6.0f} s] "
                  f"{sum(f.calls[0] for f in fuzzers)} examples so far", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted")
    print()
    print(summary(fuzzers, time.monotonic() - start))
    return 1 if any(f.failure for f in fuzzers) else 0


if __name__ == "__main__":
    sys.exit(main())
