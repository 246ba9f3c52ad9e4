"""Hypothesis strategies and helpers shared by the fuzz tests."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

#: Any JSON value, small enough to keep frames under the 4 KB limit.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)


def draw(strategy: st.SearchStrategy, n: int) -> list:
    """``n`` examples from hypothesis, for a test that reuses one server or
    connection (hypothesis cannot drive an async test directly; a failure
    shows the bad input but is not shrunk)."""
    drawn: list = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    return drawn


# --- JSON that breaks decoders (issue #9 item 7) -------------------------------------

from chatd.protocols.base import MAX_JSON_DEPTH  # noqa: E402


def _nest(depth: int, kind: str) -> str:
    if kind == "arrays":
        return "[" * depth + "]" * depth
    if kind == "objects":
        return '{"a":' * depth + "0" + "}" * depth
    if kind == "mixed":
        return '[{"a":' * (depth // 2) + "0" + "}]" * (depth // 2)
    if kind == "brackets in a string":  # not deep at all: the brackets are text
        return '"' + "[{" * depth + '"'
    return "[" * depth  # never closed


#: Nesting around the limit and far past it (the issue's frame is 990 deep).
deep_json = st.builds(_nest, st.integers(MAX_JSON_DEPTH - 3, 1500),
                      st.sampled_from(["arrays", "objects", "mixed", "brackets in a string",
                                       "open"]))
#: Numbers beyond the 64-bit float range, or with too many digits for one.
odd_numbers = st.sampled_from(["1e400", "-1e400", "1E+99999", "0.1e310", "1e-400", "9" * 400,
                               "-" + "9" * 400, "123456789012345678901234567890", "-0", "1.5e308"])
#: Literals other parsers accept, and escapes of lone surrogates.
not_quite_json = st.sampled_from([
    "NaN", "-NaN", "Infinity", "-Infinity", "[NaN]", "undefined", "0x10", "+1", ".5", "01",
    '"\\ud800"', '"\\udc00"', '"\\ud800\\ud800"', '"a\\ud83d"', '"\\ud83d\\ude00"', "\ufeff{}",
])
#: Lone surrogates in the text itself: no WebSocket client can send these
#: (they are not UTF-8), but a protocol object must survive them.
surrogate_strings = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(
    lambda s: '"' + s + '"')


def odd_frames(*shapes: dict, sendable: bool = True) -> st.SearchStrategy[str]:
    """Odd JSON alone, or as the value of one field of a protocol-shaped
    object (``shapes``), within the 4 KB frame limit. ``sendable``: only
    text a WebSocket can carry (no lone surrogates)."""
    odd = st.one_of(deep_json, odd_numbers, not_quite_json,
                    *([] if sendable else [surrogate_strings]))

    def place(shape: dict, key: str, value: str) -> str:
        return json.dumps({**shape, key: "\x00odd\x00"}).replace('"\\u0000odd\\u0000"', value)

    placed = st.sampled_from(shapes).flatmap(
        lambda shape: st.builds(place, st.just(shape), st.sampled_from(sorted(shape)), odd))
    frames = st.one_of(odd, placed) if shapes else odd
    return frames.filter(lambda t: len(t.encode("utf-8", "surrogatepass")) <= 4096)
